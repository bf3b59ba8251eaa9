"""Reliable framed session over a lossy byte line (sans-I/O).

Theory of operation
-------------------
A :class:`Session` turns a byte line that drops, corrupts and (in tests)
duplicates or reorders bytes into a channel of whole messages delivered
exactly once and intact, or failed with a typed error.  It does no I/O and
reads no clock: the adapter feeds it ``receive_bytes(data, now)``, asks
``bytes_to_send(now)``, drains ``next_event()``, and calls
``handle_deadline(now)`` no later than ``next_deadline()``.

**Handshake and epochs.**  Each Session picks a random 64-bit *boot epoch*
when it is created (once per process start) and a random 32-bit *session
token* per session instance; every frame carries the sender's token.  While
down, a side sends HELLO(token, epoch, echo) every ``hello_interval``; echo is
the peer token it has bound, or 0.  A side binds the first new token it sees
in a HELLO or HELLO_ACK and answers HELLO_ACK; it is *up* once the peer has
echoed our token in a HELLO or HELLO_ACK, and then answers with a HELLO_ACK
of its own so the peer learns the same.  Other frames cannot establish a
session: they do not say whom they are for, and one from the peer's previous
session could be taken for proof that it knows our current token.  A HELLO
carrying a token other than the bound one means the peer lost our session:
everything in flight fails at once, with :class:`PeerRestarted` when its
boot epoch changed (it rebooted) and :class:`LinkDown` otherwise.  Frames
carrying any other token are stale and dropped, so nothing from an old
session is ever delivered into a new one.
Keepalive PINGs go out after ``keepalive_interval`` of silence; nothing heard
for ``dead_after`` seconds takes the session down (the GPIO power line, via
:meth:`Session.force_down`, does it sooner).

**Selective-repeat ARQ.**  DATA frames carry 32-bit sequence numbers (serial
arithmetic).  Every frame carries the cumulative ack (next expected seq), a
16-bit selective-ack bitmap of frames held beyond it, and the receive window
(frames the receiver can still hold beyond the ack) — piggybacked on DATA,
or in a standalone ACK when there is nothing to send.  The receiver keeps
out-of-order frames within its window and delivers in sequence.  The sender
keeps at most ``window`` frames outstanding and never more than the peer's
advertised window.

**Timers from the line rate.**  When the line has a configured baud rate the
session models the UART: ``tx_free_at`` is when the last byte handed out will
have left the wire (8N1: baud/10 bytes/s).  It hands out only one frame plus
a little slack (``PACING_SLACK``, at most ``PACING_SLACK_FRAMES`` frames)
ahead of the line, so the OS buffers stay small and a control message never
queues behind seconds of bulk data; each frame's retransmission timer starts
when it *leaves the wire*, not when it was handed out.  The timeout is the
smoothed residual round trip (RFC 6298 on those departure-based samples)
with a floor of two maximum frame times plus the peer's slack (our ack may
wait behind what the peer has queued) and a small margin.  Timers do not
back off on a serial line (loss there is noise, not congestion); on a stream
without a line rate they do.  A frame is retransmitted early (fast
retransmit) when a frame sent *after* its last transmission has been
acknowledged: the line does not reorder, so the earlier one was lost.

**Adaptive fragment size.**  The frame loss rate is tracked (EWMA); from it
the session estimates the per-byte error rate q and picks the payload size L
maximising L/(L+h)·(1-q)^(L+h) for per-frame overhead h: L ≈ (√(h²+4h/q)-h)/2.
A fresh end starts at ``START_PAYLOAD`` and doubles its cap every
``RAMP_FRAMES`` clean acks (fragments keep their size when retransmitted, so
big ones cut before any loss was measured could stall a very noisy line).
On a clean line the size reaches the 4 KiB maximum; at a bit-error rate of
1e-5 it settles near 500 bytes.

**Messages.**  A message (up to ``max_message`` bytes) is cut into DATA
fragments with a fragment header (message id, total length) and FIRST/LAST
flags.  Small messages marked urgent go before bulk fragments, and bulk may
never fill the last ``URGENT_RESERVE`` window slots, so control messages are
never stuck behind a bulk transfer.  Bulk messages share the line round-robin.
``MessageSent`` is reported once every fragment is cumulatively acknowledged,
which means the peer has delivered the message.
"""

from __future__ import annotations

