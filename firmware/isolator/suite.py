"""Frames and vectors for testing the isolator, built with the project's own codec (CPython).

The frames here come from firmware/common/link/framing.py, the codec both
Pis run, so the filter core (which re-implements framing for the board) is
checked against an independent encoder.  :func:`raw_frame` builds frames the
real codec refuses to produce (wrong version, unknown bits, lying length) for
the negative cases.

:func:`standard_vectors` is the fixed suite: every message kind in each
direction with maintenance on and off, every control frame type, each drop
reason, garbage, resynchronisation and a flood.  Each vector is a dict in the
format of :mod:`firmware.isolator.vectors` plus a ``name`` and the
``expect`` list of per-step forwarded frame counts.
"""

import random
import struct
from typing import Any

from cobs import cobs

from firmware.common.link import framing
from firmware.common.link.framing import Flag, Frame, FrameType
from firmware.common.link.kinds import Kind
from firmware.isolator import hostconfig
from firmware.isolator.filtercore import A_TO_B, B_TO_A, DIRECTIONS

#: Kinds that travel only on the uplink (outer <-> central), never on the
#: optical line, so the shipped allowlist leaves them out.
UPLINK_ONLY = frozenset({Kind.AUTH_BEGIN, Kind.AUTH_PROOF, Kind.AUTH_CHALLENGE, Kind.AUTH_OK})


def shipped_config(maintenance: bool = False) -> dict[str, Any]:
    """Return the shipped configuration with ``maintenance`` set."""
    raw = hostconfig.load_raw()
    raw["maintenance"] = maintenance
    return raw


def direction_flag(direction: str) -> int:
    """Return the FROM_CLIENT bit a frame travelling in ``direction`` must carry."""
    return int(Flag.FROM_CLIENT) if direction == B_TO_A else 0


def data_frame(
    kind: int,
    direction: str,
    fragment: bytes = b"hello",
    msg_len: int | None = None,
    flags: int = int(Flag.FIRST | Flag.LAST),
    msg_id: int = 7,
    seq: int = 1,
) -> bytes:
    """Return an encoded DATA frame; ``msg_len`` defaults to the fragment's length."""
    header = framing.FRAGMENT_HEADER.pack(msg_id, len(fragment) if msg_len is None else msg_len)
    return framing.encode_frame(
        Frame(
            FrameType.DATA,
            flags=flags | direction_flag(direction),
            kind=kind,
            session=0x1234ABCD,
            seq=seq,
            ack=3,
            sack=0b101,
            window=16,
            payload=header + fragment,
        )
    )


def control_frame(ftype: FrameType, direction: str, payload: bytes = b"", **fields: int) -> bytes:
    """Return an encoded HELLO/HELLO_ACK/ACK/PING frame with the right direction bit."""
    flags = fields.pop("flags", 0) | direction_flag(direction)
    return framing.encode_frame(
        Frame(ftype, flags=flags, session=0xCAFE0001, ack=9, window=32, payload=payload, **fields)
    )


def raw_frame(
    *,
    version: int = 1,
    ftype: int = 3,
    flags: int = 0,
    kind: int = 0x41,
    seq: int = 0,
    length: int | None = None,
    payload: bytes = b"",
    crc_ok: bool = True,
) -> bytes:
    """Return a frame built field by field, bypassing the codec's checks."""
    length = len(payload) if length is None else length
    body = framing.HEADER.pack(version, ftype, flags, kind, 1, seq, 0, 0, 0, length) + payload
    crc = framing.crc32c(body) ^ (0 if crc_ok else 0xDEADBEEF)
    body += crc.to_bytes(4, "big")
    encoded: bytes = framing.DELIMITER + cobs.encode(body) + framing.DELIMITER
    return encoded


def fragment_header(msg_len: int, msg_id: int = 1) -> bytes:
    """Return the 8-byte DATA fragment header."""
    return struct.pack(">II", msg_id, msg_len)


def vector(
    name: str,
    config: dict[str, Any],
    steps: list[tuple[str, int, bytes]],
    expect: list[int],
    reason: str | None = None,
) -> dict[str, Any]:
    """Return a named vector.

    ``expect[i]`` is the number of frames step i forwards; ``reason``, when
    given, is the one drop reason the vector must count (once).
    """
    return {
        "name": name,
        "config": config,
        "steps": [[d, now, data.hex()] for d, now, data in steps],
        "expect": expect,
        "reason": reason,
    }


def allowed(kind: int, direction: str, maintenance: bool) -> bool:
    """Return True when the shipped configuration lets ``kind`` travel in ``direction``."""
    if kind in UPLINK_ONLY:
        return False
    if 0x80 <= kind <= 0xBF:
        return maintenance
    return (kind < 0x40) == (direction == B_TO_A)


