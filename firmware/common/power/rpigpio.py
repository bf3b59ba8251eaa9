"""The ``rpigpio`` backend: RPi.GPIO on a Raspberry Pi.

RPi.GPIO is imported when this backend is created, never at module import,
so everything else runs on machines without it.  On a Pi 5 the RP1 chip is
not supported by RPi.GPIO itself; the rpi-lgpio package installs a module of
the same name and API over lgpio, and this backend works unchanged on it.
If the import fails, or RPi.GPIO refuses to run (it raises RuntimeError on a
machine that is not a Pi, or without access to /dev/gpiomem), the error is a
ConfigError that says which package to install - the daemon does not start
with a silently different backend.

Edges come from ``add_event_detect(BOTH)`` without ``bouncetime`` (the
debounce core needs every edge, see :mod:`.gpio`).  RPi.GPIO calls the
callback on its own thread with only the channel number; the level is read
back there, so two edges closer than that read may both report the later
level - harmless, the debounce core ignores a repeated level.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from firmware.common.errors import ConfigError

from .config import Pull
from .gpio import EdgeCallback, InputLine, OutputLine

#: What to install, by board, for the error message.
INSTALL_HINT = (
    "install the 'RPi.GPIO' package (Raspberry Pi 1-4) or 'rpi-lgpio' (Raspberry Pi 5; "
    "it provides the same RPi.GPIO module), for example `pip install optogate[pi]`, "
    "or set gpio.backend to 'sim' or 'none'"
)


def import_rpi_gpio() -> Any:
    """Import and return the RPi.GPIO module; raises ConfigError with an install hint."""
    try:
        import RPi.GPIO as gpio_module  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise ConfigError(
            f"GPIO backend 'rpigpio' needs RPi.GPIO, which is missing: {e}; " + INSTALL_HINT
        ) from e
    except RuntimeError as e:  # "This module can only be run on a Raspberry Pi!"
        raise ConfigError(f"GPIO backend 'rpigpio' cannot run here: {e}; " + INSTALL_HINT) from e
    return gpio_module


class _RpiInput:
    def __init__(self, gpio: Any, bcm: int) -> None:
        self._gpio = gpio
        self._bcm = bcm
        self._callback: EdgeCallback | None = None
        self._lock = threading.Lock()
        self._detecting = False

    @property
    def bcm(self) -> int:
        return self._bcm

    def read(self) -> bool | None:
        return bool(self._gpio.input(self._bcm))

    def _event(self, channel: int) -> None:
        stamp = time.monotonic()
        level = bool(self._gpio.input(channel))
        with self._lock:
            callback = self._callback
        if callback is not None:
            callback(level, stamp)

    def on_edge(self, callback: EdgeCallback | None) -> None:
        with self._lock:
            self._callback = callback
        if callback is not None and not self._detecting:
            self._gpio.add_event_detect(self._bcm, self._gpio.BOTH, callback=self._event)
            self._detecting = True
        elif callback is None and self._detecting:
            self._gpio.remove_event_detect(self._bcm)
            self._detecting = False


class _RpiOutput:
    def __init__(self, gpio: Any, bcm: int) -> None:
        self._gpio = gpio
        self._bcm = bcm

    @property
    def bcm(self) -> int:
        return self._bcm

    def write(self, level: bool) -> None:
        self._gpio.output(self._bcm, self._gpio.HIGH if level else self._gpio.LOW)


class RpiGpio:
    """The RPi.GPIO backend (BCM numbering).  Raises ConfigError if unavailable."""

    name = "rpigpio"

    def __init__(self) -> None:
        self._gpio = import_rpi_gpio()
        self._gpio.setwarnings(False)
        self._gpio.setmode(self._gpio.BCM)
        self._used: dict[int, str] = {}
        self._inputs: list[_RpiInput] = []

    def _claim(self, bcm: int, mode: str) -> None:
        if bcm in self._used:
            raise ConfigError(f"BCM {bcm} is already configured as an {self._used[bcm]}")
        self._used[bcm] = mode

    def input(self, bcm: int, pull: Pull) -> InputLine:
        """Configure ``bcm`` as an input with the SoC's ``pull`` resistor."""
        self._claim(bcm, "input")
        pud = {
            Pull.UP: self._gpio.PUD_UP,
            Pull.DOWN: self._gpio.PUD_DOWN,
            Pull.OFF: self._gpio.PUD_OFF,
        }[pull]
        self._gpio.setup(bcm, self._gpio.IN, pull_up_down=pud)
        line = _RpiInput(self._gpio, bcm)
        self._inputs.append(line)
        return line

    def output(self, bcm: int, initial: bool = False) -> OutputLine:
        """Configure ``bcm`` as an output at ``initial``."""
        self._claim(bcm, "output")
        level = self._gpio.HIGH if initial else self._gpio.LOW
        self._gpio.setup(bcm, self._gpio.OUT, initial=level)
        return _RpiOutput(self._gpio, bcm)

    def close(self) -> None:
        """Stop edge detection and return every pin we used to an input."""
        for line in self._inputs:
            line.on_edge(None)
        if self._used:
            self._gpio.cleanup(list(self._used))
        self._used.clear()
        self._inputs.clear()
