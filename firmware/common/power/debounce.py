"""Debounce core: a level counts once it has held for the debounce time.

Sans-I/O: it is told the raw level and the time (``update(level, now)``),
says when it next needs the time (``next_deadline()``) and, told that time
has come (``handle_deadline(now)``), reports the new stable level.

Rule: the stable level becomes L when the raw level has been L,
uninterrupted, for at least ``hold`` seconds.  A raw change back to the
stable level before then is a glitch: it is counted and forgotten.  So a
pulse of ``hold - 1 ms`` is never reported, and a change that lasts ``hold``
is reported at exactly ``since + hold`` if the caller honours the deadline.

Time never goes backwards here: a ``now`` earlier than one already seen
(an edge stamped on another thread just before a deadline ran) is taken as
the latest time seen.  The callers must therefore hand in a pending deadline
before a later edge (``PowerMonitor`` does) - otherwise a real change that
ended after its deadline would be mistaken for a glitch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StableChange:
    """The debounced level became ``level``: raw since ``since``, decided at ``at``."""

    level: bool
    since: float
    at: float


class Debouncer:
    """Debounce one boolean input; ``hold`` in seconds (> 0)."""

    def __init__(self, level: bool, hold: float, now: float) -> None:
        if not hold > 0:
            raise ValueError(f"hold must be positive, not {hold!r}")
        self.hold = hold
        self._stable = level
        self._raw = level
        self._since: float | None = None  # start of the raw change being timed
        self._now = now
        self.glitches = 0  # changes that reverted before ``hold``: noise, counted

    @property
    def stable(self) -> bool:
        """The debounced level."""
        return self._stable

    @property
    def raw(self) -> bool:
        """The last raw level seen."""
        return self._raw

    def _clamp(self, now: float) -> float:
        self._now = max(self._now, now)
        return self._now

    def update(self, level: bool, now: float) -> None:
        """The raw input is ``level`` as of ``now`` (repeats are harmless)."""
        now = self._clamp(now)
        if level == self._raw:
            return
        self._raw = level
        if level == self._stable:
            self._since = None
            self.glitches += 1
        else:
            self._since = now

    def next_deadline(self) -> float | None:
        """When the change being timed will count, or None."""
        return None if self._since is None else self._since + self.hold

    def handle_deadline(self, now: float) -> StableChange | None:
        """Apply the passage of time; return the change if one became stable."""
        now = self._clamp(now)
        deadline = self.next_deadline()
        if deadline is None or now < deadline or self._since is None:
            return None
        since, self._since = self._since, None
        self._stable = self._raw
        return StableChange(self._stable, since, now)
