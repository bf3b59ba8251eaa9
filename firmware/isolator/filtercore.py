"""Protocol-break filter for the optical UART link (sans-I/O, MicroPython and CPython).

Theory of operation
-------------------
The isolator sits on the optocoupled UART between the outer module (the
server role, side "a") and the inner module (the client role, side "b").  It
never forwards a byte it received: it terminates framing on each side, judges
every frame on its own, and re-encodes only the frames that pass from their
parsed fields.  Whatever the outer module puts on its wire, the inner module's
UART sees nothing but well-formed, allowlisted frames, and the same holds the
other way round.

A frame on the wire is ``0x00 COBS(header | payload | CRC-32C) 0x00`` with the
22-byte big-endian header of firmware/common/link/framing.py (this file must
not import it: it runs on the board too).  Per direction, :class:`DirectionFilter`

1. splits the byte stream at 0x00 delimiters into a buffer bounded by the
   largest legal encoded frame (a longer run is dropped as ``oversized`` and
   the filter hunts for the next delimiter), linear in the input;
2. COBS-decodes the chunk and checks, in this order: length bounds, CRC-32C,
   version, declared length, flag bits, frame type, the direction bit
   (``FROM_CLIENT`` set exactly on frames from the inner module), the
   control-frame rules (HELLO/HELLO_ACK/ACK/PING carry kind 0, seq 0, no DATA
   flags; ACK and PING carry no payload; a HELLO payload is small), and for
   DATA frames the fragment header (8 bytes: msg_id, msg_len; a fragment is
   never longer than its message, a one-fragment message is exactly as long
   as it says), the kind allowlist for the direction and the per-kind cap on
   ``msg_len``;
3. charges the re-encoded frame to two token buckets (frames/s and bytes/s);
4. re-encodes the frame from its parsed fields (header packed afresh,
   payload, the verified CRC, fresh COBS) and returns it.

Every rejected frame is counted under ``dropped_<reason>``; nothing on the
wire raises.  Allowlist: from the outer module (a->b) only replies
(0x40-0x7F), from the inner module (b->a) only requests (0x01-0x3F), each only
if listed in the configuration with its ``msg_len`` cap; link-maintenance kinds
(0x80-0xBF) pass either way only when the configuration enables maintenance.

Portability: this module runs unchanged under CPython and MicroPython (the
RP2040 board, and the WebAssembly port the tests use to prove both agree).  So:
no dataclasses, enum, typing or ``__future__`` at runtime, integer arithmetic
only (no floats, so both interpreters compute the same token buckets), its own
COBS and a table-driven CRC-32C.  The CRC keeps its state in two 16-bit halves
because MicroPython's small ints are 31 bits wide on a 32-bit machine: a
32-bit state would allocate a long int per byte.  The codec is replaceable:
the CPython simulator passes the C-accelerated ``crc32c``/``cobs`` packages
(see firmware/isolator/fastcodec.py), which must give identical bytes.
"""

import struct

# MicroPython has neither typing nor contextlib, and never evaluates annotations
try:  # noqa: SIM105
    from typing import Any
except ImportError:
    pass

PROTOCOL_VERSION = 1

A_TO_B = "a->b"  # outer module (server) -> inner module (client)
B_TO_A = "b->a"  # inner module (client) -> outer module (server)
DIRECTIONS = (A_TO_B, B_TO_A)

HEADER = ">BBBBIIIHHH"
HEADER_SIZE = 22
CRC_SIZE = 4
FRAGMENT_HEADER = ">II"
FRAGMENT_HEADER_SIZE = 8

TYPE_HELLO = 1
TYPE_HELLO_ACK = 2
TYPE_DATA = 3
TYPE_ACK = 4
TYPE_PING = 5
FRAME_TYPES = (TYPE_HELLO, TYPE_HELLO_ACK, TYPE_DATA, TYPE_ACK, TYPE_PING)

FLAG_FROM_CLIENT = 0x01
FLAG_FIRST = 0x02
FLAG_LAST = 0x04
FLAG_URGENT = 0x08
KNOWN_FLAGS = FLAG_FROM_CLIENT | FLAG_FIRST | FLAG_LAST | FLAG_URGENT
DATA_ONLY_FLAGS = FLAG_FIRST | FLAG_LAST | FLAG_URGENT

