"""The GPIO seam: inputs with edge callbacks, outputs, and the backends behind it.

Theory of operation
-------------------
A :class:`GpioBackend` hands out :class:`InputLine` and :class:`OutputLine`
objects by BCM number.  Levels are *electrical* (True = high); what a level
means (peer powered, LED lit) is configuration (:mod:`.config`) applied by
the callers.  An input reports every edge it sees to one callback as
``(level, timestamp)``, the timestamp on the ``time.monotonic`` clock.
Callbacks may run on a backend thread (RPi.GPIO's event thread does), so the
asyncio adapters hop to their loop with ``call_soon_threadsafe``.

Debounce is deliberately *not* done by the backends but by the sans-I/O
:mod:`.debounce` core: RPi.GPIO's ``bouncetime`` drops every edge for a time
after the first one, so a glitch shorter than it can leave the reported level
wrong until the next edge.  The core needs the raw edges to get that right.

Backends, named in config (``gpio.backend``) and loaded by :func:`load_backend`:

``rpigpio``
    RPi.GPIO on a Raspberry Pi (:mod:`.rpigpio`); on a Pi 5 the rpi-lgpio
    package provides the same module.  Imported only when chosen.  If it
    cannot be imported the error names the package to install.
``sim``
    :class:`~firmware.common.power.sim.SimGpio`: pins driven by tests or by the
    link simulator (:mod:`.simlink`).
``none``
    :class:`NoGpio`: the module has no GPIO wiring.  Inputs read ``None``
    (unknown) and never report an edge, so the power monitor treats the peer
    and our supply as powered and never reports a loss; a dead peer is then
    found only by the link's keepalives.  Outputs accept writes and do
    nothing (no LEDs).  It is a choice made in config, never a fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from firmware.common.errors import ConfigError

from .config import BACKENDS, Pull

#: ``callback(level, timestamp)``: the input is now at ``level`` (True = high).
EdgeCallback = Callable[[bool, float], None]


class InputLine(Protocol):
    """One GPIO input."""

    @property
    def bcm(self) -> int:
        """The BCM pin number."""
        ...

    def read(self) -> bool | None:
        """The current level, or None if this backend cannot sense it."""
        ...

    def on_edge(self, callback: EdgeCallback | None) -> None:
        """Report every level change to ``callback`` (None stops reporting)."""
        ...


class OutputLine(Protocol):
    """One GPIO output."""

    @property
    def bcm(self) -> int:
        """The BCM pin number."""
        ...

    def write(self, level: bool) -> None:
        """Drive the pin high (True) or low (False)."""
        ...


class GpioBackend(Protocol):
    """A source of input and output lines."""

    name: str

    def input(self, bcm: int, pull: Pull) -> InputLine:
        """Configure ``bcm`` as an input with ``pull``; raises ConfigError if taken."""
        ...

    def output(self, bcm: int, initial: bool = False) -> OutputLine:
        """Configure ``bcm`` as an output at ``initial``; raises ConfigError if taken."""
        ...

    def close(self) -> None:
        """Release every line (outputs go back to inputs where the hardware can)."""
        ...


class _NoInput:
    def __init__(self, bcm: int) -> None:
        self._bcm = bcm

    @property
    def bcm(self) -> int:
        return self._bcm

    def read(self) -> bool | None:
        return None

    def on_edge(self, callback: EdgeCallback | None) -> None:
        """Nothing to report: there is no wire."""


class _NoOutput:
    def __init__(self, bcm: int) -> None:
        self._bcm = bcm

    @property
    def bcm(self) -> int:
        return self._bcm

    def write(self, level: bool) -> None:
        """Ignored: there is no wire."""


class NoGpio:
    """The ``none`` backend: no GPIO wiring at all (see the module docstring)."""

    name = "none"

    def input(self, bcm: int, pull: Pull) -> InputLine:
        """An input that always reads None (unknown) and never has an edge."""
        return _NoInput(bcm)

    def output(self, bcm: int, initial: bool = False) -> OutputLine:
        """An output whose writes go nowhere."""
        return _NoOutput(bcm)

    def close(self) -> None:
        """Nothing to release."""


def load_backend(name: str) -> GpioBackend:
    """Return a new backend called ``name``.

    Raises ConfigError for an unknown name, or when the ``rpigpio`` backend's
    library is missing or refuses this machine (the message says what to
    install).  Never falls back to another backend.
    """
    if name == "none":
        return NoGpio()
    if name == "sim":
        from .sim import SimGpio

        return SimGpio()
    if name == "rpigpio":
        from .rpigpio import RpiGpio

        return RpiGpio()
    raise ConfigError(f"unknown GPIO backend {name!r}: choose one of {', '.join(BACKENDS)}")