import enum
import math
import random
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from firmware.common.errors import (
    LinkDown,
    LinkError,
    LocalProtocolError,
    PeerRestarted,
)
from firmware.common.link.framing import (
    CRC_SIZE,
    FRAGMENT_HEADER,
    FRAGMENT_HEADER_SIZE,
    HEADER_SIZE,
    MAX_PAYLOAD,
    SACK_BITS,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    seq_add,
    seq_lt,
)

HELLO = struct.Struct(">QIH")  # boot epoch, echoed peer token, receive window

#: Window slots bulk fragments may never take, so urgent messages always fit.
URGENT_RESERVE: Final = 4
#: Frames outstanding at once.  17 = the frame at the cumulative ack plus the
#: 16 the selective-ack bitmap can report: a larger window would hold frames
#: the receiver cannot say it has, and their timers would resend them
#: needlessly.  17 frames of 4 KiB are 0.7 s of line time at 921600 baud, far
#: more than a serial line's round trip, so the window never limits goodput.
DEFAULT_WINDOW: Final = SACK_BITS + 1
#: Fragment size of a fresh session end, before any frame has been seen to
#: arrive.  Fragments keep their size when retransmitted, so starting at 4 KiB
#: on a very noisy line would leave a window of frames that almost never get
#: through; the size doubles every RAMP_FRAMES frames acknowledged at the
#: first try, so a clean line reaches 4 KiB within a few dozen frames.
START_PAYLOAD: Final = 1024
RAMP_FRAMES: Final = 8
#: Bytes per frame that are not payload: header, CRC, fragment header, two
#: delimiters and (roughly) COBS's one byte per 254.
FRAME_OVERHEAD: Final = HEADER_SIZE + CRC_SIZE + FRAGMENT_HEADER_SIZE + 2
#: Smallest adaptive payload: below this the header costs more than errors do.
MIN_PAYLOAD: Final = 256
#: EWMA weight of one transmission's outcome in the loss estimate (~32 frames).
LOSS_GAIN: Final = 1 / 32
#: Received payload bytes the caller may leave in undrained events before the
#: receive window closes (flow control: the peer stops sending).
RECV_BUFFER_LIMIT: Final = 4 * 2**20
#: Upper bound on partially reassembled messages held at once from the peer.
MAX_PARTIAL_MESSAGES: Final = 64
#: Margin added to line-derived timers for scheduling jitter of the adapter.
TIMER_MARGIN: Final = 0.02
#: How much line time beyond one frame the pacer keeps queued in the driver,
#: so the line never idles while the event loop is late to wake us (tens of
#: milliseconds on a busy 2-core machine).  A control message queued now
#: waits at most this long plus one frame.
PACING_SLACK: Final = 0.06
#: ... but never more than this many frames: frames queued in the driver count
#: against the 17-frame window, and small fragments on a fast line (500 bytes
#: at 921600 baud is 6 ms) would otherwise leave too few for loss recovery.
PACING_SLACK_FRAMES: Final = 2
#: Floor of the retransmission timeout on a line with no configured rate (TCP).
STREAM_RTO_FLOOR: Final = 0.2
#: Cap on exponential backoff of one frame's retransmission timer on a stream
#: (TCP), where repeated loss means congestion.  On a paced serial line loss
#: is noise, not congestion, so timers do not back off there.
MAX_BACKOFF: Final = 4


class Role(enum.Enum):
    """Which end of the session this is: the client asks, the server answers."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of one session end.  ``baud=None`` means a stream (TCP)."""

    role: Role
    baud: int | None = 115200
    window: int = DEFAULT_WINDOW
    max_message: int = 64 * 2**20
    keepalive_interval: float = 1.0
    dead_after: float = 4.0
    hello_interval: float = 0.25
    max_payload: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        if not URGENT_RESERVE < self.window <= 2**15:
            raise LocalProtocolError(f"window must be in {URGENT_RESERVE + 1}..{2**15}")
        if not MIN_PAYLOAD <= self.max_payload <= MAX_PAYLOAD:
            raise LocalProtocolError(f"max_payload must be in {MIN_PAYLOAD}..{MAX_PAYLOAD}")
        if self.baud is not None and self.baud <= 0:
            raise LocalProtocolError("baud must be positive")


# -- events -----------------------------------------------------------------


@dataclass(frozen=True)
class SessionUp:
    """The session is established; ``restarted`` when the peer's boot epoch changed."""

    peer_epoch: int
    restarted: bool