REQUEST_FIRST, REQUEST_LAST = 0x01, 0x3F
REPLY_FIRST, REPLY_LAST = 0x40, 0x7F
MAINTENANCE_FIRST, MAINTENANCE_LAST = 0x80, 0xBF

#: The protocol's largest payload (framing.MAX_PAYLOAD); a configuration may
#: only lower it.
PROTOCOL_MAX_PAYLOAD = 4096
#: The protocol's largest message (docs/wire-protocol.md: msg_len <= 64 MiB).
PROTOCOL_MAX_MESSAGE = 64 * 1024 * 1024
#: A HELLO payload carries an epoch, a version and a few session parameters:
#: tens of bytes.  256 leaves room for growth and keeps HELLO useless as a
#: bulk channel.
DEFAULT_HELLO_MAX = 256

DROP_REASONS = (
    "oversized",  # a run between delimiters longer than the largest legal frame
    "cobs",  # the run is not valid COBS
    "short",  # shorter than header + CRC
    "crc",  # CRC-32C mismatch: noise, or a forged frame
    "version",  # not protocol version 1
    "length",  # header length field disagrees with the body
    "flags",  # unknown flag bits
    "type",  # unknown frame type
    "direction",  # FROM_CLIENT does not match the side the frame came from
    "control",  # HELLO/HELLO_ACK/ACK/PING with DATA-only fields or a bad payload
    "fragment",  # DATA fragment header missing or inconsistent
    "kind",  # message kind not allowlisted for this direction
    "msg_len",  # declared message length above the kind's cap
    "rate",  # over the direction's frames/s or bytes/s budget
)

#: Token buckets count in thousandths of a token so that a rate in units per
#: second refills by exactly ``rate`` milli-tokens per millisecond, in integers.
MILLI = 1000


class FilterConfigError(ValueError):
    """The isolator configuration is malformed or unsafe."""


# -- CRC-32C -----------------------------------------------------------------

#: CRC-32C (Castagnoli) polynomial, reflected form.
CRC32C_POLY = 0x82F63B78


def _crc_tables() -> tuple[list[int], list[int]]:
    lo = []
    hi = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ CRC32C_POLY if c & 1 else c >> 1
        lo.append(c & 0xFFFF)
        hi.append(c >> 16)
    return lo, hi


_CRC_LO, _CRC_HI = _crc_tables()


def crc32c(data: bytes) -> bytes:
    """Return the CRC-32C of ``data`` as 4 big-endian bytes (as on the wire)."""
    lo = 0xFFFF
    hi = 0xFFFF
    tlo = _CRC_LO
    thi = _CRC_HI
    for b in data:
        i = (lo ^ b) & 0xFF
        lo = ((lo >> 8) | ((hi & 0xFF) << 8)) ^ tlo[i]
        hi = (hi >> 8) ^ thi[i]
    lo ^= 0xFFFF
    hi ^= 0xFFFF
    return bytes((hi >> 8, hi & 0xFF, lo >> 8, lo & 0xFF))


# -- COBS --------------------------------------------------------------------

#: A COBS block holds at most 254 data bytes (code byte 0xFF).
COBS_BLOCK = 254


def cobs_encode(data: bytes) -> bytes:
    """Return the COBS encoding of ``data`` (no delimiters).

    Byte-for-byte the same as the ``cobs`` package: a final block of exactly
    254 bytes gets no trailing empty block.
    """
    out = bytearray()
    segments = bytes(data).split(b"\x00")
    last = len(segments) - 1
    for n, seg in enumerate(segments):
        pos = 0
        remaining = len(seg)
        while remaining >= COBS_BLOCK:
            out.append(0xFF)
            out += seg[pos : pos + COBS_BLOCK]
            pos += COBS_BLOCK
            remaining -= COBS_BLOCK
        if remaining or n != last or pos == 0:
            out.append(remaining + 1)
            out += seg[pos:]
    return bytes(out)


