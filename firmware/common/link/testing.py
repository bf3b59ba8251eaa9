"""In-memory test bench for link sessions: two cores, an impaired line, simulated time.

(Also :func:`collect_reply`, which turns what a request handler returns into
the reply a peer's link would hand its caller, for tests of handlers.)

:class:`Line` carries bytes one way.  It serialises them at the configured
byte rate (or instantly), adds latency, and applies seeded impairments per
frame-sized piece: bit flips (a bit-error rate), drops, duplicates, swaps of
neighbouring pieces, truncation and injected garbage.  :class:`Pair` joins two
:class:`Session` objects with two lines and runs them as a discrete-event
simulation: time jumps to the next deadline or delivery, so an hour of
keepalives costs milliseconds.

What it does not model: the adapter's own buffering and scheduling delays,
byte-level timing inside a piece, or a line that reorders bytes within a
frame (a real UART never reorders at all; swaps exist to stress the core).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware.common.errors import LocalProtocolError
from firmware.common.link import messages
from firmware.common.link.link import HandlerResult, PartJoiner
from firmware.common.link.session import Event, Session, SessionConfig

_PIECE = re.compile(rb"\x00[^\x00]+\x00")


@dataclass
class Impairments:
    """Per-piece fault probabilities of one line (all zero: a clean line)."""

    ber: float = 0.0  # probability that any one bit flips
    drop: float = 0.0
    duplicate: float = 0.0
    swap: float = 0.0  # exchange with the next piece
    truncate: float = 0.0
    garbage: float = 0.0  # insert random bytes before the piece
    cut: bool = False  # the line is cut: nothing passes


@dataclass
class Line:
    """One direction of an impaired line with a byte rate and a latency."""

    rng: random.Random
    byte_rate: float | None = None
    latency: float = 0.0
    impairments: Impairments = field(default_factory=Impairments)
    _queue: list[tuple[float, bytes]] = field(default_factory=list)
    _free_at: float = 0.0
    bytes_carried: int = 0

    def send(self, data: bytes, now: float) -> None:
        """Put ``data`` on the line at ``now``."""
        imp = self.impairments
        if imp.cut or not data:
            return
        pieces = _PIECE.findall(data) or [data]
        out: list[bytes] = []
        for piece in pieces:
            p = bytes(piece)
            if self.rng.random() < imp.drop:
                continue
            if imp.ber > 0.0:
                p = self._flip(p, imp.ber)
            if self.rng.random() < imp.truncate and len(p) > 2:
                p = p[: self.rng.randrange(1, len(p))]
            if self.rng.random() < imp.garbage:
                out.append(self.rng.randbytes(self.rng.randrange(1, 64)))
            out.append(p)
            if self.rng.random() < imp.duplicate:
                out.append(p)
        for i in range(len(out) - 1):
            if self.rng.random() < imp.swap:
                out[i], out[i + 1] = out[i + 1], out[i]
        for p in out:
            wire = 0.0 if self.byte_rate is None else len(p) / self.byte_rate
            self._free_at = max(self._free_at, now) + wire
            self._queue.append((self._free_at + self.latency, p))
            self.bytes_carried += len(p)

    def _flip(self, data: bytes, ber: float) -> bytes:
        nbits = len(data) * 8
        # Flips per piece ~ Binomial(nbits, ber) ~ Poisson(nbits * ber).
        flips = _poisson(self.rng, nbits * ber)
        if not flips:
            return data
        buf = bytearray(data)
        for _ in range(flips):
            pos = self.rng.randrange(nbits)
            buf[pos // 8] ^= 1 << (pos % 8)
        return bytes(buf)

    def due(self, now: float) -> bytes:
        """Return the bytes that have arrived by ``now``."""
        ready = [p for t, p in self._queue if t <= now]
        self._queue = [(t, p) for t, p in self._queue if t > now]
        return b"".join(ready)

    def next_arrival(self) -> float | None:
        """Return when the next bytes arrive, or None when the line is empty."""
        return min((t for t, _ in self._queue), default=None)

    def clear(self) -> None:
        """Lose everything in flight (a cut, or a power loss)."""
        self._queue.clear()


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method; lam is small here (expected flips per frame).
    if lam > 30:
        return max(0, round(rng.gauss(lam, lam**0.5)))
    limit = 2.718281828459045 ** (-lam)
    k, p = 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class Pair:
    """Two sessions, ``a`` and ``b``, joined by two lines, in simulated time."""

    def __init__(
        self,
        config_a: SessionConfig,
        config_b: SessionConfig,
        *,
        seed: int = 0,
        latency: float = 0.001,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.config_a, self.config_b = config_a, config_b
        self.a = Session(config_a, random.Random(self.rng.getrandbits(64)), self.now)
        self.b = Session(config_b, random.Random(self.rng.getrandbits(64)), self.now)
        rate_a = None if config_a.baud is None else config_a.baud / 10
        rate_b = None if config_b.baud is None else config_b.baud / 10
        self.ab = Line(random.Random(self.rng.getrandbits(64)), rate_a, latency)
        self.ba = Line(random.Random(self.rng.getrandbits(64)), rate_b, latency)
        self.events_a: list[tuple[float, Event]] = []
        self.events_b: list[tuple[float, Event]] = []

    def restart(self, side: str) -> None:
        """Replace one side with a freshly booted Session (its state is lost)."""
        if side == "a":
            self.a = Session(self.config_a, random.Random(self.rng.getrandbits(64)), self.now)
            self.ba.clear()
        else:
            self.b = Session(self.config_b, random.Random(self.rng.getrandbits(64)), self.now)
            self.ab.clear()

    def _pump(self) -> None:
        for sess, line_out, line_in, events in (
            (self.a, self.ab, self.ba, self.events_a),
            (self.b, self.ba, self.ab, self.events_b),
        ):
            data = line_in.due(self.now)
            if data:
                sess.receive_bytes(data, self.now)
            deadline = sess.next_deadline()
            if deadline is not None and deadline <= self.now:
                sess.handle_deadline(self.now)
            while (ev := sess.next_event()) is not None:
                events.append((self.now, ev))
            line_out.send(sess.bytes_to_send(self.now), self.now)

    def step(self) -> None:
        """Advance time to the next thing that happens, and let it happen."""
        self._pump()
        times = [
            t
            for t in (
                self.a.next_deadline(),
                self.b.next_deadline(),
                self.ab.next_arrival(),
                self.ba.next_arrival(),
            )
            if t is not None
        ]
        nxt = min(times) if times else self.now + 1.0
        # Never stand still: a deadline in the past has just been served.
        self.now = max(nxt, self.now + 1e-6)
        self._pump()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Step until ``done()`` or ``timeout`` simulated seconds pass; return done()."""
        end = self.now + timeout
        while not done():
            if self.now >= end:
                return False
            self.step()
        return True

    def run_for(self, seconds: float) -> None:
        """Step for ``seconds`` of simulated time."""
        end = self.now + seconds
        while self.now < end:
            self.step()


async def collect_reply(result: HandlerResult) -> messages.Message | None:
    """Return what a peer's link would hand its caller for a handler's ``result``.

    A stream is drained and its parts joined.  Raises InvalidMessage for
    inconsistent parts or a stream that ends before its bytes are all there,
    LocalProtocolError for a stream with no end.
    """
    if result is None or isinstance(result, messages.Message):
        return result
    joiner = PartJoiner()
    async for item in result:
        if isinstance(item, messages.ServicePart):
            joiner.add(item)
            continue
        if not (isinstance(item, messages.Service) and item.streamed):
            return item
        joiner.end(item)
        whole = joiner.joined()
        if whole is None:
            raise messages.InvalidMessage("the stream ended before its parts were all sent")
        return whole
    raise LocalProtocolError("a reply stream with no end")
