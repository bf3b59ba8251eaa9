"""The pure codec the board runs and the C-accelerated one the simulator uses agree."""

import random

import pytest
from cobs import cobs
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import ConfigError
from firmware.common.link import framing
from firmware.common.link.framing import FrameType
from firmware.common.link.kinds import Kind
from firmware.isolator import filtercore, suite
from firmware.isolator.fastcodec import FastCodec, best_codec
from firmware.isolator.filtercore import A_TO_B, B_TO_A, PureCodec
from firmware.isolator.simbox import IsolatorMiddlebox

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# bytes rich in zeros and in 254-byte runs, where COBS has its edge cases
zeroish = st.lists(
    st.one_of(st.just(b"\x00"), st.binary(min_size=250, max_size=260), st.binary(max_size=8)),
    max_size=6,
).map(b"".join)


@given(data=st.one_of(st.binary(max_size=1200), zeroish))
def test_cobs_encode_matches_the_package(data: bytes) -> None:
    assert filtercore.cobs_encode(data) == cobs.encode(data)
    assert filtercore.cobs_decode(cobs.encode(data)) == data


@given(data=st.binary(max_size=600))
def test_cobs_decode_rejects_what_the_package_rejects(data: bytes) -> None:
    try:
        expected: bytes | None = cobs.decode(data)
    except cobs.DecodeError:
        expected = None
    assert filtercore.cobs_decode(data) == expected
    assert FastCodec().cobs_decode(data) == expected


@given(data=st.binary(max_size=2000))
def test_crc_matches_the_package(data: bytes) -> None:
    assert filtercore.crc32c(data) == framing.crc32c(data).to_bytes(4, "big")
    assert FastCodec().crc32c(data) == filtercore.crc32c(data)


def test_best_codec_is_the_fast_one_here() -> None:
    assert isinstance(best_codec(), FastCodec)


def random_traffic(rng: random.Random, direction: str) -> bytes:
    """A seeded mix of valid frames of every kind, corrupted frames and noise."""
    parts = []
    for _ in range(rng.randrange(1, 30)):
        roll = rng.random()
        if roll < 0.5:
            kind = rng.choice(list(Kind))
            frame = suite.data_frame(kind, direction, rng.randbytes(rng.randrange(0, 4000)))
        elif roll < 0.7:
            frame = suite.control_frame(rng.choice([FrameType.PING, FrameType.ACK]), direction)
        elif roll < 0.85:
            frame = bytearray(suite.data_frame(Kind.SERVICE, direction, rng.randbytes(100)))
            frame[rng.randrange(1, len(frame) - 1)] = rng.randrange(1, 256)
            frame = bytes(frame)
        else:
            frame = rng.randbytes(rng.randrange(1, 300))
        parts.append(frame)
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(8))
def test_simbox_fast_and_pure_paths_agree(seed: int) -> None:
    rng = random.Random(seed)
    clock = [0.0]
    fast = IsolatorMiddlebox(clock=lambda: clock[0], fast=True)
    pure = IsolatorMiddlebox(clock=lambda: clock[0], fast=False)
    for _ in range(6):
        direction = rng.choice([A_TO_B, B_TO_A])
        stream = random_traffic(rng, direction)
        i = 0
        while i < len(stream):
            n = rng.randrange(1, 3000)
            assert fast.process(direction, stream[i : i + n]) == pure.process(
                direction, stream[i : i + n]
            )
            i += n
            clock[0] += rng.random() / 50
    assert fast.statistics() == pure.statistics()
    total = fast.statistics()
    assert total[A_TO_B]["frames_out"] + total[B_TO_A]["frames_out"] > 0


def test_simbox_defaults_allow_the_link_test_and_count() -> None:
    box = IsolatorMiddlebox()
    echo = suite.data_frame(Kind.LINK_ECHO, A_TO_B)
    assert box.process(A_TO_B, echo) == echo
    assert box.process(A_TO_B, b"\x00garbage\x00") == b""
    stats = box.statistics()
    assert stats[A_TO_B]["frames_out"] == 1
    assert stats[A_TO_B]["dropped_cobs"] + stats[A_TO_B]["dropped_short"] == 1
    strict = IsolatorMiddlebox(maintenance=None)  # the shipped file: maintenance off
    assert strict.process(B_TO_A, suite.data_frame(Kind.LINK_ECHO, B_TO_A)) == b""
    with pytest.raises(ValueError, match="direction"):
        box.process("outer", b"")


def test_simbox_rejects_bad_configuration() -> None:
    raw = suite.shipped_config()
    del raw["kinds"]
    with pytest.raises(ConfigError, match="kinds"):
        IsolatorMiddlebox(raw)


def test_pure_codec_is_what_the_core_uses_by_default() -> None:
    core = filtercore.DirectionFilter(A_TO_B, filtercore.FilterConfig(suite.shipped_config()))
    assert core.codec is PureCodec
