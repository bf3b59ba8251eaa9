"""Status LED patterns: which LED is lit, given the module's state and the time.

Sans-I/O: :class:`LedPatternCore` is told the state (``set_state(state,
now)``) and answers ``leds(now)`` (name -> lit) and ``next_deadline(now)``
(the next instant any LED changes, None if none will).  The asyncio driver
that writes the answers to output pins is
:class:`firmware.common.power.watcher.LedDriver`.

Two LEDs, named in config: ``status`` (green) and ``fault`` (red).

==========  ================  =========  =============================================
state       status (green)    fault      meaning
==========  ================  =========  =============================================
idle        slow blink        off        running, no link to the peer yet
dialling    fast blink        off        outer module: modem dialling / connecting
syncing     double flash      off        link up, fetching or relaying data
link_up     steady            off        link established, nothing in progress
error       off               fast blink needs attention (see `status`/logs)
==========  ================  =========  =============================================

Patterns (one period, times from the start of the period):

* steady - always on; off - never on.
* slow blink - 1 s period, on for the first 500 ms (1 Hz: "alive, waiting").
* fast blink - 200 ms period, on for 100 ms (5 Hz: "busy"; well under the
  3 Hz-and-up flash rates that matter only for large bright areas).
* double flash - 1.5 s period, on 0-100 ms and 250-350 ms (two short blinks
  then a pause: distinct from both blinks at a glance).

Every state change restarts the pattern at the start of its period, so the
new state shows at once (a pattern's period starts "on").
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass


class LinkState(enum.Enum):
    """What the status LEDs show."""

    IDLE = "idle"
    DIALLING = "dialling"
    SYNCING = "syncing"
    LINK_UP = "link_up"
    ERROR = "error"


@dataclass(frozen=True)
class Pattern:
    """A periodic pattern: lit during each ``[start, end)`` window of ``period``.

    ``period`` None means constant: lit if ``windows`` is non-empty.
    """

    name: str
    period: float | None
    windows: tuple[tuple[float, float], ...]

    def lit(self, phase: float) -> bool:
        """Whether the LED is lit ``phase`` seconds into a period."""
        return any(start <= phase < end for start, end in self.windows)

    def edges(self) -> list[float]:
        """The offsets within a period at which the LED changes."""
        return sorted({t for window in self.windows for t in window})


OFF = Pattern("off", None, ())
STEADY = Pattern("steady", None, ((0.0, math.inf),))
SLOW_BLINK = Pattern("slow blink", 1.0, ((0.0, 0.5),))
FAST_BLINK = Pattern("fast blink", 0.2, ((0.0, 0.1),))
DOUBLE_FLASH = Pattern("double flash", 1.5, ((0.0, 0.1), (0.25, 0.35)))

#: The LEDs the module has.
LEDS = ("status", "fault")

#: state -> pattern for each LED: the table in the module docstring.
STATE_PATTERNS: Mapping[LinkState, Mapping[str, Pattern]] = {
    LinkState.IDLE: {"status": SLOW_BLINK, "fault": OFF},
    LinkState.DIALLING: {"status": FAST_BLINK, "fault": OFF},
    LinkState.SYNCING: {"status": DOUBLE_FLASH, "fault": OFF},
    LinkState.LINK_UP: {"status": STEADY, "fault": OFF},
    LinkState.ERROR: {"status": OFF, "fault": FAST_BLINK},
}

#: Tolerance for float arithmetic on times: an instant within 1 us of an edge
#: counts as past it (no eye or GPIO resolves 1 us), so ``leds(deadline)``
#: always shows the change ``next_deadline`` announced.
EPSILON = 1e-6


class LedPatternCore:
    """The LED state machine: state and time in, LED levels out."""

    def __init__(self, now: float, state: LinkState = LinkState.IDLE) -> None:
        self._state = state
        self._since = now

    @property
    def state(self) -> LinkState:
        """The state being shown."""
        return self._state

    def set_state(self, state: LinkState, now: float) -> None:
        """Show ``state`` from ``now`` (same state again: the pattern carries on)."""
        if state is not self._state:
            self._state = state
            self._since = now

    def _phase(self, pattern: Pattern, now: float) -> tuple[float, float]:
        """(start of the current period, phase within it) for ``pattern``."""
        assert pattern.period is not None
        elapsed = max(0.0, now - self._since) + EPSILON
        cycles = math.floor(elapsed / pattern.period)
        return self._since + cycles * pattern.period, elapsed - cycles * pattern.period

    def leds(self, now: float) -> dict[str, bool]:
        """Which LEDs are lit at ``now``."""
        lit: dict[str, bool] = {}
        for led, pattern in STATE_PATTERNS[self._state].items():
            if pattern.period is None:
                lit[led] = bool(pattern.windows)
            else:
                lit[led] = pattern.lit(self._phase(pattern, now)[1])
        return lit

    def next_deadline(self, now: float) -> float | None:
        """The next instant after ``now`` at which any LED changes, or None."""
        best: float | None = None
        for pattern in STATE_PATTERNS[self._state].values():
            if pattern.period is None:
                continue
            start, _ = self._phase(pattern, now)
            for offset in (*pattern.edges(), pattern.period + pattern.edges()[0]):
                instant = start + offset
                if instant > now + EPSILON:
                    if best is None or instant < best:
                        best = instant
                    break
        return best
