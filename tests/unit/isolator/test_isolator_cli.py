"""``optogate isolator``: argument handling, the exact mpremote command lines, status parsing."""

import json
import shlex
import sys
from pathlib import Path

import pytest

from firmware.isolator import cli, suite
from firmware.isolator.errors import BoardError
from host_tools.cli import main as optogate

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ISOLATOR = Path(cli.__file__).parent


def test_flash_command_copies_every_board_file_then_resets(tmp_path: Path) -> None:
    config = tmp_path / "site.json"
    cmd = cli.flash_command("/dev/ttyACM0", config, ["mpremote"])
    assert cmd[:4] == ["mpremote", "connect", "/dev/ttyACM0", "resume"]
    assert cmd[-1] == "reset"
    copies = [cmd[i + 2 : i + 4] for i, word in enumerate(cmd) if word == "fs"]
    assert copies == [
        [str(ISOLATOR / "filtercore.py"), ":filtercore.py"],
        [str(ISOLATOR / "pump.py"), ":pump.py"],
        [str(ISOLATOR / "board" / "isolator_app.py"), ":isolator_app.py"],
        [str(config), ":isolator.json"],  # whatever its name here, the board reads isolator.json
        [str(ISOLATOR / "board" / "main.py"), ":main.py"],
    ]
    assert cmd.count("+") == 5  # every copy is its own mpremote command
    for path, _ in copies[:3] + copies[4:]:
        assert Path(path).is_file()


def test_status_command_does_not_soft_reset() -> None:
    assert cli.status_command("/dev/ttyACM1", ["mp"]) == [
        "mp",
        "connect",
        "/dev/ttyACM1",
        "resume",
        "exec",
        "import isolator_app; isolator_app.status()",
    ]
    assert cli.mpremote_argv() == [sys.executable, "-m", "mpremote"]
    assert cli.mpremote_argv("/opt/mp --verbose") == ["/opt/mp", "--verbose"]


def test_dry_run_prints_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert optogate(["isolator", "flash", "--port", "/dev/ttyX", "--dry-run"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == cli.flash_command(
        "/dev/ttyX", ISOLATOR / "isolator.json", cli.mpremote_argv()
    )
    assert optogate(["isolator", "status", "--port", "/dev/ttyX", "--dry-run"]) == 0
    assert shlex.split(capsys.readouterr().out) == cli.status_command("/dev/ttyX")


def test_flash_refuses_an_invalid_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = suite.shipped_config()
    raw["rate"]["a->b"]["byte_burst"] = 100
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    code = optogate(["isolator", "flash", "--port", "/dev/x", "--config", str(bad), "--dry-run"])
    assert code == cli.EXIT_ERROR
    assert "byte_burst" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert optogate(["isolator", "check-config", str(tmp_path / "broken.json")]) == 2


def test_check_config_reports_the_allowlist(capsys: pytest.CaptureFixture[str]) -> None:
    assert optogate(["isolator", "check-config"]) == 0
    out = capsys.readouterr().out
    assert "'0x41'" in out
    assert "maintenance off" in out


def test_arguments_are_required() -> None:
    with pytest.raises(SystemExit):
        cli.main(["flash"], "optogate isolator")
    with pytest.raises(SystemExit):
        cli.main([], "optogate isolator")


def test_parse_status_takes_the_last_status_line() -> None:
    good = {"running": True, "error": None, "status": {"uptime_ms": 5}}
    output = "MPY: soft reboot\n{not json\n" + json.dumps({"x": 1}) + "\n" + json.dumps(good)
    assert cli.parse_status(output + "\n\n") == good
    with pytest.raises(BoardError, match="no status line"):
        cli.parse_status("Traceback (most recent call last):\nImportError: isolator_app\n")


def test_format_status_shows_counters_and_hides_zero_drops() -> None:
    status = {
        "uptime_ms": 1500,
        "steps": 10,
        "power": {"outer": 1, "inner": 0},
        "maintenance": False,
        "filter": {
            "a->b": {"frames_out": 3, "dropped_crc": 2, "dropped_kind": 0},
            "b->a": {"frames_out": 4, "dropped_crc": 0, "dropped_kind": 0},
        },
    }
    text = cli.format_status({"running": True, "error": None, "status": status})
    assert "uptime:  1.5 s" in text
    assert "outer=1 inner=0" in text
    assert "dropped_crc" in text
    assert "dropped_kind" not in text
    dead = cli.format_status({"running": False, "error": "start: OSError(2)", "status": None})
    assert dead.splitlines() == ["running: NO", "error:   start: OSError(2)"]


def test_a_missing_board_is_an_error_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    # the real mpremote, pointed at a port that does not exist
    assert optogate(["isolator", "status", "--port", "/dev/optogate-no-such-port"]) == 2
    assert "failed to access" in capsys.readouterr().err
    assert optogate(["isolator", "status", "--port", "/dev/x", "--mpremote", "no-such-tool"]) == 2
    assert "not found" in capsys.readouterr().err
