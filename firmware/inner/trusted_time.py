"""Trusted time for the inner module: central's signed time, carried forward by a monotonic clock.

The inner module decides "is this licence still paid for?" and "is this sync
metadata still fresh?" by the clock.  It has no network time (no route to
the internet), a Raspberry Pi has no battery-backed clock, and the customer
owns the box and its wall clock.  So the wall clock is never read.  Instead:

* **Signed time.**  Every sync metadata object central sends carries its
  ``created`` time under central's signature.  When one is accepted the
  caller calls :meth:`TrustedClock.observe_signed_time` with it and the
  *monotonic* clock reading at that moment: the pair is the anchor.
* **Carried forward.**  ``now(mono) = anchor_time + (mono - anchor_mono)``:
  the monotonic clock (CLOCK_MONOTONIC) counts how long the inner has been
  running since the anchor and cannot be set by anyone.
* **High-water mark.**  Trusted time never goes backwards: ``now`` is never
  below the highest value ever returned, and that mark is persisted
  (:class:`TrustedTimeStore`, atomic writes) so it survives reboots.  After a
  reboot and before the first signed time, time starts from the mark and
  runs forward with the new boot's monotonic clock.
* **Same boot, new process.**  If the daemon restarts without a reboot
  (same kernel ``boot_id``), the persisted anchor still holds, so no time is
  lost while the process was down.

What each attack meets:

=====================================  ======================================
attack                                 answer
=====================================  ======================================
wind the wall clock back               never read; no effect
wind the wall clock far forward        never read; no effect
reboot to reset the clock              persisted high-water mark
replay old metadata to a fresh box     ``floor``: the provisioning time
replay old signed time (old metadata)  ignored: time only moves forward
cut power and keep it off for months   powered-off time is not counted (no
                                       RTC) - the box does not work while
                                       off, and sync metadata still expires
                                       after the window of *running* time
                                       once it is back on; reaching central
                                       resynchronises at once
corrupt the persisted state file       refused (TrustedTimeCorrupt), never
                                       reset to zero
=====================================  ======================================

A signed time later than trusted time moves it forward; one earlier is
ignored (a delayed or replayed object).  The core is pure: it takes
``mono`` (seconds, float) and signed times as inputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from firmware.common.errors import OptogateError
from firmware.common.store.atomic import atomic_write

#: Persist the high-water mark at most this often (seconds of trusted time):
#: an SD card wears out with constant writes, and after a power cut we lose at
#: most this much running time, which only ever favours the vendor.
PERSIST_INTERVAL = 60

#: Persisted state format.
STATE_FORMAT = 1


class TrustedTimeCorrupt(OptogateError, ValueError):
    """The persisted trusted-time state cannot be read; refusing to start from zero."""


@dataclass(frozen=True)
class TimeState:
    """What persists across restarts: the mark, and the anchor of the boot that wrote it."""

    high_water: int
    boot_id: str
    anchor_time: int | None
    anchor_mono: float | None

    def to_json(self) -> bytes:
        """Return the persisted form."""
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "high_water": self.high_water,
                "boot_id": self.boot_id,
                "anchor_time": self.anchor_time,
                "anchor_mono": self.anchor_mono,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TimeState:
        """Return the state in ``data``; raise TrustedTimeCorrupt if it is not one."""
        try:
            doc = json.loads(data)
            hw, boot = doc["high_water"], doc["boot_id"]
            at, am = doc["anchor_time"], doc["anchor_mono"]
            if doc["format"] != STATE_FORMAT or type(hw) is not int or hw < 0:
                raise ValueError("high_water")
            if not isinstance(boot, str):
                raise ValueError("boot_id")
            if (at is None) != (am is None):
                raise ValueError("anchor")
            if at is not None and (type(at) is not int or not isinstance(am, int | float)):
                raise ValueError("anchor")
            if am is not None and not math.isfinite(am):
                raise ValueError("anchor_mono")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise TrustedTimeCorrupt("trusted time state is corrupt") from e
        return cls(
            high_water=hw,
            boot_id=boot,
            anchor_time=at,
            anchor_mono=None if am is None else float(am),
        )


class TrustedClock:
    """The sans-I/O trusted clock.  All times are integer Unix seconds; ``mono`` is float seconds.

    Construct one per process with the persisted state (or None on first
    boot), this boot's id and the monotonic clock now.  ``floor`` is a time
    the gateway is known to be past: its provisioning time (``created`` in
    gateway.json).  Without it, a factory-fresh inner module would start at
    0 and take the first signed time it sees, however old, as "now".
    """

    def __init__(
        self, state: TimeState | None, *, boot_id: str, mono: float, floor: int = 0
    ) -> None:
        self._boot_id = boot_id
        self._high_water = max(floor, 0 if state is None else state.high_water)
        self._persisted = self._high_water
        self._anchor_time: int
        self._anchor_mono: float
        if (
            state is not None
            and state.boot_id == boot_id
            and state.anchor_time is not None
            and state.anchor_mono is not None
            and state.anchor_mono <= mono
        ):
            # Same boot: the monotonic clock kept counting while we were down.
            self._anchor_time, self._anchor_mono = state.anchor_time, state.anchor_mono
        else:
            # New boot (or first): run forward from the mark.
            self._anchor_time, self._anchor_mono = self._high_water, mono
        self._synchronised = False

    @property
    def synchronised(self) -> bool:
        """True once this clock has observed a signed time (central reached since start)."""
        return self._synchronised

    def now(self, mono: float) -> int:
        """Return trusted time at monotonic reading ``mono``; never less than before."""
        elapsed = max(0.0, mono - self._anchor_mono)
        current = max(self._high_water, self._anchor_time + math.floor(elapsed))
        self._high_water = current
        return current

    def observe_signed_time(self, signed_time: int, mono: float) -> bool:
        """Take central's signed time, seen at ``mono``; return True if it moved time forward.

        An earlier signed time (a replay or a slow relay) changes nothing.
        Raises ValueError for a negative or non-integer time (a caller bug).
        """
        if type(signed_time) is not int or signed_time < 0:
            raise ValueError("signed time must be a non-negative integer")
        current = self.now(mono)
        self._synchronised = True
        if signed_time <= current:
            return False
        self._anchor_time, self._anchor_mono = signed_time, mono
        self._high_water = signed_time
        return True

    def state(self, mono: float) -> TimeState:
        """Return the state to persist now (also marks it as persisted)."""
        current = self.now(mono)
        self._persisted = current
        return TimeState(
            high_water=current,
            boot_id=self._boot_id,
            anchor_time=self._anchor_time,
            anchor_mono=self._anchor_mono,
        )

    def should_persist(self, mono: float) -> bool:
        """Return True when the mark has moved PERSIST_INTERVAL or more since last persisted."""
        return self.now(mono) - self._persisted >= PERSIST_INTERVAL


class TrustedTimeStore:
    """Reads and atomically replaces the one small file holding :class:`TimeState`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def load(self) -> TimeState | None:
        """Return the persisted state, or None if there is none yet.

        Raises TrustedTimeCorrupt if the file exists but is unreadable or malformed.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TrustedTimeCorrupt(f"cannot read {self.path}: {e}") from e
        return TimeState.from_json(data)

    def save(self, state: TimeState) -> None:
        """Replace the persisted state atomically (mode 0600); raise StorageError."""
        atomic_write(self.path, state.to_json())
