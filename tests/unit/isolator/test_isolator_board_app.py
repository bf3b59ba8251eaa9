"""The board's composition root (board/isolator_app.py) against a fake ``machine`` module.

The RP2040's ``machine`` cannot run here; this fake builds its UARTs and pins
from fakeboard.py and its watchdog stops the loop after a number of feeds, so
the real ``_thread`` loop ends and the test can inspect what it did.
"""

import importlib
import json
import shutil
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.common.link.framing import FrameType
from firmware.isolator import fakeboard, suite
from firmware.isolator.filtercore import A_TO_B

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

ISOLATOR = Path(suite.__file__).parent
FEEDS_BEFORE_STOP = 50


class LoopStopped(Exception):
    """Raised by the fake watchdog to end the board loop."""


def fake_machine() -> types.ModuleType:
    machine = types.ModuleType("machine")
    made: dict[str, Any] = {"uarts": [], "pins": {}, "wdt": []}

    class Pin(fakeboard.FakePin):
        IN, OUT, PULL_UP, PULL_DOWN = 0, 1, 3, 2

        def __init__(self, ident: object, mode: int = 0, pull: int = 0, value: int = 0) -> None:
            super().__init__(value)
            self.mode, self.pull = mode, pull
            made["pins"][ident] = self

    class UART(fakeboard.FakeUart):
        def __init__(self, ident: int, **kwargs: Any) -> None:
            super().__init__()
            self.ident, self.kwargs = ident, kwargs
            if ident == 0:  # the outer module has something to say
                self.inject(suite.control_frame(FrameType.PING, A_TO_B))
            made["uarts"].append(self)

    class WDT(fakeboard.FakeWdt):
        def __init__(self, timeout: int) -> None:
            super().__init__()
            self.timeout = timeout
            made["wdt"].append(self)

        def feed(self) -> None:
            super().feed()
            if self.feeds >= FEEDS_BEFORE_STOP:
                raise LoopStopped("enough")

    machine.Pin, machine.UART, machine.WDT = Pin, UART, WDT  # type: ignore[attr-defined]
    machine.made = made  # type: ignore[attr-defined]
    return machine


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    machine = fake_machine()
    monkeypatch.setitem(sys.modules, "machine", machine)
    monkeypatch.setattr(time, "ticks_ms", lambda: int(time.monotonic() * 1000), raising=False)
    monkeypatch.setattr(time, "ticks_diff", lambda a, b: a - b, raising=False)
    monkeypatch.syspath_prepend(str(ISOLATOR))
    monkeypatch.syspath_prepend(str(ISOLATOR / "board"))
    monkeypatch.chdir(tmp_path)
    shutil.copy(ISOLATOR / "isolator.json", tmp_path / "isolator.json")
    for name in ("isolator_app", "filtercore", "pump"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield machine
    for name in ("isolator_app", "filtercore", "pump"):
        sys.modules.pop(name, None)


def wait_stopped(app: types.ModuleType) -> None:
    deadline = time.monotonic() + 10
    while app._state["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not app._state["running"], "the board loop did not stop"


def test_start_runs_the_loop_and_status_prints_json(
    board: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    app = importlib.import_module("isolator_app")
    assert app.start() is True
    wait_stopped(app)
    made = board.made
    outer, inner = made["uarts"]
    assert (outer.ident, inner.ident) == (0, 1)
    assert outer.kwargs["baudrate"] == 1_000_000
    assert outer.kwargs["timeout"] == 0
    assert inner.take() == suite.control_frame(FrameType.PING, A_TO_B)
    assert made["wdt"][0].timeout == 5000
    assert made["wdt"][0].feeds == FEEDS_BEFORE_STOP
    assert made["pins"][10].level == made["pins"][11].level == 1  # own power lines
    assert made["pins"][2].pull == board.Pin.PULL_UP  # power sense is active low
    # the fake pins read 0: with active-low sense both modules count as powered
    assert made["pins"][3].level == made["pins"][7].level == 1
    app.status()
    printed = json.loads(capsys.readouterr().out)
    assert printed["running"] is False
    assert "LoopStopped" in printed["error"]  # the loop died: the watchdog will reset
    assert printed["status"]["filter"][A_TO_B]["frames_out"] == 1


def test_bad_configuration_fails_closed(
    board: types.ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = json.loads((tmp_path / "isolator.json").read_text())
    raw["kinds"]["0xC1"] = {"max_msg": 1}
    (tmp_path / "isolator.json").write_text(json.dumps(raw))
    app = importlib.import_module("isolator_app")
    assert app.start() is False
    assert board.made["uarts"] == []  # nothing opened, nothing forwarded
    assert board.made["wdt"] == []
    app.status()
    printed = json.loads(capsys.readouterr().out)
    assert printed["running"] is False
    assert "no allowed range" in printed["error"]
    assert printed["status"] is None
