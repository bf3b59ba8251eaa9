"""The isolator's filter core under CPython: rules, counters, rates, configuration."""

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import ConfigError
from firmware.common.link.framing import Flag, Frame, FrameDecoder, FrameType
from firmware.common.link.kinds import Kind
from firmware.isolator import filtercore, hostconfig, suite, vectors
from firmware.isolator.errors import IsolatorConfigError
from firmware.isolator.filtercore import A_TO_B, B_TO_A, DROP_REASONS, Filter, FilterConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

STANDARD = suite.standard_vectors()


def run(vector: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(vectors.run_vector(json.dumps(vector)))
    return result


def decode_all(data: bytes) -> list[Frame]:
    """Decode with the project's codec and require that every byte made a valid frame."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    stats = decoder.statistics()
    assert set(stats) == {"frames", "bytes_in"}, f"isolator emitted something invalid: {stats}"
    return frames


def drops(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.startswith("dropped_") and v}


@pytest.mark.parametrize("vec", STANDARD, ids=[v["name"] for v in STANDARD])
def test_standard_vector(vec: dict[str, Any]) -> None:
    result = run(vec)
    got = [len(decode_all(bytes.fromhex(h))) for h in result["out"]]
    assert got == vec["expect"]
    sent = FrameDecoder().feed(b"".join(bytes.fromhex(h) for _, _, h in vec["steps"]))
    for h in result["out"]:
        for frame in decode_all(bytes.fromhex(h)):
            assert frame in sent, "a forwarded frame must be one that was sent, unchanged"
    if vec["reason"] is not None:
        direction = vec["steps"][0][0]
        assert drops(result["stats"][direction]) == {f"dropped_{vec['reason']}": 1}


@pytest.mark.parametrize("maintenance", [False, True])
@pytest.mark.parametrize("direction", [A_TO_B, B_TO_A])
@pytest.mark.parametrize("kind", list(Kind), ids=[k.name for k in Kind])
def test_every_kind_each_direction(kind: Kind, direction: str, maintenance: bool) -> None:
    core = Filter(FilterConfig(suite.shipped_config(maintenance)))
    frame = suite.data_frame(kind, direction, b"payload of " + kind.name.encode())
    out = core.feed(direction, frame, 0)
    stats = core.statistics()[direction]
    if suite.allowed(kind, direction, maintenance):
        assert out == frame  # re-encoded from parsed fields: byte for byte the same
        assert stats["frames_out"] == 1
        assert drops(stats) == {}
    else:
        assert out == b""
        assert drops(stats) == {"dropped_kind": 1}


def test_allowlist_follows_kind_ranges() -> None:
    cfg = FilterConfig(suite.shipped_config(maintenance=False))
    assert all(k in range(0x40, 0x80) for k in cfg.allowed[A_TO_B])
    assert all(k in range(0x01, 0x40) for k in cfg.allowed[B_TO_A])
    cfg = FilterConfig(suite.shipped_config(maintenance=True))
    maint = {k for k in Kind if 0x80 <= k <= 0xBF}
    assert maint <= set(cfg.allowed[A_TO_B])
    assert maint <= set(cfg.allowed[B_TO_A])


def test_shipped_allowlist_covers_every_optical_kind() -> None:
    """A new Kind must be added to isolator.json (or to suite.UPLINK_ONLY) deliberately."""
    raw = hostconfig.load_raw()
    listed = {int(k, 0): spec["name"] for k, spec in raw["kinds"].items()}
    expected = {int(k): k.name for k in Kind if k not in suite.UPLINK_ONLY}
    assert listed == expected


@pytest.mark.parametrize("direction", [A_TO_B, B_TO_A])
def test_direction_bit_must_match_the_side(direction: str) -> None:
    other = B_TO_A if direction == A_TO_B else A_TO_B
    kind = Kind.STATUS if direction == B_TO_A else Kind.STATUS_REPORT
    core = Filter(FilterConfig(suite.shipped_config()))
    spoofed = suite.data_frame(kind, other)
    assert core.feed(direction, spoofed, 0) == b""
    assert drops(core.statistics()[direction]) == {"dropped_direction": 1}


def test_flood_is_cut_to_the_budget_and_refills() -> None:
    raw = suite.shipped_config()
    raw["rate"][A_TO_B] = {
        "frames_per_s": 100,
        "frame_burst": 5,
        "bytes_per_s": 1_000_000,
        "byte_burst": 100_000,
    }
    core = Filter(FilterConfig(raw))
    frame = suite.data_frame(Kind.STATUS_REPORT, A_TO_B)
    assert len(decode_all(core.feed(A_TO_B, frame * 1000, 0))) == 5
    assert core.statistics()[A_TO_B]["dropped_rate"] == 995
    # 100 frames/s: 10 ms buys one frame
    assert len(decode_all(core.feed(A_TO_B, frame * 10, 30))) == 3
    # a clock that goes backwards refills nothing
    assert core.feed(A_TO_B, frame, 10) == b""
    # the other direction has its own budget
    ping = suite.control_frame(FrameType.PING, B_TO_A)
    assert core.feed(B_TO_A, ping, 0) == ping


def test_byte_budget_limits_large_frames() -> None:
    raw = suite.shipped_config()
    raw["rate"][A_TO_B] = {
        "frames_per_s": 10_000,
        "frame_burst": 1000,
        "bytes_per_s": 10_000,
        "byte_burst": 10_000,
    }
    core = Filter(FilterConfig(raw))
    big = suite.data_frame(Kind.SERVICE, A_TO_B, bytes(4000), msg_len=1 << 20, flags=0)
    out = core.feed(A_TO_B, big * 4, 0)
    assert len(decode_all(out)) == 2  # 2 x ~4.1 KB fit in 10,000 bytes, a third does not
    stats = core.statistics()[A_TO_B]
    assert stats["dropped_rate"] == 2
    assert stats["bytes_out"] == len(out) <= 10_000


def test_statistics_schema_is_stable() -> None:
    core = Filter(FilterConfig(suite.shipped_config()))
    stats = core.statistics()
    assert set(stats) == {A_TO_B, B_TO_A}
    keys = {"bytes_in", "frames_in", "frames_out", "bytes_out"} | {
        f"dropped_{r}" for r in DROP_REASONS
    }
    for counters in stats.values():
        assert set(counters) == keys
        assert all(v == 0 for v in counters.values())
    with pytest.raises(ValueError, match="direction"):
        core.feed("a->c", b"", 0)


def test_crc_check_value() -> None:
    assert filtercore.crc32c(b"123456789") == bytes.fromhex("E3069283")
    assert filtercore.crc32c(b"") == bytes(4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("kinds"), "kinds"),
        (lambda c: c["kinds"].update({"0xC0": {"max_msg": 1}}), "no allowed range"),
        (lambda c: c["kinds"].update({"zz": {"max_msg": 1}}), "bad message kind"),
        (lambda c: c["kinds"].update({"0x41": {"max_msg": -1}}), "max_msg"),
        (lambda c: c["kinds"].update({"0x41": {"max_msg": "big"}}), "integer"),
        (lambda c: c["kinds"].update({"0x41": 5}), "object"),
        (lambda c: c.update(maintenance="yes"), "maintenance"),
        (lambda c: c.update(max_payload=5000), "max_payload"),
        (lambda c: c.update(hello_max=True), "integer"),
        (lambda c: c.pop("rate"), "rate"),
        (lambda c: c["rate"].pop(B_TO_A), "b->a"),
        (lambda c: c["rate"][A_TO_B].update(byte_burst=4000), "byte_burst"),
        (lambda c: c["rate"][A_TO_B].pop("frames_per_s"), "frames_per_s"),
        (lambda c: c["rate"][A_TO_B].update(frames_per_s=0), "frames_per_s"),
    ],
)
def test_bad_configuration_is_refused(mutate: Any, message: str) -> None:
    raw = suite.shipped_config()
    mutate(raw)
    with pytest.raises(filtercore.FilterConfigError, match=message):
        FilterConfig(raw)
    with pytest.raises(IsolatorConfigError, match=message) as caught:
        hostconfig.parse(raw)
    assert isinstance(caught.value, ConfigError)


def test_lower_max_payload_shrinks_what_passes() -> None:
    raw = suite.shipped_config()
    raw["max_payload"] = 512
    core = Filter(FilterConfig(raw))
    small = suite.data_frame(Kind.SERVICE, A_TO_B, bytes(504), msg_len=10_000, flags=0)
    large = suite.data_frame(Kind.SERVICE, A_TO_B, bytes(505), msg_len=10_000, flags=0)
    assert core.feed(A_TO_B, small + large, 0) == small
    assert drops(core.statistics()[A_TO_B]) == {"dropped_oversized": 1}


# -- properties ---------------------------------------------------------------


def piece_strategy() -> st.SearchStrategy[bytes]:
    """Valid frames of every kind and type, broken frames, and raw garbage."""
    directions = st.sampled_from([A_TO_B, B_TO_A])
    data = st.builds(
        suite.data_frame,
        st.sampled_from([int(k) for k in Kind] + [0, 0x3F, 0x40, 0xC5]),
        directions,
        st.binary(max_size=64),
    )
    control = st.builds(
        suite.control_frame,
        st.sampled_from([FrameType.HELLO, FrameType.HELLO_ACK, FrameType.ACK, FrameType.PING]),
        directions,
    )
    corrupt = st.tuples(data, st.integers(1, 200), st.integers(1, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
    )
    return st.one_of(data, control, corrupt, st.binary(max_size=80))


@given(
    pieces=st.lists(piece_strategy(), max_size=12),
    direction=st.sampled_from([A_TO_B, B_TO_A]),
    maintenance=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_only_valid_allowed_frames_come_out_whatever_the_split(
    pieces: list[bytes], direction: str, maintenance: bool, seed: int
) -> None:
    stream = b"".join(pieces)
    whole = Filter(FilterConfig(suite.shipped_config(maintenance)))
    out = whole.feed(direction, stream, 0)
    for frame in decode_all(out):
        assert frame.has(Flag.FROM_CLIENT) == (direction == B_TO_A)
        if frame.type == FrameType.DATA:
            assert suite.allowed(frame.kind, direction, maintenance)
        else:
            assert frame.kind == 0
    # fed in random pieces (seeded), the same frames come out
    rng = random.Random(seed)
    split = Filter(FilterConfig(suite.shipped_config(maintenance)))
    got = bytearray()
    i = 0
    while i < len(stream):
        n = rng.randrange(1, 40)
        got += split.feed(direction, stream[i : i + n], 0)
        i += n
    assert bytes(got) == out
    assert split.statistics() == whole.statistics()
    stats = whole.statistics()[direction]
    assert stats["bytes_in"] == len(stream)
    assert stats["bytes_out"] == len(out)
    # every delimited frame is forwarded or counted as dropped (an over-long
    # run is counted as dropped before its delimiter arrives)
    assert (
        stats["frames_out"]
        <= stats["frames_in"]
        <= stats["frames_out"] + sum(drops(stats).values())
    )
