"""The simulated optical UART line: pacing and impairments (sans-I/O).

Theory of operation
-------------------
The optocoupled link is two independent one-way UART lines, ``a->b`` and
``b->a`` (side ``a`` is the outer module, side ``b`` the inner).  Each line is
modelled by a :class:`_Lane`:

1. **Transmit FIFO.**  :meth:`LineModel.transmit` puts bytes in the sending
   side's FIFO.  A byte starts on the wire when the line is free and takes
   ``10 / baud`` seconds (8N1: start bit, 8 data bits, stop bit), so a busy
   line carries exactly ``baud / 10`` bytes per second (a token bucket one
   byte deep, refilled at the line rate, keeping each byte's exact time).
   The model never
   refuses bytes; instead :meth:`LineModel.room` says how many more the FIFO
   holds, and the adapter reads from its pty only that many.  That keeps the
   simulator's own buffering as small as a UART's instead of a pty's kilobytes,
   so a sender that writes faster than the line is held back by its own
   ``write()`` blocking, as on the real port.
2. **On the wire.**  When a byte's last bit has left (its *end time*), the
   impairments in force at that instant are applied: if either side is
   powered off the byte is lost (``lost_power``); if the line is cut it is
   lost (``lost_cut``); otherwise it may be dropped whole (probability
   ``drop``) and each of its 8 data bits may be flipped (probability ``ber``).
3. **Delivery.**  A surviving byte reaches the far side's receiver at
   ``end time + latency`` (never before a byte sent earlier).  If no program
   holds the far side open at that moment, nobody is listening: the byte is
   lost (``lost_unheard``), as on hardware where an unlistened UART simply
   drops what arrives.

Every method takes the current time ``now`` (seconds, any monotonic origin)
and first advances the model to it, so a state change (cut, power, new
impairments) applies exactly to the bytes whose end time comes after it, and
the result does not depend on how often the caller polls.
:meth:`LineModel.next_deadline` says when something next happens (a byte
finishes, a delivery falls due), for the adapter's timer.

Random decisions come from one seeded :class:`random.Random`.  Instead of one
draw per bit, the distance to the next flipped bit (and to the next dropped
byte) is drawn from the geometric distribution, so a clean megabyte costs no
draws at all and the outcome for a seed does not depend on how the stream is
chunked.

What the model does not do: no modem-control lines (there are none on the
optical link); no framing, parity or break errors (start and stop bits are
never corrupted, so a flipped bit never shifts byte alignment); no clock
skew between the two UARTs; no receive FIFO overrun (the adapter counts pty
overruns separately); the optocouplers' rise/fall times and the isolator's
processing delay are folded into the constant ``latency``.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Final

from firmware.common.errors import ConfigError, OptogateError

SIDES: Final = ("a", "b")
DIRECTIONS: Final = ("a->b", "b->a")

#: 8N1 framing: one start bit, eight data bits, one stop bit per byte.
BITS_PER_BYTE_ON_WIRE: Final = 10
#: Only the data bits are subject to bit errors (see module docstring).
DATA_BITS: Final = 8

#: Smallest transmit FIFO, in bytes.  The Pi's PL011 UART has a 32-byte FIFO
#: and its mini UART 8; 16 is between the two.
MIN_FIFO_BYTES: Final = 16
#: The FIFO also holds this many seconds of line time, so an adapter that
#: wakes every couple of milliseconds keeps a fast line busy (at 921600 baud,
#: 4 ms is 369 bytes; at 115200 baud it is 46).
FIFO_SECONDS: Final = 0.004

#: Largest accepted latency: a minute is far beyond any optocoupler and
#: catches a value given in milliseconds by mistake.
MAX_LATENCY: Final = 60.0
#: Accepted baud rates: 50 baud (slowest classic UART) to 12 Mbaud.
MIN_BAUD: Final = 50
MAX_BAUD: Final = 12_000_000


class LinkSimError(OptogateError):
    """Root of the link simulator's errors."""


class ImpairmentError(LinkSimError, ConfigError):
    """A baud rate, error rate, drop rate or latency is out of range."""


class UnknownSide(LinkSimError, ValueError):
    """A side other than ``"a"`` or ``"b"`` (or a bad direction) was named."""