def standard_vectors(seed: int = 1) -> list[dict[str, Any]]:
    """Return the fixed vector suite (see the module docstring)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for maintenance in (False, True):
        cfg = shipped_config(maintenance)
        for kind in Kind:
            for direction in DIRECTIONS:
                frame = data_frame(kind, direction, rng.randbytes(rng.randrange(1, 64)))
                out.append(
                    vector(
                        f"data {kind.name} {direction} maintenance={maintenance}",
                        cfg,
                        [(direction, 0, frame)],
                        [int(allowed(kind, direction, maintenance))],
                    )
                )
    cfg = shipped_config()
    for ftype in (FrameType.HELLO, FrameType.HELLO_ACK, FrameType.ACK, FrameType.PING):
        payload = rng.randbytes(24) if ftype in (FrameType.HELLO, FrameType.HELLO_ACK) else b""
        for direction in DIRECTIONS:
            good = control_frame(ftype, direction, payload)
            wrong_side = control_frame(ftype, B_TO_A if direction == A_TO_B else A_TO_B, payload)
            urgent = control_frame(ftype, direction, payload, flags=int(Flag.URGENT))
            seq = control_frame(ftype, direction, payload, seq=5)
            out.append(
                vector(
                    f"control {ftype.name} {direction}",
                    cfg,
                    [(direction, t, f) for t, f in enumerate((good, wrong_side, urgent, seq))],
                    [1, 0, 0, 0],
                )
            )
    d = A_TO_B
    service = int(Kind.SERVICE)
    abc = fragment_header(3) + b"abc"
    bad = [
        ("bad crc", "crc", raw_frame(payload=fragment_header(3) + b"abc", crc_ok=False)),
        ("bad version", "version", raw_frame(version=2, payload=abc)),
        ("bad type", "type", raw_frame(ftype=9, payload=abc)),
        ("unknown flag", "flags", raw_frame(flags=0x40 | 0x06, payload=abc)),
        ("lying length", "length", raw_frame(length=5, payload=abc)),
        ("no fragment header", "fragment", raw_frame(payload=b"abc")),
        ("fragment > message", "fragment", raw_frame(payload=fragment_header(2) + b"abc")),
        ("lone fragment short", "fragment", raw_frame(flags=6, payload=fragment_header(9) + b"ab")),
        ("kind 0 data", "kind", raw_frame(kind=0, payload=abc)),
        ("msg_len over cap", "msg_len", data_frame(Kind.ERROR, d, b"x", msg_len=4097, flags=2)),
        ("oversized payload", "oversized", raw_frame(payload=fragment_header(5000) + bytes(4089))),
        ("ack with payload", "control", raw_frame(ftype=4, kind=0, payload=b"x")),
        ("hello too big", "control", raw_frame(ftype=1, kind=0, payload=bytes(257))),
        ("short", "short", b"\x00\x05abcd\x00"),
        ("bad cobs", "cobs", b"\x00\x09abc\x00"),
    ]
    for name, reason, frame in bad:
        good = data_frame(service, d, b"after " + name.encode())
        out.append(vector(name, cfg, [(d, 0, frame), (d, 0, good)], [0, 1], reason))
    big = data_frame(
        service, d, (bytes(range(256)) * 16)[: framing.MAX_PAYLOAD - 8], msg_len=1 << 20, flags=2
    )
    out.append(vector("largest frames pass", cfg, [(d, 0, big), (d, 1, big)], [1, 1]))
    garbage = bytes(rng.randrange(1, 256) for _ in range(10000))
    out.append(
        vector(
            "run without delimiter, then resync",
            cfg,
            [(d, 0, garbage), (d, 0, garbage[:100] + data_frame(service, d))],
            [0, 1],
        )
    )
    ping = control_frame(FrameType.PING, B_TO_A)
    burst = cfg["rate"][B_TO_A]["frame_burst"]
    per_s = cfg["rate"][B_TO_A]["frames_per_s"]
    out.append(
        vector(
            "flood of pings",
            cfg,
            [(B_TO_A, 0, ping * (burst + 50)), (B_TO_A, 1000 * 10 // per_s, ping * 20)],
            [burst, 10],
        )
    )
    stream = b"".join(data_frame(int(Kind.STATUS), B_TO_A, seq=i) for i in range(5))
    split = [(B_TO_A, 0, stream[i : i + 7]) for i in range(0, len(stream), 7)]
    expect = [0] * len(split)
    counted = 0
    for i in range(len(split)):
        done = stream[: (i + 1) * 7].count(0) // 2
        expect[i] = done - counted
        counted = done
    out.append(vector("one frame stream in 7-byte pieces", cfg, split, expect))
    return out
