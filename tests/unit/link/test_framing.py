"""Frame codec: golden vectors, chunking, garbage, bounds, and properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import LocalProtocolError
from firmware.common.link.framing import (
    HEADER_SIZE,
    MAX_ENCODED,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    crc32c,
    decode_body,
    encode_body,
    encode_frame,
    seq_add,
    seq_lt,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

VECTORS = json.loads((Path(__file__).parents[2] / "vectors" / "frames.json").read_text())


def vector_frames() -> list[tuple[Frame, bytes]]:
    out = []
    for v in VECTORS["frames"]:
        frame = Frame(
            FrameType[v["type"]],
            v["flags"],
            v["kind"],
            v["session"],
            v["seq"],
            v["ack"],
            v["sack"],
            v["window"],
            bytes.fromhex(v["payload"]),
        )
        out.append((frame, bytes.fromhex(v["wire"])))
    return out


def test_crc32c_check_value() -> None:
    check = VECTORS["crc32c_check"]
    assert crc32c(check["input_ascii"].encode()) == int(check["crc"], 16)


def test_header_layout_written_out_by_hand() -> None:
    frame = Frame(FrameType.ACK, 0, 0, 0x11111111, 0, 0x00010000, 0xFFFF, 32)
    expected = bytes.fromhex("01 04 00 00 11111111 00000000 00010000 ffff 0020 0000")
    body = encode_body(frame)
    assert body[:HEADER_SIZE] == expected
    assert body[HEADER_SIZE:] == crc32c(expected).to_bytes(4, "big")


@pytest.mark.parametrize(("frame", "wire"), vector_frames(), ids=lambda x: getattr(x, "type", ""))
def test_golden_vectors_encode_and_decode(frame: Frame, wire: bytes) -> None:
    assert encode_frame(frame) == wire
    assert wire[0] == 0 and wire[-1] == 0
    assert 0 not in wire[1:-1]
    assert FrameDecoder().feed(wire) == [frame]


def test_stream_whole_byte_by_byte_and_with_trailing_bytes() -> None:
    frames = [f for f, _ in vector_frames()]
    stream = b"".join(w for _, w in vector_frames())
    assert FrameDecoder().feed(stream) == frames
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == frames
    dec = FrameDecoder()
    assert dec.feed(stream + encode_frame(frames[0])[:-5]) == frames
    assert dec.feed(encode_frame(frames[0])[-5:]) == [frames[0]]


def test_garbage_before_inside_and_after_frames() -> None:
    (f1, w1), (_f2, w2), (f3, w3) = vector_frames()[:3]
    dec = FrameDecoder()
    # garbage before: the leading delimiter of w1 ends it
    assert dec.feed(b"\x13\x37noise" + w1) == [f1]
    # garbage inside w2: w2 is lost (CRC/COBS), w3 survives
    corrupt = bytearray(w2)
    corrupt[len(corrupt) // 2] ^= 0x55
    assert dec.feed(bytes(corrupt) + w3) == [f3]
    # garbage after
    assert dec.feed(b"\xff\xfe\xfd") == []
    assert dec.feed(w1) == [f1]
    stats = dec.statistics()
    assert stats["frames"] == 3
    assert sum(v for k, v in stats.items() if k.startswith("dropped_")) >= 2


def test_oversized_run_is_discarded_and_decoder_recovers() -> None:
    frame, wire = vector_frames()[0]
    dec = FrameDecoder()
    assert dec.feed(b"\x01" * (MAX_ENCODED + 10)) == []
    assert len(dec._buf) == 0  # bounded: nothing kept while hunting
    assert dec.feed(b"\x01" * 100000) == []
    assert dec.feed(wire) == [frame]
    assert dec.statistics()["dropped_oversized"] == 1


def test_maximum_sizes() -> None:
    big = Frame(FrameType.DATA, payload=bytes(MAX_PAYLOAD))
    wire = encode_frame(big)
    assert len(wire) - 2 <= MAX_ENCODED
    assert FrameDecoder().feed(wire) == [big]
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(FrameType.DATA, payload=bytes(MAX_PAYLOAD + 1)))
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(FrameType.DATA, seq=1 << 32))
    with pytest.raises(LocalProtocolError):
        encode_frame(Frame(FrameType.DATA, flags=0x80))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:10], "short"),
        (lambda b: bytes([2]) + b[1:], "crc"),  # version changed, CRC now wrong
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "crc"),
    ],
)
def test_decode_body_errors(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    body = encode_body(Frame(FrameType.PING, session=5))
    with pytest.raises(FrameError, match=reason):
        decode_body(mutate(body))


def test_decode_body_checks_fields_behind_a_valid_crc() -> None:
    def with_crc(header_and_payload: bytes) -> bytes:
        return header_and_payload + crc32c(header_and_payload).to_bytes(4, "big")

    good = encode_body(Frame(FrameType.PING, session=5))[:-4]
    with pytest.raises(FrameError, match="version"):
        decode_body(with_crc(b"\x02" + good[1:]))
    with pytest.raises(FrameError, match="type"):
        decode_body(with_crc(good[:1] + b"\x09" + good[2:]))
    with pytest.raises(FrameError, match="flags"):
        decode_body(with_crc(good[:2] + b"\x80" + good[3:]))
    with pytest.raises(FrameError, match="length"):
        decode_body(with_crc(good + b"extra"))


def test_serial_number_arithmetic_wraps() -> None:
    assert seq_lt(0xFFFFFFFF, 0)
    assert not seq_lt(0, 0xFFFFFFFF)
    assert seq_add(0xFFFFFFFF, 2) == 1
    assert not seq_lt(5, 5)


frames = st.builds(
    Frame,
    type=st.sampled_from(list(FrameType)),
    flags=st.integers(0, 15),
    kind=st.integers(0, 255),
    session=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    sack=st.integers(0, 2**16 - 1),
    window=st.integers(0, 2**16 - 1),
    payload=st.binary(max_size=600),
)


@given(st.binary(max_size=5000))
def test_random_bytes_never_raise(data: bytes) -> None:
    dec = FrameDecoder()
    for frame in dec.feed(data):
        assert isinstance(frame, Frame)
    assert dec.statistics()["bytes_in"] == len(data)


@given(st.lists(frames, max_size=8), st.integers(1, 50))
def test_any_frames_round_trip_in_any_chunking(fs: list[Frame], chunk: int) -> None:
    stream = b"".join(encode_frame(f) for f in fs)
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(0, len(stream), chunk):
        got += dec.feed(stream[i : i + chunk])
    assert got == fs


@given(st.lists(st.tuples(frames, st.binary(max_size=40)), max_size=8))
def test_garbage_between_frames_loses_no_frame(items: list[tuple[Frame, bytes]]) -> None:
    # Garbage without a delimiter glued between frames: every frame survives,
    # because each frame starts with its own delimiter.
    stream = b"".join(g.replace(b"\x00", b"\x01") + encode_frame(f) for f, g in items)
    assert FrameDecoder().feed(stream) == [f for f, _ in items]


@given(frames, st.integers(0, 10_000), st.integers(0, 7))
def test_a_flipped_bit_is_never_delivered_as_a_different_frame(
    frame: Frame, pos: int, bit: int
) -> None:
    wire = bytearray(encode_frame(frame))
    pos = 1 + pos % (len(wire) - 2)
    wire[pos] ^= 1 << bit
    got = FrameDecoder().feed(bytes(wire))
    assert got in ([], [frame])