@dataclass(frozen=True)
class Impairments:
    """What the line does to bytes: bit-error rate, byte drop rate, latency (s).

    Raises :class:`ImpairmentError` when a rate is not in [0, 1] or the
    latency is not in [0, ``MAX_LATENCY``].
    """

    ber: float = 0.0
    drop: float = 0.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ber", "drop"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ImpairmentError(f"{name} must be a number in [0, 1], got {value!r}")
        if not _is_number(self.latency) or not 0.0 <= self.latency <= MAX_LATENCY:
            raise ImpairmentError(
                f"latency must be a number of seconds in [0, {MAX_LATENCY}], got {self.latency!r}"
            )


@dataclass(frozen=True)
class PowerChanged:
    """A side's power state changed (what a power-sense GPIO would see)."""

    side: str
    on: bool


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_side(side: object) -> str:
    """Return ``side`` if it is ``"a"`` or ``"b"``; raise :class:`UnknownSide` otherwise."""
    if side not in SIDES:
        raise UnknownSide(f"side must be 'a' or 'b', got {side!r}")
    assert isinstance(side, str)
    return side


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


#: A gap so long it never ends in practice (for probabilities so small that
#: the geometric draw overflows a float).
_NEVER: Final = 1 << 62


class _Gaps:
    """Distances to the next rare event, drawn from the geometric distribution.

    ``gap`` is how many trials pass before the next success (0: the very next
    trial succeeds); ``None`` means never (probability 0).
    """

    def __init__(self, rng: random.Random, p: float) -> None:
        self._rng = rng
        self._p = p
        self.gap: int | None = self._draw()

    def _draw(self) -> int | None:
        if self._p <= 0.0:
            return None
        if self._p >= 1.0:
            return 0
        u = self._rng.random()
        denominator = math.log1p(-self._p)
        if denominator == 0.0:
            return _NEVER
        gap = math.log1p(-u) / denominator
        return _NEVER if not gap < _NEVER else int(gap)

    def set_probability(self, p: float) -> None:
        # Memoryless: redrawing on a change is exact, not an approximation.
        if p != self._p:
            self._p = p
            self.gap = self._draw()

    def hits(self, trials: int) -> list[int]:
        """Return the indexes in ``range(trials)`` that succeed, advancing the stream."""
        found: list[int] = []
        pos = 0
        while self.gap is not None and pos + self.gap < trials:
            pos += self.gap
            found.append(pos)
            pos += 1
            self.gap = self._draw()
        if self.gap is not None:
            self.gap -= trials - pos
        return found


@dataclass
class _Counters:
    bytes_in: int = 0  # accepted from the sender
    bytes_delivered: int = 0  # handed to the receiver
    bits_flipped: int = 0
    bytes_dropped: int = 0
    lost_cut: int = 0
    lost_power: int = 0
    lost_unheard: int = 0  # the receiving side was not open
    overrun: int = 0  # reported by the adapter: the receiver's buffer was full


