"""``optogate isolator flash`` and ``status`` through the real mpremote, to a virtual board.

The board is MicroPython (WebAssembly port) behind a TCP console with virtual
hardware (firmware/isolator/virtual/): mpremote copies the files, hard-resets
it, main.py starts the filter, and ``status`` reads the counters, all with
the command lines the CLI uses on a Pico.
"""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.isolator import cli, suite, wasmpy
from host_tools.cli import main as optogate

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

# the virtual _thread runs the loop this many steps at boot (virtual/machine.py)
FEEDS_PER_SLICE = 25


@pytest.fixture
def board() -> Iterator[wasmpy.VirtualBoard]:
    why = wasmpy.missing()
    if why is not None:
        pytest.fail(why)
    with wasmpy.VirtualBoard() as vb:
        yield vb


def mpremote(board: wasmpy.VirtualBoard, *words: str) -> list[str]:
    return [sys.executable, "-m", "mpremote", "connect", board.url, "resume", *words]


def board_eval(board: wasmpy.VirtualBoard, expression: str) -> str:
    done = subprocess.run(
        mpremote(board, "exec", f"print(repr({expression}))"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_flash_then_status(
    board: wasmpy.VirtualBoard, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an empty board has no firmware: status is an error, not a crash
    assert optogate(["isolator", "status", "--port", board.url]) == cli.EXIT_ERROR
    assert "isolator_app" in capsys.readouterr().err

    raw = suite.shipped_config(maintenance=True)
    raw["board"]["watchdog_ms"] = 4321
    site = tmp_path / "site.json"
    site.write_text(json.dumps(raw))
    assert optogate(["isolator", "flash", "--port", board.url, "--config", str(site)]) == 0
    capsys.readouterr()

    assert optogate(["isolator", "status", "--port", board.url, "--json"]) == cli.EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is True
    assert status["error"] is None
    assert status["status"]["maintenance"] is True  # our file, not the shipped one
    assert status["status"]["steps"] >= 1
    assert set(status["status"]["filter"]) == {"a->b", "b->a"}

    # what the firmware did with the (virtual) hardware at boot
    assert board_eval(board, "sorted(__import__('os').listdir())") == repr(
        sorted(["filtercore.py", "pump.py", "isolator_app.py", "isolator.json", "main.py"])
    )
    assert board_eval(board, "__import__('machine').pins[10].level") == "1"  # own power
    assert board_eval(board, "__import__('machine').uarts[0].kwargs['baudrate']") == "1000000"
    assert board_eval(board, "__import__('isolator_app')._state['pump'].wdt.timeout") == "4321"
    feeds = board_eval(board, "__import__('isolator_app')._state['pump'].wdt.feeds")
    assert feeds == str(FEEDS_PER_SLICE)

    # someone edits the file on the board by hand and reboots it: it fails closed
    subprocess.run(
        mpremote(board, "exec", "open('isolator.json', 'w').write('{}')", "+", "reset"),
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert optogate(["isolator", "status", "--port", board.url]) == cli.EXIT_NOT_RUNNING
    out = capsys.readouterr().out
    assert "running: NO" in out
    assert "must list the allowed message kinds" in out
    assert board_eval(board, "__import__('machine').uarts") == "{}"  # no UART was opened