def cobs_decode(data: bytes) -> bytes | None:
    """Return the decoded bytes of COBS ``data``, or None when it is not valid COBS."""
    data = bytes(data)
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            return None
        i += 1
        end = i + code - 1
        if end > n:
            return None
        block = data[i:end]
        if b"\x00" in block:
            return None
        out += block
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


class PureCodec:
    """CRC-32C and COBS in plain Python: what the board runs."""

    crc32c = staticmethod(crc32c)
    cobs_encode = staticmethod(cobs_encode)
    cobs_decode = staticmethod(cobs_decode)


# -- configuration ------------------------------------------------------------


def _int(raw: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    value = raw.get(key, default)
    if value is None:
        raise FilterConfigError("missing " + key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FilterConfigError(key + " must be an integer")
    if value < low or value > high:
        raise FilterConfigError(f"{key}={value} outside {low}..{high}")
    return value


def parse_kind(text: object) -> int:
    """Return the kind number of a configuration key such as ``"0x41"`` or ``65``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(str(text), 0)
    except ValueError:
        raise FilterConfigError("bad message kind " + repr(text)) from None


class RateConfig:
    """Token-bucket limits for one direction."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.frames_per_s = _int(raw, "frames_per_s", None, 1, 1000000)
        self.frame_burst = _int(raw, "frame_burst", None, 1, 1000000)
        self.bytes_per_s = _int(raw, "bytes_per_s", None, 1, 100000000)
        self.byte_burst = _int(raw, "byte_burst", None, 1, 100000000)


class FilterConfig:
    """The validated filter rules: allowlist, caps and rates.

    ``raw`` is the parsed JSON of firmware/isolator/isolator.json (only the
    filter's keys are read here; pins and the watchdog belong to the board).
    Raises FilterConfigError when anything is missing, out of range or unsafe.
    """

    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            raise FilterConfigError("configuration must be an object")
        self.max_payload = _int(
            raw, "max_payload", PROTOCOL_MAX_PAYLOAD, FRAGMENT_HEADER_SIZE, PROTOCOL_MAX_PAYLOAD
        )
        self.hello_max = _int(raw, "hello_max", DEFAULT_HELLO_MAX, 0, self.max_payload)
        maintenance = raw.get("maintenance", False)
        if not isinstance(maintenance, bool):
            raise FilterConfigError("maintenance must be true or false")
        self.maintenance = maintenance
        self.max_body = HEADER_SIZE + self.max_payload + CRC_SIZE
        # COBS adds one byte per 254 bytes of input, plus one.
        self.max_encoded = self.max_body + self.max_body // COBS_BLOCK + 1
        kinds = raw.get("kinds")
        if not isinstance(kinds, dict) or not kinds:
            raise FilterConfigError("kinds must list the allowed message kinds")
        # direction -> {kind: msg_len cap}
        self.allowed: dict[str, dict[int, int]] = {A_TO_B: {}, B_TO_A: {}}
        for key, spec in kinds.items():
            kind = parse_kind(key)
            if not isinstance(spec, dict):
                raise FilterConfigError(f"kind {key}: expected an object")
            cap = _int(spec, "max_msg", None, 0, PROTOCOL_MAX_MESSAGE)
            if REQUEST_FIRST <= kind <= REQUEST_LAST:
                self.allowed[B_TO_A][kind] = cap
            elif REPLY_FIRST <= kind <= REPLY_LAST:
                self.allowed[A_TO_B][kind] = cap
            elif MAINTENANCE_FIRST <= kind <= MAINTENANCE_LAST:
                if self.maintenance:
                    self.allowed[A_TO_B][kind] = cap
                    self.allowed[B_TO_A][kind] = cap
            else:
                raise FilterConfigError(f"kind {key} is in no allowed range")
        rates = raw.get("rate")
        if not isinstance(rates, dict):
            raise FilterConfigError("rate must give limits for a->b and b->a")
        self.rate: dict[str, RateConfig] = {}
        for direction in DIRECTIONS:
            spec = rates.get(direction)
            if not isinstance(spec, dict):
                raise FilterConfigError("rate: missing " + direction)
            rate = RateConfig(spec)
            if rate.byte_burst < self.max_encoded + 2:
                # a burst smaller than one full frame would block large frames forever
                full = self.max_encoded + 2
                raise FilterConfigError(f"rate {direction}: byte_burst below one frame ({full} B)")
            self.rate[direction] = rate


# -- rate limiting --------------------------------------------------------------


class TokenBucket:
    """A token bucket in integer milli-tokens; ``now`` is in milliseconds.

    Starts full.  A clock that goes backwards refills nothing.
    """

    def __init__(self, per_s: int, burst: int) -> None:
        self.per_s = per_s
        self.capacity = burst * MILLI
        self.level = self.capacity
        self.last: int | None = None

    def take(self, amount: int, now: int) -> bool:
        """Refill for the time since the last call; take ``amount`` tokens if all are there."""
        if self.last is not None and now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.per_s)
        if self.last is None or now > self.last:
            self.last = now
        cost = amount * MILLI
        if cost > self.level:
            return False
        self.level -= cost
        return True


# -- the filter -----------------------------------------------------------------


class DirectionFilter:
    """One direction of the isolator: bytes in, re-encoded allowed frames out."""

    def __init__(self, direction: str, config: FilterConfig, codec: Any = None) -> None:
        if direction not in DIRECTIONS:
            raise FilterConfigError("direction must be 'a->b' or 'b->a'")
        self.direction = direction
        self.config = config
        self.codec = codec if codec is not None else PureCodec
        # frames from the inner module (client) carry FROM_CLIENT
        self.client_flag = FLAG_FROM_CLIENT if direction == B_TO_A else 0
        self.allowed = config.allowed[direction]
        rate = config.rate[direction]
        self.frame_bucket = TokenBucket(rate.frames_per_s, rate.frame_burst)
        self.byte_bucket = TokenBucket(rate.bytes_per_s, rate.byte_burst)
        self._buf = bytearray()
        self._hunting = False  # discarding up to the next delimiter
        self.counters = {
            "bytes_in": 0,
            "frames_in": 0,
            "frames_out": 0,
            "bytes_out": 0,
        }
        for reason in DROP_REASONS:
            self.counters["dropped_" + reason] = 0

    def _drop(self, reason: str) -> None:
        self.counters["dropped_" + reason] += 1

    def feed(self, data: bytes, now: int) -> bytes:
        """Consume ``data`` (received at ``now`` ms); return the bytes to forward."""
        data = bytes(data)
        counters = self.counters
        counters["bytes_in"] += len(data)
        out = bytearray()
        limit = self.config.max_encoded
        start = 0
        n = len(data)
        while start < n:
            end = data.find(b"\x00", start)
            if end < 0:
                if not self._hunting:
                    if len(self._buf) + n - start > limit:
                        self._drop("oversized")
                        self._buf = bytearray()
                        self._hunting = True
                    else:
                        self._buf += data[start:]
                break
            if self._hunting:
                self._hunting = False
                self._buf = bytearray()
                start = end + 1
                continue
            if self._buf:
                self._buf += data[start:end]
                chunk = bytes(self._buf)
                self._buf = bytearray()
            else:
                chunk = data[start:end]
            start = end + 1
            if not chunk:
                continue  # the empty run between back-to-back delimiters
            counters["frames_in"] += 1
            if len(chunk) > limit:
                self._drop("oversized")
                continue
            frame = self._judge(chunk, now)
            if frame is not None:
                out += frame
                counters["frames_out"] += 1
        counters["bytes_out"] += len(out)
        return bytes(out)

    def _judge(self, chunk: bytes, now: int) -> bytes | None:
        """Return the re-encoded frame (delimiters included), or None after counting a drop."""
        frame = self._rebuild(chunk)
        if isinstance(frame, str):
            self._drop(frame)
            return None
        # both buckets must have room; neither is charged otherwise
        if self.frame_bucket.take(1, now):
            if self.byte_bucket.take(len(frame), now):
                return frame
            self.frame_bucket.level += MILLI
        self._drop("rate")
        return None

    def _rebuild(self, chunk: bytes) -> bytes | str:
        """Return the frame re-encoded from ``chunk``'s fields, or the drop reason."""
        codec = self.codec
        cfg = self.config
        body = codec.cobs_decode(chunk)
        if body is None:
            return "cobs"
        if len(body) < HEADER_SIZE + CRC_SIZE:
            return "short"
        if len(body) > cfg.max_body:
            return "oversized"
        if codec.crc32c(body[:-CRC_SIZE]) != body[-CRC_SIZE:]:
            return "crc"
        (version, ftype, flags, kind, session, seq, ack, sack, window, length) = struct.unpack_from(
            HEADER, body, 0
        )
        if version != PROTOCOL_VERSION:
            return "version"
        if length != len(body) - HEADER_SIZE - CRC_SIZE:
            return "length"
        if flags & ~KNOWN_FLAGS:
            return "flags"
        if ftype not in FRAME_TYPES:
            return "type"
        if flags & FLAG_FROM_CLIENT != self.client_flag:
            return "direction"
        payload = body[HEADER_SIZE : HEADER_SIZE + length]
        if ftype == TYPE_DATA:
            reason = self._check_data(flags, kind, payload)
        else:
            reason = self._check_control(ftype, flags, kind, seq, length)
        if reason is not None:
            return reason
        # Protocol break: the frame sent on is built afresh from the parsed
        # fields, never copied from the input.  The CRC is one of those
        # fields: it was verified over exactly the bytes the fresh header and
        # payload make up (packing unpacked fixed-width fields is the
        # identity), so it is reused rather than computed a second time,
        # which halves the board's per-byte work.  Were the fresh bytes ever
        # to differ, the receiver's CRC check would reject the frame.
        header = struct.pack(
            HEADER,
            PROTOCOL_VERSION,
            ftype,
            flags,
            kind,
            session,
            seq,
            ack,
            sack,
            window,
            len(payload),
        )
        fresh = header + payload + body[-CRC_SIZE:]
        return b"\x00" + codec.cobs_encode(fresh) + b"\x00"

    def _check_data(self, flags: int, kind: int, payload: bytes) -> str | None:
        if len(payload) < FRAGMENT_HEADER_SIZE:
            return "fragment"
        cap = self.allowed.get(kind)
        if cap is None:
            return "kind"
        (_msg_id, msg_len) = struct.unpack_from(FRAGMENT_HEADER, payload, 0)
        if msg_len > cap:
            return "msg_len"
        fragment = len(payload) - FRAGMENT_HEADER_SIZE
        if fragment > msg_len:
            return "fragment"
        if flags & FLAG_FIRST and flags & FLAG_LAST and fragment != msg_len:
            return "fragment"
        return None

    def _check_control(
        self, ftype: int, flags: int, kind: int, seq: int, length: int
    ) -> str | None:
        if kind != 0 or seq != 0 or flags & DATA_ONLY_FLAGS:
            return "control"
        if ftype in (TYPE_ACK, TYPE_PING):
            if length:
                return "control"
        elif length > self.config.hello_max:
            return "control"
        return None

    def statistics(self) -> dict[str, int]:
        """Return a copy of this direction's counters."""
        return dict(self.counters)


class Filter:
    """Both directions of the isolator.

    ``feed(direction, data, now)`` returns the bytes to put on the other
    side's UART; ``statistics()`` returns ``{"a->b": {...}, "b->a": {...}}``.
    """

    def __init__(self, config: FilterConfig, codec: Any = None) -> None:
        self.config = config
        self.directions: dict[str, DirectionFilter] = {}
        for direction in DIRECTIONS:
            self.directions[direction] = DirectionFilter(direction, config, codec)

    def feed(self, direction: str, data: bytes, now: int) -> bytes:
        """Filter ``data`` travelling in ``direction`` at ``now`` ms; return what passes."""
        one = self.directions.get(direction)
        if one is None:
            raise ValueError("direction must be 'a->b' or 'b->a'")
        return one.feed(data, now)

    def statistics(self) -> dict[str, dict[str, int]]:
        """Return every counter, by direction."""
        out: dict[str, dict[str, int]] = {}
        for direction in DIRECTIONS:
            out[direction] = self.directions[direction].statistics()
        return out
