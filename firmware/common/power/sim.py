"""The ``sim`` GPIO backend: pins that tests or the link simulator drive.

Taken from gpiozero's mock pins: every :class:`SimPin` can be driven high or
low from outside (:meth:`SimPin.drive`, as the wire would), reports the edge
to the input callback, and records a timestamped history of its levels, so a
test can check what an LED did over time.  Pins exist from the first mention,
so a simulator may drive a pin before the daemon configures it.
:meth:`SimGpio.jumper` joins an output to an input like a wire on the header,
so one conformance suite runs against this backend and a real Pi.

What it does not model: electrical behaviour (contention when two outputs
meet, a floating input - an undriven input with no pull reads low, one with a
pull reads the pull's level), contact bounce other than the edges a test
drives, RPi.GPIO's ``bouncetime`` and event thread (callbacks run
synchronously in the thread that calls ``drive``), and the Pi's pin
multiplexing (any BCM number 0-27 works as GPIO here).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from firmware.common.errors import ConfigError, LocalProtocolError

from .config import Pull
from .gpio import EdgeCallback, InputLine, OutputLine


class SimPin:
    """One simulated pin: an input the outside drives, or an output we drive."""

    def __init__(self, bcm: int, clock: Callable[[], float]) -> None:
        self._bcm = bcm
        self._clock = clock
        self._lock = threading.Lock()
        self.mode: str | None = None  # None (unconfigured), "input" or "output"
        self.pull = Pull.OFF
        self._driven: bool | None = None  # level forced from outside, if any
        self._output = False
        self._callback: EdgeCallback | None = None
        self.jumpered: list[SimPin] = []  # inputs this pin drives when an output
        #: ``(timestamp, level)`` for every change of level, oldest first.
        self.history: list[tuple[float, bool]] = [(clock(), False)]

    @property
    def bcm(self) -> int:
        """The BCM pin number."""
        return self._bcm

    def _level_locked(self) -> bool:
        if self.mode == "output":
            return self._output
        if self._driven is not None:
            return self._driven
        return self.pull is Pull.UP

    @property
    def level(self) -> bool:
        """The level on the pin now."""
        with self._lock:
            return self._level_locked()

    def _change(self, update: Callable[[], None]) -> None:
        with self._lock:
            before = self._level_locked()
            update()
            after = self._level_locked()
            stamp = self._clock()
            if after != before:
                self.history.append((stamp, after))
            callback = self._callback if self.mode == "input" and after != before else None
        if callback is not None:
            callback(after, stamp)

    def drive(self, level: bool) -> None:
        """Force the pin to ``level`` from outside, as the wire would.

        Raises LocalProtocolError on an output: two drivers on one wire is
        the short circuit this fake does not model.
        """
        if self.mode == "output":
            raise LocalProtocolError(f"BCM {self._bcm} is an output; it cannot be driven")

        def update() -> None:
            self._driven = bool(level)

        self._change(update)

    def release(self) -> None:
        """Stop driving: the pin returns to its pull level."""

        def update() -> None:
            self._driven = None

        self._change(update)

    # -- InputLine ---------------------------------------------------------------

    def read(self) -> bool | None:
        """The current level."""
        return self.level

    def on_edge(self, callback: EdgeCallback | None) -> None:
        """Report level changes to ``callback`` (synchronously, in the driver's thread)."""
        with self._lock:
            self._callback = callback

    # -- OutputLine --------------------------------------------------------------

    def write(self, level: bool) -> None:
        """Set the output level (recorded in :attr:`history`)."""

        def update() -> None:
            self._output = bool(level)

        self._change(update)
        for other in self.jumpered:
            other.drive(bool(level))


class SimGpio:
    """The simulated backend; ``clock`` stamps edges and history."""

    name = "sim"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pins: dict[int, SimPin] = {}
        self._lock = threading.Lock()

    def pin(self, bcm: int) -> SimPin:
        """The pin ``bcm``, created (unconfigured) on first mention."""
        with self._lock:
            if bcm not in self._pins:
                self._pins[bcm] = SimPin(bcm, self._clock)
            return self._pins[bcm]

    def _claim(self, bcm: int, mode: str) -> SimPin:
        pin = self.pin(bcm)
        with self._lock:
            if pin.mode is not None:
                raise ConfigError(f"BCM {bcm} is already configured as an {pin.mode}")
            pin.mode = mode
        return pin

    def input(self, bcm: int, pull: Pull) -> InputLine:
        """Configure ``bcm`` as an input with ``pull``."""
        pin = self._claim(bcm, "input")

        def update() -> None:
            pin.pull = pull

        pin._change(update)
        return pin

    def output(self, bcm: int, initial: bool = False) -> OutputLine:
        """Configure ``bcm`` as an output at ``initial``."""
        pin = self._claim(bcm, "output")
        pin.write(initial)
        return pin

    def jumper(self, output_bcm: int, input_bcm: int) -> None:
        """Wire ``output_bcm`` to ``input_bcm``: the output's writes drive the input."""
        if output_bcm == input_bcm:
            raise ConfigError(f"cannot jumper BCM {output_bcm} to itself")
        self.pin(output_bcm).jumpered.append(self.pin(input_bcm))

    def close(self) -> None:
        """Unconfigure every pin (callbacks stop; history, drives and jumpers remain)."""
        with self._lock:
            pins = list(self._pins.values())
        for pin in pins:
            pin.on_edge(None)
            with pin._lock:
                pin.mode = None