@dataclass(frozen=True)
class SessionDown:
    """The session ended; every unfinished message got a MessageFailed first."""

    error: LinkDown


@dataclass(frozen=True)
class MessageReceived:
    """A whole message arrived from the peer."""

    msg_id: int
    kind: int
    payload: bytes


@dataclass(frozen=True)
class MessageSent:
    """Every fragment of message ``msg_id`` was acknowledged: the peer has it."""

    msg_id: int


@dataclass(frozen=True)
class MessageFailed:
    """Message ``msg_id`` may not have reached the peer; its exchange has failed."""

    msg_id: int
    error: LinkError


Event = SessionUp | SessionDown | MessageReceived | MessageSent | MessageFailed


# -- internal state -----------------------------------------------------------


@dataclass
class _OutMessage:
    msg_id: int
    kind: int
    data: bytes
    urgent: bool
    offset: int = 0
    last_seq: int | None = None  # seq of the LAST fragment once it is emitted

    @property
    def fully_emitted(self) -> bool:
        return self.last_seq is not None


@dataclass
class _Outstanding:
    frame: Frame
    msg_id: int
    departs_at: float = 0.0
    rto_at: float = 0.0
    tx_order: int = 0
    transmissions: int = 0
    backoff: int = 0
    sacked: bool = False


@dataclass
class _Partial:
    kind: int
    total: int
    buf: bytearray = field(default_factory=bytearray)


