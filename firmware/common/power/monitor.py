"""Power monitor core: debounced power lines in, power events out.

Sans-I/O, in the house style: ``input_changed(signal, asserted, now)`` feeds
a (logical) level, ``next_deadline()`` / ``handle_deadline(now)`` move time,
``next_event()`` hands out events in order.  The asyncio adapter is
:class:`firmware.common.power.watcher.PowerWatcher`.

Two signals, each through its own :class:`~.debounce.Debouncer`:

* ``PEER_POWER`` - the other module's supply, seen through an optocoupler.
  Losing it means the peer is dead *now*: the link session fails its
  exchanges at once instead of waiting for keepalives.
* ``OWN_POWER`` - our own supply's power-good (or a UPS's not-low) line.
  Losing it means we have seconds, at best, to stop writing.

Guarantee: a change that holds for ``debounce`` is reported at
``since + debounce`` (the event's ``at``); the configuration caps debounce
at 80 ms so that, with up to 20 ms of timer and callback latency in the
adapter, a real loss is reported within 100 ms.  A glitch shorter than
``debounce`` is never reported; it is counted in :meth:`statistics`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from .debounce import Debouncer, StableChange


class Signal(enum.Enum):
    """The inputs the monitor watches."""

    PEER_POWER = "peer_power"
    OWN_POWER = "own_power"


@dataclass(frozen=True)
class PeerPowerLost:
    """The peer's supply went away at ``since``; decided at ``at``."""

    since: float
    at: float


@dataclass(frozen=True)
class PeerPowerRestored:
    """The peer's supply came back at ``since``; decided at ``at``."""

    since: float
    at: float


@dataclass(frozen=True)
class OwnPowerFailing:
    """Our own supply reported not-good at ``since``; decided at ``at``."""

    since: float
    at: float


@dataclass(frozen=True)
class OwnPowerRestored:
    """Our own supply is good again since ``since``; decided at ``at``."""

    since: float
    at: float


PowerEvent = PeerPowerLost | PeerPowerRestored | OwnPowerFailing | OwnPowerRestored

# (signal, new asserted level) -> event class: the whole decision table.
_EVENTS: dict[
    tuple[Signal, bool],
    type[PeerPowerLost] | type[PeerPowerRestored] | type[OwnPowerFailing] | type[OwnPowerRestored],
] = {
    (Signal.PEER_POWER, False): PeerPowerLost,
    (Signal.PEER_POWER, True): PeerPowerRestored,
    (Signal.OWN_POWER, False): OwnPowerFailing,
    (Signal.OWN_POWER, True): OwnPowerRestored,
}


class PowerMonitor:
    """Debounce the power lines and emit power events.

    ``peer_powered`` / ``own_power_good`` are the levels at start (no event
    is emitted for them); ``debounce`` is in seconds.
    """

    def __init__(
        self, *, peer_powered: bool, own_power_good: bool, debounce: float, now: float
    ) -> None:
        self._inputs = {
            Signal.PEER_POWER: Debouncer(peer_powered, debounce, now),
            Signal.OWN_POWER: Debouncer(own_power_good, debounce, now),
        }
        self._events: deque[PowerEvent] = deque()
        self._reported = 0

    @property
    def peer_powered(self) -> bool:
        """The debounced peer power state."""
        return self._inputs[Signal.PEER_POWER].stable

    @property
    def own_power_good(self) -> bool:
        """The debounced state of our own supply."""
        return self._inputs[Signal.OWN_POWER].stable

    def input_changed(self, signal: Signal, asserted: bool, now: float) -> None:
        """``signal`` is ``asserted`` (powered / good) as of ``now``."""
        # A deadline that passed before this edge counts first: the old level
        # did hold for the debounce time.
        self.handle_deadline(now)
        self._inputs[signal].update(asserted, now)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_deadline` must be called, or None."""
        deadlines = [d for d in (i.next_deadline() for i in self._inputs.values()) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_deadline(self, now: float) -> None:
        """Apply the passage of time up to ``now``; may queue events."""
        changes: list[tuple[StableChange, Signal]] = []
        for signal, debouncer in self._inputs.items():
            change = debouncer.handle_deadline(now)
            if change is not None:
                changes.append((change, signal))
        for change, signal in sorted(changes, key=lambda c: c[0].since):
            self._events.append(_EVENTS[signal, change.level](change.since, change.at))
            self._reported += 1

    def next_event(self) -> PowerEvent | None:
        """The oldest queued event, or None."""
        return self._events.popleft() if self._events else None

    def statistics(self) -> dict[str, int]:
        """Counters: events reported, glitches ignored per signal."""
        stats = {"events": self._reported}
        for signal, debouncer in self._inputs.items():
            stats[f"{signal.value}_glitches"] = debouncer.glitches
        return stats
