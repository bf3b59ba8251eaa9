"""Frame codec for the optical UART link (sans-I/O).

Theory of operation
-------------------
A frame on the wire is ``0x00 COBS(header | payload | CRC-32C) 0x00``.  COBS
removes every zero byte from the body, so 0x00 only ever means "frame
boundary" and a receiver that joins mid-stream, or loses bytes to noise,
resynchronises at the next delimiter.  A delimiter is sent before *and* after
each frame: the leading one terminates whatever garbage preceded the frame,
so the first frame after a burst of noise survives; the empty chunks between
back-to-back frames are skipped.

The header is fixed-size, big-endian, and carries everything a filter on the
wire (the protocol-break isolator) needs to judge a frame on its own, without
keys and without reassembling messages: version, frame type, direction flag,
message kind, payload length, and, in a DATA frame's fragment header, the
message's total length.  Layout (see docs/wire-protocol.md)::

    off size field
      0  1  version   protocol version, currently 1
      1  1  type      FrameType
      2  1  flags     FLAG_* bits
      3  1  kind      message kind (DATA frames), 0 otherwise
      4  4  session   sender's session token (random per session instance)
      8  4  seq       DATA: sequence number; other frames: 0
     12  4  ack       next sequence number the sender expects from its peer
     16  2  sack      bit i set: the sender holds seq ack+1+i already
     18  2  window    frames the sender can still accept beyond ``ack``
     20  2  length    payload length
     22  n  payload
   22+n  4  crc       CRC-32C (Castagnoli) of bytes 0 .. 22+n-1

The decoder never raises on wire input: a frame that fails COBS, CRC,
version or length checks is dropped and counted in :meth:`FrameDecoder.statistics`.
Its buffer is bounded by the largest legal encoded frame; an over-long run
without a delimiter is discarded and the decoder hunts for the next one.
Every byte is examined a constant number of times, so resynchronisation is
linear in the input.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, cast

import crc32c as _crc32c
from cobs import cobs as _cobs

from firmware.common.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
DELIMITER: Final = b"\x00"

HEADER = struct.Struct(">BBBBIIIHHH")
HEADER_SIZE: Final = HEADER.size  # 22
CRC_SIZE: Final = 4

#: Largest payload of one frame.  4 KiB keeps one frame under 40 ms at
#: 1 Mbaud and under 0.4 s at 115200 baud, so a control message waits at most
#: that long behind a bulk fragment; the session picks smaller fragments
#: itself when the line is noisy (see session.py).
MAX_PAYLOAD: Final = 4096

#: DATA payloads start with a fragment header: message id and total length.
FRAGMENT_HEADER = struct.Struct(">II")
FRAGMENT_HEADER_SIZE: Final = FRAGMENT_HEADER.size

MAX_BODY: Final = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
#: COBS adds one byte per 254 bytes of input, plus one.
MAX_ENCODED: Final = MAX_BODY + MAX_BODY // 254 + 1

SEQ_MODULUS: Final = 1 << 32
SACK_BITS: Final = 16


class FrameType(enum.IntEnum):
    """What a frame is for."""

    HELLO = 1  # opens or re-opens a session; payload: HelloPayload
    HELLO_ACK = 2  # answers a HELLO; payload: HelloPayload
    DATA = 3  # one fragment of a message; sequenced and acknowledged
    ACK = 4  # acknowledgement only (ack/sack/window in the header)
    PING = 5  # keepalive; the peer answers with an ACK at once


class Flag(enum.IntFlag):
    """Header flag bits."""

    FROM_CLIENT = 0x01  # sent by the client role (inner module / outer on the uplink)
    FIRST = 0x02  # DATA: first fragment of a message
    LAST = 0x04  # DATA: last fragment of a message
    URGENT = 0x08  # DATA: a small control message, scheduled ahead of bulk data


KNOWN_FLAGS: Final = int(Flag.FROM_CLIENT | Flag.FIRST | Flag.LAST | Flag.URGENT)


class FrameError(RemoteProtocolError, ValueError):
    """A frame body failed a check (only raised by :func:`decode_body`)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame.  ``payload`` excludes header and CRC."""

    type: FrameType
    flags: int = 0
    kind: int = 0
    session: int = 0
    seq: int = 0
    ack: int = 0
    sack: int = 0
    window: int = 0
    payload: bytes = b""

    def has(self, flag: Flag) -> bool:
        """Return True when ``flag`` is set."""
        return bool(self.flags & flag)


def crc32c(data: bytes) -> int:
    """Return the CRC-32C (Castagnoli) of ``data``."""
    return _crc32c.crc32c(data)


def encode_body(frame: Frame) -> bytes:
    """Return header | payload | CRC for ``frame`` (not yet COBS-encoded).

    Raises LocalProtocolError when a field does not fit its slot.
    """
    if len(frame.payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {len(frame.payload)} bytes > {MAX_PAYLOAD}")
    if frame.flags & ~KNOWN_FLAGS:
        raise LocalProtocolError(f"unknown flag bits {frame.flags:#x}")
    try:
        header = HEADER.pack(
            PROTOCOL_VERSION,
            int(frame.type),
            frame.flags,
            frame.kind,
            frame.session,
            frame.seq,
            frame.ack,
            frame.sack,
            frame.window,
            len(frame.payload),
        )
    except struct.error as e:
        raise LocalProtocolError(f"frame field out of range: {e}") from e
    body = header + frame.payload
    return body + crc32c(body).to_bytes(CRC_SIZE, "big")


def encode_frame(frame: Frame) -> bytes:
    """Return the bytes to put on the wire for ``frame``, delimiters included."""
    return DELIMITER + cast(bytes, _cobs.encode(encode_body(frame))) + DELIMITER


def decode_body(body: bytes) -> Frame:
    """Parse a COBS-decoded frame body.

    Raises FrameError when the CRC, version, type, flags or length is wrong.
    """
    if len(body) < HEADER_SIZE + CRC_SIZE:
        raise FrameError("short")
    if len(body) > MAX_BODY:
        raise FrameError("oversized")
    if crc32c(body[:-CRC_SIZE]) != int.from_bytes(body[-CRC_SIZE:], "big"):
        raise FrameError("crc")
    (version, ftype, flags, kind, session, seq, ack, sack, window, length) = HEADER.unpack_from(
        body
    )
    if version != PROTOCOL_VERSION:
        raise FrameError("version")
    if length != len(body) - HEADER_SIZE - CRC_SIZE:
        raise FrameError("length")
    if flags & ~KNOWN_FLAGS:
        raise FrameError("flags")
    try:
        frame_type = FrameType(ftype)
    except ValueError:
        raise FrameError("type") from None
    return Frame(
        frame_type,
        flags,
        kind,
        session,
        seq,
        ack,
        sack,
        window,
        bytes(body[HEADER_SIZE : HEADER_SIZE + length]),
    )


class FrameDecoder:
    """Turn a byte stream into frames; bounded, linear, never raises on input.

    ``feed(data)`` returns the frames completed by ``data``.  Drop reasons are
    counted in :meth:`statistics` under ``dropped_<reason>``.
    """

    def __init__(self, max_encoded: int = MAX_ENCODED) -> None:
        self._max = max_encoded
        self._buf = bytearray()
        self._hunting = False  # discarding until the next delimiter
        self.frames = 0
        self.bytes_in = 0
        self.dropped: dict[str, int] = {}

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return every complete, valid frame in it, in order."""
        self.bytes_in += len(data)
        out: list[Frame] = []
        start = 0
        n = len(data)
        while start < n:
            end = data.find(0, start)
            if end < 0:
                self._append(data[start:])
                break
            chunk = data[start:end]
            start = end + 1
            if self._hunting:
                self._hunting = False
                self._buf.clear()
                continue
            if self._buf:
                self._buf += chunk
                chunk = bytes(self._buf)
                self._buf.clear()
            if not chunk:
                continue  # empty run between back-to-back delimiters
            if len(chunk) > self._max:
                self._drop("oversized")
                continue
            frame = self._decode(chunk)
            if frame is not None:
                out.append(frame)
        return out

    def _append(self, data: bytes) -> None:
        if self._hunting:
            return
        if len(self._buf) + len(data) > self._max:
            self._drop("oversized")
            self._buf.clear()
            self._hunting = True
            return
        self._buf += data

    def _decode(self, chunk: bytes) -> Frame | None:
        try:
            body = cast(bytes, _cobs.decode(chunk))
        except _cobs.DecodeError:
            self._drop("cobs")
            return None
        try:
            frame = decode_body(body)
        except FrameError as e:
            self._drop(str(e))
            return None
        self.frames += 1
        return frame

    def statistics(self) -> dict[str, int]:
        """Return counters: frames decoded, bytes fed, and drops by reason."""
        stats = {"frames": self.frames, "bytes_in": self.bytes_in}
        stats.update({f"dropped_{k}": v for k, v in sorted(self.dropped.items())})
        return stats


def seq_lt(a: int, b: int) -> bool:
    """Serial-number comparison (RFC 1982) of 32-bit sequence numbers: a < b."""
    return a != b and ((b - a) % SEQ_MODULUS) < (SEQ_MODULUS // 2)


def seq_add(a: int, n: int) -> int:
    """Return a + n modulo 2**32."""
    return (a + n) % SEQ_MODULUS