class Session:
    """One end of a reliable framed session.  See the module docstring."""

    _next_hello: float
    _ack_pending: bool
    _hello_ack_pending: bool

    def __init__(self, config: SessionConfig, rng: random.Random, now: float) -> None:
        self.config = config
        self._rng = rng
        self._decoder = FrameDecoder()
        self._dir_flag = int(Flag.FROM_CLIENT) if config.role is Role.CLIENT else 0
        self.epoch = rng.getrandbits(64)
        self._peer_epoch: int | None = None  # boot epoch of the last peer we bound
        self._peer_epoch_before: int | None = None  # ... and of the one before it
        self._event_bytes = 0  # payload bytes in events not yet taken by the caller
        self._window_closed = False  # we advertised a zero window for that reason
        self._events: deque[Event] = deque()
        self._next_msg_id = 1
        self._stats: dict[str, int] = {}
        self._byte_rate = None if config.baud is None else config.baud / 10.0
        self._max_frame_time = self._wire_time(config.max_payload + FRAME_OVERHEAD)
        self._rto_floor = (
            STREAM_RTO_FLOOR
            if self._byte_rate is None
            else 2 * self._max_frame_time + PACING_SLACK + 2 * TIMER_MARGIN
        )
        self._loss = 0.0  # EWMA of frame loss per transmission
        self._ramp = min(START_PAYLOAD, config.max_payload)  # start-up size cap
        self._avg_frame = float(self._ramp + FRAME_OVERHEAD)  # EWMA of DATA frame bytes
        self._clean_streak = 0
        self._tx_free_at = now
        self._reset(now)

    # -- public API ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the session is up."""
        return self._up

    def send_message(self, kind: int, payload: bytes, now: float, *, urgent: bool = False) -> int:
        """Queue a message; return its id (reported in MessageSent / MessageFailed).

        Raises LinkDown when the session is not up, LocalProtocolError when the
        kind is not a byte or the message is larger than ``max_message``.
        """
        if not 1 <= kind <= 0xFF:
            raise LocalProtocolError(f"message kind {kind} is not in 1..255")
        if len(payload) > self.config.max_message:
            raise LocalProtocolError(
                f"message of {len(payload)} bytes exceeds {self.config.max_message}"
            )
        if not self._up:
            raise LinkDown("link session is not established")
        msg_id = self._next_msg_id
        self._next_msg_id = seq_add(self._next_msg_id, 1) or 1
        msg = _OutMessage(msg_id, kind, bytes(payload), urgent)
        (self._urgent if urgent else self._bulk).append(msg)
        self._unfinished[msg_id] = msg
        return msg_id

    def receive_bytes(self, data: bytes, now: float) -> None:
        """Feed bytes read from the line."""
        for frame in self._decoder.feed(data):
            self._on_frame(frame, now)

    def bytes_to_send(self, now: float) -> bytes:
        """Return the bytes to write to the line now (possibly empty)."""
        out = bytearray()
        if not self._up:
            if now >= self._next_hello:
                out += self._emit(self._hello_frame(FrameType.HELLO), now)
                self._next_hello = now + self.config.hello_interval
            if self._hello_ack_pending and self._peer_token:
                out += self._emit(self._hello_frame(FrameType.HELLO_ACK), now)
                self._hello_ack_pending = False
            return bytes(out)
        if self._hello_ack_pending:
            out += self._emit(self._hello_frame(FrameType.HELLO_ACK), now)
            self._hello_ack_pending = False
        while self._line_has_room(now):
            frame = self._next_data_frame(now)
            if frame is None:
                break
            out += self._emit(frame, now)
            self._ack_pending = False
        if self._ack_pending:
            out += self._emit(self._control_frame(FrameType.ACK), now)
            self._ack_pending = False
        if now >= self._last_tx + self.config.keepalive_interval:
            out += self._emit(self._control_frame(FrameType.PING), now)
        return bytes(out)

    def next_event(self) -> Event | None:
        """Return the next event, or None when there is none."""
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, MessageReceived):
            self._event_bytes -= len(event.payload)
            if self._window_closed and self._event_bytes <= RECV_BUFFER_LIMIT:
                self._ack_pending = True  # reopen the window at once
        return event

    def next_deadline(self) -> float | None:
        """Return when :meth:`handle_deadline` (then bytes_to_send) must next run."""
        if not self._up:
            return self._next_hello
        times = [
            self._last_tx + self.config.keepalive_interval,
            self._last_rx + self.config.dead_after,
        ]
        timers = [
            o.rto_at
            for seq, o in self._outstanding.items()
            if not o.sacked and seq not in self._rtx  # queued ones wait for the line
        ]
        if timers:
            times.append(min(timers))
        if self._has_sendable():
            times.append(self._tx_free_at - self._lookahead() if self._byte_rate else 0.0)
        return min(times)

    def handle_deadline(self, now: float) -> None:
        """Run timers: retransmission timeouts and the dead-peer check."""
        if not self._up:
            return
        if now >= self._last_rx + self.config.dead_after:
            self._count("dead_peer")
            self._teardown(LinkDown(f"no frames from peer for {self.config.dead_after:g} s"), now)
            return
        for seq, out in self._outstanding.items():
            if not out.sacked and now >= out.rto_at and seq not in self._rtx:
                self._rtx.add(seq)
                if self._byte_rate is None:
                    out.backoff = min(out.backoff + 1, MAX_BACKOFF)
                self._count("timeouts")
                self._note_loss(True)

    def force_down(self, error: LinkDown, now: float) -> None:
        """Take the session down at once (e.g. the peer's power line dropped)."""
        self._count("forced_down")
        self._teardown(error, now)

    def statistics(self) -> dict[str, int]:
        """Return counters of the session and its frame decoder."""
        stats = dict(self._decoder.statistics())
        stats.update(self._stats)
        stats["payload_size"] = self._payload_size()
        return stats

    # -- state ------------------------------------------------------------------

    def _reset(self, now: float) -> None:
        """Start a new session instance: fresh token, empty windows and queues."""
        self._token: int = self._rng.getrandbits(32) or 1
        self._peer_token: int = 0
        self._peer_knows_us: bool = False
        self._up: bool = False
        self._next_hello = now
        self._last_tx: float = now
        self._last_rx: float = now
        self._ack_pending = False
        self._hello_ack_pending = False
        # send side
        self._next_seq: int = 0
        self._outstanding: dict[int, _Outstanding] = {}
        self._rtx: set[int] = set()
        self._tx_counter: int = 0
        self._peer_ack: int = 0
        self._peer_window: int = URGENT_RESERVE + 1
        self._urgent: deque[_OutMessage] = deque()
        self._bulk: deque[_OutMessage] = deque()
        self._unfinished: dict[int, _OutMessage] = {}
        self._srtt: float | None = None
        self._rttvar: float = 0.0
        # receive side
        self._rcv_next: int = 0
        self._rcv_buf: dict[int, Frame] = {}
        self._partials: dict[int, _Partial] = {}

    def _teardown(self, error: LinkDown, now: float) -> None:
        was_bound = self._up or bool(self._peer_token)
        for msg_id in list(self._unfinished):
            self._events.append(MessageFailed(msg_id, error))
            self._count("messages_failed")
        if self._up:
            self._events.append(SessionDown(error))
            self._count("sessions_down")
        elif was_bound:
            self._count("handshakes_abandoned")
        self._reset(now)

    def _come_up(self) -> None:
        if self._up or not (self._peer_token and self._peer_knows_us):
            return
        self._up = True
        self._hello_ack_pending = True  # echo its token: that is how it learns we know it
        self._count("sessions_up")
        restarted = self._peer_epoch_before is not None and (
            self._peer_epoch_before != self._peer_epoch
        )
        if restarted:
            self._count("peer_restarts")
        self._events.append(SessionUp(self._peer_epoch or 0, restarted))

    # -- receive path -------------------------------------------------------------

    def _on_frame(self, frame: Frame, now: float) -> None:
        if (frame.flags & Flag.FROM_CLIENT) == self._dir_flag:
            self._count("dropped_echo")  # our own frames reflected by the line
            return
        if frame.type in (FrameType.HELLO, FrameType.HELLO_ACK):
            self._on_hello(frame, now)
            return
        if not self._peer_token or frame.session != self._peer_token:
            self._count("dropped_stale")
            return
        if not self._up:
            # A non-HELLO frame does not say whom it is for: it may come from
            # the peer's previous session, bound to an older token of ours.
            # Only an echo in HELLO/HELLO_ACK proves the peer knows us.
            self._count("dropped_before_up")
            return
        self._last_rx = now
        self._on_ack(frame, now)
        if frame.type is FrameType.DATA:
            self._on_data(frame)
        elif frame.type is FrameType.PING:
            self._ack_pending = True

    def _on_hello(self, frame: Frame, now: float) -> None:
        try:
            epoch, echo, window = HELLO.unpack(frame.payload)
        except struct.error:
            self._count("dropped_bad_hello")
            return
        is_ack = frame.type is FrameType.HELLO_ACK
        if is_ack and echo != self._token:
            self._count("dropped_stale")  # answers a HELLO of an older session of ours
            return
        if frame.session != self._peer_token:
            if self._up:
                # The peer started a new session: ours is lost on its side.
                error: LinkDown = (
                    PeerRestarted("peer restarted (new boot epoch)")
                    if epoch != self._peer_epoch
                    else LinkDown("peer reset the link session")
                )
                self._teardown(error, now)
            elif self._peer_token:
                # Half-open handshake: nothing was sent under our token, so
                # keep it and just bind the newer peer token.  (Regenerating
                # ours here would make two restarting sides chase each other.)
                self._count("handshake_rebinds")
                self._peer_knows_us = False
            self._peer_epoch_before = self._peer_epoch
            self._peer_token = frame.session
            self._peer_epoch = epoch
            self._peer_window = window
        self._last_rx = now
        if echo == self._token:
            self._peer_knows_us = True
        if not is_ack:
            self._hello_ack_pending = True  # the peer is not up yet: answer it
        self._come_up()

    def _on_ack(self, frame: Frame, now: float) -> None:
        ack = frame.ack
        if seq_lt(self._next_seq, ack):
            self._count("dropped_bad_ack")  # acks something never sent
            return
        self._peer_window = frame.window
        if seq_lt(self._peer_ack, ack):
            self._peer_ack = ack
        newest_acked = -1
        for seq in list(self._outstanding):
            out = self._outstanding[seq]
            if seq_lt(seq, ack):
                self._acked(seq, out, now)
                newest_acked = max(newest_acked, out.tx_order)
            else:
                offset = (seq - ack) % (1 << 32)
                if 1 <= offset <= SACK_BITS and frame.sack >> (offset - 1) & 1 and not out.sacked:
                    out.sacked = True
                    self._rtx.discard(seq)
                    self._sample_rtt(out, now)
                    newest_acked = max(newest_acked, out.tx_order)
        if newest_acked >= 0:
            visible_end = seq_add(ack, SACK_BITS + 1)
            for seq, out in self._outstanding.items():
                # Fast retransmit: a frame sent after this one's last
                # transmission arrived, and the line keeps order.  Only
                # frames the sack bitmap can speak of are judged.
                if (
                    not out.sacked
                    and out.tx_order < newest_acked
                    and seq not in self._rtx
                    and seq_lt(seq, visible_end)
                ):
                    self._rtx.add(seq)
                    self._count("fast_retransmits")
                    self._note_loss(True)
        self._finish_messages()

    def _acked(self, seq: int, out: _Outstanding, now: float) -> None:
        if not out.sacked:
            self._sample_rtt(out, now)
        del self._outstanding[seq]
        self._rtx.discard(seq)

    def _finish_messages(self) -> None:
        for msg_id, msg in list(self._unfinished.items()):
            if msg.last_seq is not None and seq_lt(msg.last_seq, self._peer_ack):
                del self._unfinished[msg_id]
                self._events.append(MessageSent(msg_id))
                self._count("messages_sent")

    def _sample_rtt(self, out: _Outstanding, now: float) -> None:
        self._note_loss(False)
        if out.transmissions != 1:
            return  # Karn: an ack of a retransmitted frame is ambiguous
        sample = max(0.0, now - out.departs_at)
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - sample)
            self._srtt = 0.875 * self._srtt + 0.125 * sample

    def _on_data(self, frame: Frame) -> None:
        self._ack_pending = True
        seq = frame.seq
        if seq_lt(seq, self._rcv_next):
            self._count("duplicates")
            return
        if (seq - self._rcv_next) % (1 << 32) >= self.config.window:
            self._count("dropped_out_of_window")
            return
        if seq in self._rcv_buf:
            self._count("duplicates")
            return
        self._rcv_buf[seq] = frame
        while self._rcv_next in self._rcv_buf:
            self._deliver(self._rcv_buf.pop(self._rcv_next))
            self._rcv_next = seq_add(self._rcv_next, 1)

    def _deliver(self, frame: Frame) -> None:
        """Reassemble an in-sequence DATA frame into its message."""
        self._count("data_frames_received")
        if len(frame.payload) < FRAGMENT_HEADER_SIZE:
            self._count("dropped_bad_fragment")
            return
        msg_id, total = FRAGMENT_HEADER.unpack_from(frame.payload)
        chunk = frame.payload[FRAGMENT_HEADER_SIZE:]
        if frame.has(Flag.FIRST):
            if msg_id in self._partials:
                self._count("dropped_bad_fragment")  # restarted without finishing
            if total > self.config.max_message or len(self._partials) >= MAX_PARTIAL_MESSAGES:
                self._count("dropped_oversized_message")
                self._partials.pop(msg_id, None)
                return
            self._partials[msg_id] = _Partial(frame.kind, total)
        part = self._partials.get(msg_id)
        if part is None:
            self._count("dropped_bad_fragment")  # continuation of a discarded message
            return
        if part.kind != frame.kind or part.total != total or len(part.buf) + len(chunk) > total:
            self._count("dropped_bad_fragment")
            del self._partials[msg_id]
            return
        part.buf += chunk
        if frame.has(Flag.LAST):
            del self._partials[msg_id]
            if len(part.buf) != total:
                self._count("dropped_bad_fragment")
                return
            self._count("messages_received")
            self._event_bytes += total
            self._events.append(MessageReceived(msg_id, part.kind, bytes(part.buf)))

    # -- send path ----------------------------------------------------------------

    def _wire_time(self, nbytes: int) -> float:
        return 0.0 if self._byte_rate is None else nbytes / self._byte_rate

    def _lookahead(self) -> float:
        """How far ahead of the line we hand out bytes: one frame plus slack."""
        frame = self._wire_time(self._payload_size() + FRAME_OVERHEAD)
        return frame + min(PACING_SLACK, PACING_SLACK_FRAMES * frame)

    def _line_has_room(self, now: float) -> bool:
        return self._byte_rate is None or self._tx_free_at < now + self._lookahead()

    def _has_sendable(self) -> bool:
        if self._rtx:
            return True
        return bool(self._urgent and self._window_open(urgent=True)) or bool(
            self._bulk and self._window_open(urgent=False)
        )

    def _window_open(self, *, urgent: bool) -> bool:
        # The peer accepts seq in [peer_ack, peer_ack + its window).
        in_flight = (self._next_seq - self._peer_ack) % (1 << 32)
        limit = min(self.config.window, self._peer_window)
        if not urgent:
            limit -= URGENT_RESERVE
        return in_flight < limit

    def _payload_size(self) -> int:
        """Fragment payload size that maximises goodput at the observed loss."""
        cap = self._ramp
        if self._loss <= 0.0:
            return cap
        # The loss was measured on frames of about _avg_frame bytes.
        q = -math.log(max(1e-12, 1.0 - min(self._loss, 0.9))) / self._avg_frame
        h = FRAME_OVERHEAD
        best = (math.sqrt(h * h + 4 * h / q) - h) / 2
        return max(MIN_PAYLOAD, min(cap, int(best)))

    def _note_loss(self, lost: bool) -> None:
        self._loss += LOSS_GAIN * ((1.0 if lost else 0.0) - self._loss)
        if lost:
            self._clean_streak = 0
            return
        self._clean_streak += 1
        if self._clean_streak >= RAMP_FRAMES:
            self._clean_streak = 0
            self._ramp = min(self.config.max_payload, self._ramp * 2)

    def _next_data_frame(self, now: float) -> Frame | None:
        if self._rtx:
            seq = min(self._rtx, key=lambda s: (s - self._peer_ack) % (1 << 32))
            self._rtx.discard(seq)
            out = self._outstanding[seq]
            self._count("retransmits")
            return self._stamp(out.frame)
        if self._urgent and self._window_open(urgent=True):
            return self._fragment(self._urgent, now)
        if self._bulk and self._window_open(urgent=False):
            return self._fragment(self._bulk, now)
        return None

    def _fragment(self, queue: deque[_OutMessage], now: float) -> Frame:
        msg = queue.popleft()
        room = self._payload_size() - FRAGMENT_HEADER_SIZE
        first = msg.offset == 0
        chunk = msg.data[msg.offset : msg.offset + room]
        msg.offset += len(chunk)
        last = msg.offset >= len(msg.data)
        flags = self._dir_flag
        flags |= int(Flag.FIRST) if first else 0
        flags |= int(Flag.LAST) if last else 0
        flags |= int(Flag.URGENT) if msg.urgent else 0
        seq = self._next_seq
        self._next_seq = seq_add(seq, 1)
        self._avg_frame += LOSS_GAIN * (len(chunk) + FRAME_OVERHEAD - self._avg_frame)
        frame = Frame(
            FrameType.DATA,
            flags=flags,
            kind=msg.kind,
            session=self._token,
            seq=seq,
            payload=FRAGMENT_HEADER.pack(msg.msg_id, len(msg.data)) + chunk,
        )
        self._outstanding[seq] = _Outstanding(frame, msg.msg_id)
        if last:
            msg.last_seq = seq
        else:
            queue.append(msg)  # round-robin among messages of the same class
        return self._stamp(frame)

    def _stamp(self, frame: Frame) -> Frame:
        """Refresh the piggybacked ack fields of a frame about to be (re)sent."""
        return Frame(
            frame.type,
            frame.flags,
            frame.kind,
            frame.session,
            frame.seq,
            self._rcv_next,
            self._sack_bits(),
            self._recv_window(),
            frame.payload,
        )

    def _sack_bits(self) -> int:
        bits = 0
        for i in range(SACK_BITS):
            if seq_add(self._rcv_next, i + 1) in self._rcv_buf:
                bits |= 1 << i
        return bits

    def _recv_window(self) -> int:
        # Frames are accepted in [rcv_next, rcv_next + window).  The window
        # closes while the caller leaves too much received data untaken.
        self._window_closed = self._event_bytes > RECV_BUFFER_LIMIT
        return 0 if self._window_closed else self.config.window

    def _control_frame(self, ftype: FrameType) -> Frame:
        return self._stamp(Frame(ftype, flags=self._dir_flag, session=self._token))

    def _hello_frame(self, ftype: FrameType) -> Frame:
        payload = HELLO.pack(self.epoch, self._peer_token, self._recv_window())
        return Frame(ftype, flags=self._dir_flag, session=self._token, payload=payload)

    def _emit(self, frame: Frame, now: float) -> bytes:
        wire = encode_frame(frame)
        self._tx_free_at = max(self._tx_free_at, now) + self._wire_time(len(wire))
        self._last_tx = now
        self._count("frames_sent")
        if frame.type is FrameType.DATA:
            out = self._outstanding[frame.seq]
            out.frame = frame
            out.transmissions += 1
            out.tx_order = self._tx_counter
            self._tx_counter += 1
            out.departs_at = self._tx_free_at if self._byte_rate else now
            out.rto_at = out.departs_at + self._rto() * (2**out.backoff)
        return wire

    def _rto(self) -> float:
        if self._srtt is None:
            return self._rto_floor * 2
        return max(self._rto_floor, self._srtt + 4 * self._rttvar)

    def _count(self, name: str, n: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + n