class _Lane:
    """One direction of the line: transmit FIFO, wire, delivery queue."""

    def __init__(self, byte_time: float, seeds: random.Random, imp: Impairments) -> None:
        self.byte_time = byte_time
        self.line_free_at = -math.inf
        # chunks waiting for / on the wire: [data, start time of data[0]]
        self.tx: deque[tuple[bytes, float]] = deque()
        self.backlog = 0
        # surviving bytes on their way to the receiver: (due time, data)
        self.rx: deque[tuple[float, bytes]] = deque()
        self.last_due = -math.inf
        # A generator per process: drawing drops and flips from one stream
        # would make the outcome depend on how the bytes were chunked.
        self.drops = _Gaps(random.Random(seeds.getrandbits(64)), imp.drop)
        self.flips = _Gaps(random.Random(seeds.getrandbits(64)), imp.ber)
        self.counters = _Counters()

    def transmit(self, data: bytes, now: float) -> None:
        start = max(now, self.line_free_at)
        self.tx.append((data, start))
        self.line_free_at = start + len(data) * self.byte_time
        self.backlog += len(data)
        self.counters.bytes_in += len(data)

    def advance(self, now: float, silent: str | None, cut: bool, latency: float) -> None:
        """Put every byte whose end time is <= now through the impairments."""
        while self.tx:
            data, start = self.tx[0]
            # Round so a byte ending exactly at ``now`` counts as done despite
            # floating-point error in start + k * byte_time.
            done = min(len(data), math.floor((now - start) / self.byte_time + 1e-9))
            if done <= 0:
                return
            sent, rest = data[:done], data[done:]
            if rest:
                self.tx[0] = (rest, start + done * self.byte_time)
            else:
                self.tx.popleft()
            self.backlog -= done
            end = start + done * self.byte_time
            self._impair(sent, end, silent, cut, latency)

    def _impair(
        self, sent: bytes, end: float, silent: str | None, cut: bool, latency: float
    ) -> None:
        c = self.counters
        if silent is not None:
            c.lost_power += len(sent)
            return
        if cut:
            c.lost_cut += len(sent)
            return
        dropped = set(self.drops.hits(len(sent)))
        if dropped:
            c.bytes_dropped += len(dropped)
            kept = bytearray(b for i, b in enumerate(sent) if i not in dropped)
        else:
            kept = bytearray(sent)
        for bit in self.flips.hits(len(kept) * DATA_BITS):
            kept[bit // DATA_BITS] ^= 1 << (bit % DATA_BITS)
            c.bits_flipped += 1
        if kept:
            due = max(end + latency, self.last_due)
            self.last_due = due
            self.rx.append((due, bytes(kept)))

    def take_due(self, now: float) -> bytes:
        out = bytearray()
        while self.rx and self.rx[0][0] <= now:
            out += self.rx.popleft()[1]
        return bytes(out)

    def in_flight(self) -> int:
        return self.backlog + sum(len(d) for _, d in self.rx)

    def next_deadline(self) -> float | None:
        times = []
        if self.tx:
            times.append(self.tx[0][1] + self.byte_time)
        if self.rx:
            times.append(self.rx[0][0])
        return min(times) if times else None


class LineModel:
    """Both directions of the simulated UART line, with cut and power state.

    ``baud`` is the line rate in bits per second (8N1, so ``baud / 10``
    bytes per second); ``seed`` makes every random decision replayable.
    Raises :class:`ImpairmentError` for a baud rate outside
    [``MIN_BAUD``, ``MAX_BAUD``].
    """

    def __init__(self, baud: int, impairments: Impairments | None = None, seed: int = 1) -> None:
        if isinstance(baud, bool) or not isinstance(baud, int) or not MIN_BAUD <= baud <= MAX_BAUD:
            raise ImpairmentError(f"baud must be an integer in [{MIN_BAUD}, {MAX_BAUD}]")
        self.baud = baud
        self.byte_time = BITS_PER_BYTE_ON_WIRE / baud
        self.fifo_bytes = max(MIN_FIFO_BYTES, math.ceil(FIFO_SECONDS / self.byte_time))
        self._imp = impairments or Impairments()
        # Every random process (per direction: drops, flips) has its own
        # generator seeded from this one, so traffic in one direction does not
        # change the fate of bytes in the other.
        seeds = random.Random(seed)
        self._lanes = {d: _Lane(self.byte_time, seeds, self._imp) for d in DIRECTIONS}
        self._cut = False
        self._power = {"a": True, "b": True}
        self._listening = {"a": True, "b": True}
        self._now = -math.inf

    # -- time ---------------------------------------------------------------

    def advance(self, now: float) -> float:
        """Bring both directions up to ``now``; return the effective time.

        Time never runs backwards for the model: an earlier ``now`` is treated
        as the latest one seen.
        """
        now = max(now, self._now)
        self._now = now
        for direction, lane in self._lanes.items():
            src, dst = direction.split("->")
            silent = next((s for s in (src, dst) if not self._power[s]), None)
            lane.advance(now, silent, self._cut, self._imp.latency)
        return now

    def next_deadline(self) -> float | None:
        """Return when the model next changes (a byte ends or falls due), or None if idle."""
        times = [t for lane in self._lanes.values() if (t := lane.next_deadline()) is not None]
        return min(times) if times else None

    # -- bytes ----------------------------------------------------------------

    def room(self, side: str, now: float) -> int:
        """Return how many bytes ``side``'s transmit FIFO can take now (0 when full).

        Raises :class:`UnknownSide`.
        """
        lane = self._lanes[f"{check_side(side)}->{_other(side)}"]
        self.advance(now)
        return max(0, self.fifo_bytes - lane.backlog)

    def transmit(self, side: str, data: bytes, now: float) -> None:
        """Queue ``data`` for transmission from ``side``; never refuses bytes.

        Callers should send at most :meth:`room` bytes at a time; more only
        lengthens the queue.  Raises :class:`UnknownSide`.
        """
        check_side(side)
        now = self.advance(now)
        if data:
            self._lanes[f"{side}->{_other(side)}"].transmit(bytes(data), now)

    def receive(self, side: str, now: float) -> bytes:
        """Return the bytes that have reached ``side``'s receiver by ``now``.

        If ``side`` is not listening (see :meth:`set_listening`), the bytes
        are counted as ``lost_unheard`` and ``b""`` is returned.
        Raises :class:`UnknownSide`.
        """
        check_side(side)
        now = self.advance(now)
        lane = self._lanes[f"{_other(side)}->{side}"]
        data = lane.take_due(now)
        if not self._listening[side]:
            lane.counters.lost_unheard += len(data)
            return b""
        lane.counters.bytes_delivered += len(data)
        return data

    def note_overrun(self, side: str, count: int) -> None:
        """Record that ``count`` bytes received by ``side`` did not fit its buffer.

        The adapter calls this after :meth:`receive` returned bytes it could
        not hand on; they move from ``bytes_delivered`` to ``overrun``.
        Raises :class:`UnknownSide`, or :class:`ImpairmentError` for a
        negative or excessive count.
        """
        check_side(side)
        c = self._lanes[f"{_other(side)}->{side}"].counters
        if not 0 <= count <= c.bytes_delivered:
            raise ImpairmentError(f"overrun count {count} out of range")
        c.bytes_delivered -= count
        c.overrun += count

    # -- state ----------------------------------------------------------------

    @property
    def impairments(self) -> Impairments:
        """The impairments in force."""
        return self._imp

    def set_impairments(self, impairments: Impairments, now: float) -> None:
        """Apply new impairments to every byte whose end time is after ``now``."""
        self.advance(now)
        self._imp = impairments
        for lane in self._lanes.values():
            lane.drops.set_probability(impairments.drop)
            lane.flips.set_probability(impairments.ber)

    @property
    def is_cut(self) -> bool:
        """True while the line is cut."""
        return self._cut

    def set_cut(self, cut: bool, now: float) -> bool:
        """Cut (True) or restore (False) both directions; return True if that changed anything."""
        self.advance(now)
        changed = self._cut != cut
        self._cut = cut
        return changed

    def power(self, side: str) -> bool:
        """Return whether ``side`` is powered.  Raises :class:`UnknownSide`."""
        return self._power[check_side(side)]

    def set_power(self, side: str, on: bool, now: float) -> PowerChanged | None:
        """Power ``side`` on or off; return the event if its state changed, else None.

        A powered-off side neither transmits (its bytes are lost, including
        those already in its FIFO) nor receives (an unpowered receiver hears
        nothing).  Raises :class:`UnknownSide`.
        """
        check_side(side)
        self.advance(now)
        if self._power[side] == on:
            return None
        self._power[side] = on
        return PowerChanged(side, on)

    def set_listening(self, side: str, listening: bool, now: float) -> bool:
        """Say whether a program holds ``side`` open; return True if that changed.

        Raises :class:`UnknownSide`.
        """
        check_side(side)
        self.advance(now)
        changed = self._listening[side] != listening
        self._listening[side] = listening
        return changed

    def in_flight(self) -> int:
        """Return the number of bytes accepted but neither delivered nor lost yet."""
        return sum(lane.in_flight() for lane in self._lanes.values())

    def statistics(self) -> dict[str, object]:
        """Return the counters of both directions and the line state, JSON-ready.

        For each direction, ``bytes_in`` equals ``bytes_delivered`` plus every
        loss counter plus the bytes still in flight.
        """
        out: dict[str, object] = {}
        for direction, lane in self._lanes.items():
            counters = dict(vars(lane.counters))
            counters["in_flight"] = lane.in_flight()
            out[direction] = counters
        out["cut"] = self._cut
        out["power"] = dict(self._power)
        out["listening"] = dict(self._listening)
        imp = self._imp
        out["impairments"] = {"ber": imp.ber, "drop": imp.drop, "latency": imp.latency}
        out["baud"] = self.baud
        return out
