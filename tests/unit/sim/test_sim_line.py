"""The sans-I/O UART line model: pacing, impairments, cut, power, accounting."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import ConfigError, OptogateError
from host_tools.sim.line import (
    DATA_BITS,
    MIN_FIFO_BYTES,
    ImpairmentError,
    Impairments,
    LineModel,
    PowerChanged,
    UnknownSide,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

LOSS_KEYS = ("bytes_dropped", "lost_cut", "lost_power", "lost_unheard", "overrun")


def counters(model: LineModel, direction: str) -> dict[str, int]:
    stats = model.statistics()[direction]
    assert isinstance(stats, dict)
    return stats


def run_until(model: LineModel, side: str, end: float, step: float) -> bytes:
    """Collect what ``side`` receives, polling every ``step`` seconds up to ``end``."""
    out = bytearray()
    t = 0.0
    while t <= end:
        out += model.receive(side, t)
        t += step
    out += model.receive(side, end)
    return bytes(out)


def hamming(x: bytes, y: bytes) -> int:
    return sum(bin(p ^ q).count("1") for p, q in zip(x, y, strict=True))


# -- pacing -------------------------------------------------------------------


def test_a_busy_line_carries_baud_over_ten_bytes_per_second() -> None:
    model = LineModel(9600)  # 960 bytes/s: one byte every 1/960 s
    data = bytes(range(256)) * 4
    model.transmit("a", data, 0.0)
    assert model.receive("b", 0.0) == b""
    half = model.receive("b", 0.5)
    assert len(half) == 480
    rest = model.receive("b", len(data) / 960)
    assert half + rest == data
    assert model.next_deadline() is None


def test_each_byte_arrives_when_its_last_bit_has_left() -> None:
    model = LineModel(115200)
    byte_time = 10 / 115200
    model.transmit("b", b"xyz", 1.0)
    assert model.next_deadline() == pytest.approx(1.0 + byte_time)
    assert model.receive("a", 1.0 + 0.99 * byte_time) == b""
    assert model.receive("a", 1.0 + byte_time) == b"x"
    assert model.receive("a", 1.0 + 3 * byte_time) == b"yz"


def test_a_line_that_fell_idle_starts_the_next_byte_at_once() -> None:
    model = LineModel(9600)
    model.transmit("a", b"1", 0.0)
    assert model.receive("b", 10.0) == b"1"
    model.transmit("a", b"2", 20.0)
    assert model.receive("b", 20.0 + 1 / 960) == b"2"


def test_the_fifo_is_small_and_frees_as_the_line_drains() -> None:
    model = LineModel(115200)
    fifo = model.room("a", 0.0)
    assert MIN_FIFO_BYTES <= fifo <= 64  # a few milliseconds of line time, not a pty's kilobytes
    model.transmit("a", b"\x55" * fifo, 0.0)
    assert model.room("a", 0.0) == 0
    assert model.room("a", 10 / 115200) == 1
    assert model.room("b", 0.0) == fifo  # the other direction is independent
    assert model.room("a", 1.0) == fifo


def test_a_fast_line_holds_a_few_milliseconds_in_its_fifo() -> None:
    assert LineModel(921600).room("a", 0.0) == math.ceil(0.004 * 92160)


def test_the_model_never_refuses_bytes_beyond_the_fifo() -> None:
    model = LineModel(9600)
    model.transmit("a", b"z" * 1000, 0.0)
    assert model.room("a", 0.0) == 0
    assert model.receive("b", 1000 / 960) == b"z" * 1000


def test_polling_granularity_does_not_change_timing_or_errors() -> None:
    data = random.Random(5).randbytes(5000)
    outs = []
    for step in (0.0007, 0.013, 1.0):
        model = LineModel(57600, Impairments(ber=1e-3, drop=1e-3, latency=0.01), seed=9)
        model.transmit("a", data, 0.0)
        outs.append((run_until(model, "b", 2.0, step), model.statistics()))
    assert outs[0] == outs[1] == outs[2]


def test_time_running_backwards_is_treated_as_the_latest_time_seen() -> None:
    model = LineModel(9600)
    model.transmit("a", b"ab", 0.0)
    assert model.receive("b", 1.0) == b"ab"
    model.transmit("a", b"c", 0.5)  # earlier than 1.0: sent from 1.0
    assert model.receive("b", 1.0) == b""
    assert model.receive("b", 1.0 + 1 / 960) == b"c"


# -- impairments --------------------------------------------------------------


def test_bit_errors_match_the_rate_and_the_counter() -> None:
    n = 100_000
    ber = 1e-3
    model = LineModel(921600, Impairments(ber=ber), seed=3)
    data = random.Random(1).randbytes(n)
    model.transmit("a", data, 0.0)
    got = model.receive("b", 100.0)
    assert len(got) == n  # bit errors never add or remove bytes
    flips = counters(model, "a->b")["bits_flipped"]
    assert flips == hamming(data, got)
    expected = n * DATA_BITS * ber
    assert abs(flips - expected) < 5 * math.sqrt(expected)


def test_a_zero_rate_line_is_clean_and_a_rate_of_one_flips_every_bit() -> None:
    data = random.Random(2).randbytes(1000)
    clean = LineModel(115200, seed=4)
    clean.transmit("a", data, 0.0)
    assert clean.receive("b", 10.0) == data
    noisy = LineModel(115200, Impairments(ber=1.0), seed=4)
    noisy.transmit("a", data, 0.0)
    assert noisy.receive("b", 10.0) == bytes(b ^ 0xFF for b in data)


def test_drops_match_the_rate_and_keep_order() -> None:
    n = 100_000
    model = LineModel(921600, Impairments(drop=0.01), seed=7)
    data = bytes(i % 251 for i in range(n))
    model.transmit("b", data, 0.0)
    got = model.receive("a", 100.0)
    dropped = counters(model, "b->a")["bytes_dropped"]
    assert len(got) == n - dropped
    assert abs(dropped - n * 0.01) < 5 * math.sqrt(n * 0.01)
    # What survives is a subsequence of what was sent.
    it = iter(data)
    assert all(any(b == x for x in it) for b in got)


def test_drop_rate_one_loses_everything() -> None:
    model = LineModel(9600, Impairments(drop=1.0))
    model.transmit("a", b"abc", 0.0)
    assert model.receive("b", 1.0) == b""
    assert counters(model, "a->b")["bytes_dropped"] == 3


def test_latency_delays_delivery_and_keeps_order_when_lowered() -> None:
    model = LineModel(9600, Impairments(latency=0.5))
    model.transmit("a", b"1", 0.0)
    assert model.receive("b", 0.4) == b""
    assert model.receive("b", 0.5 + 1 / 960) == b"1"
    model.transmit("a", b"2", 1.0)
    model.set_impairments(Impairments(latency=0.0), 1.0 + 1 / 960)  # "2" already sent at 0.5 s
    model.transmit("a", b"3", 1.0 + 1 / 960)
    assert model.receive("b", 1.0 + 2 / 960) == b""  # "3" may not overtake "2"
    assert model.receive("b", 1.6) == b"23"


def test_the_same_seed_replays_and_another_seed_differs() -> None:
    data = bytes(10_000)

    def run(seed: int) -> bytes:
        model = LineModel(115200, Impairments(ber=1e-3, drop=1e-3), seed=seed)
        model.transmit("a", data, 0.0)
        return model.receive("b", 10.0)

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_traffic_one_way_does_not_change_errors_the_other_way() -> None:
    data = bytes(20_000)
    outs = []
    for reverse in (False, True):
        model = LineModel(115200, Impairments(ber=1e-3), seed=5)
        if reverse:
            model.transmit("b", bytes(5000), 0.0)
        model.transmit("a", data, 0.0)
        outs.append(model.receive("b", 10.0))
    assert outs[0] == outs[1]


# -- cut, power, listening -----------------------------------------------------


def test_a_cut_loses_exactly_the_bytes_that_finish_during_it() -> None:
    model = LineModel(9600)
    model.transmit("a", b"x" * 960, 0.0)  # one second of line time
    assert model.set_cut(True, 0.25)
    assert not model.set_cut(True, 0.3)  # already cut
    assert model.set_cut(False, 0.75)
    got = model.receive("b", 1.0)
    c = counters(model, "a->b")
    assert c["lost_cut"] == 480
    assert len(got) == 480
    assert not model.is_cut


def test_powering_a_side_off_silences_it_both_ways_and_reports_once() -> None:
    model = LineModel(9600)
    assert model.set_power("a", False, 0.0) == PowerChanged("a", False)
    assert model.set_power("a", False, 0.1) is None
    assert not model.power("a")
    model.transmit("a", b"from-a", 0.2)
    model.transmit("b", b"to-a", 0.2)
    assert model.receive("b", 1.0) == b""
    assert model.receive("a", 1.0) == b""
    assert counters(model, "a->b")["lost_power"] == 6
    assert counters(model, "b->a")["lost_power"] == 4
    assert model.set_power("a", True, 1.0) == PowerChanged("a", True)
    model.transmit("a", b"back", 1.0)
    assert model.receive("b", 2.0) == b"back"


def test_bytes_in_the_fifo_at_power_off_are_lost() -> None:
    model = LineModel(9600)
    model.transmit("b", b"y" * 96, 0.0)  # 0.1 s of line time
    model.set_power("b", False, 0.05)
    assert len(model.receive("a", 1.0)) == 48
    assert counters(model, "b->a")["lost_power"] == 48


def test_bytes_for_a_side_nobody_has_open_are_lost() -> None:
    model = LineModel(9600)
    assert model.set_listening("b", False, 0.0)
    model.transmit("a", b"hello", 0.0)
    assert model.receive("b", 1.0) == b""
    assert counters(model, "a->b")["lost_unheard"] == 5
    assert model.set_listening("b", True, 1.0)
    model.transmit("a", b"again", 1.0)
    assert model.receive("b", 2.0) == b"again"


def test_an_overrun_moves_bytes_from_delivered_to_overrun() -> None:
    model = LineModel(9600)
    model.transmit("a", b"abcd", 0.0)
    assert model.receive("b", 1.0) == b"abcd"
    model.note_overrun("b", 3)
    c = counters(model, "a->b")
    assert (c["bytes_delivered"], c["overrun"]) == (1, 3)
    with pytest.raises(ImpairmentError):
        model.note_overrun("b", 2)
    assert counters(model, "a->b") == c


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ber": -0.1},
        {"ber": 1.5},
        {"drop": 2},
        {"ber": math.nan},
        {"drop": True},
        {"latency": -1.0},
        {"latency": math.inf},
        {"latency": 3600.0},
        {"ber": "0.1"},
    ],
)
def test_bad_impairments_raise_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ImpairmentError) as info:
        Impairments(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, OptogateError)


@pytest.mark.parametrize("baud", [0, 10, -9600, 20_000_000, 9600.0, True])
def test_bad_baud_rates_raise(baud: object) -> None:
    with pytest.raises(ImpairmentError):
        LineModel(baud)  # type: ignore[arg-type]


def test_unknown_sides_raise_and_change_nothing() -> None:
    model = LineModel(9600)
    before = model.statistics()
    for call in (
        lambda: model.transmit("c", b"x", 0.0),
        lambda: model.receive("ab", 0.0),
        lambda: model.room("", 0.0),
        lambda: model.set_power("A", False, 0.0),
        lambda: model.set_listening("b->a", False, 0.0),
        lambda: model.power("x"),
    ):
        with pytest.raises(UnknownSide):
            call()
    assert model.statistics() == before


# -- accounting -------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("send"), st.sampled_from("ab"), st.binary(max_size=300)),
    st.tuples(st.just("cut"), st.booleans()),
    st.tuples(st.just("power"), st.sampled_from("ab"), st.booleans()),
    st.tuples(st.just("listen"), st.sampled_from("ab"), st.booleans()),
    st.tuples(
        st.just("set"),
        st.floats(0, 0.1),
        st.floats(0, 0.1),
        st.floats(0, 0.05),
    ),
    st.tuples(st.just("recv"), st.sampled_from("ab")),
)


@given(
    seed=st.integers(0, 2**32),
    steps=st.lists(st.tuples(st.floats(0, 0.05), operation), max_size=40),
)
def test_every_byte_is_delivered_lost_or_in_flight(
    seed: int, steps: list[tuple[float, tuple[object, ...]]]
) -> None:
    model = LineModel(19200, seed=seed)
    received = {"a": 0, "b": 0}
    now = 0.0
    for dt, op in steps:
        now += dt
        kind = op[0]
        if kind == "send":
            model.transmit(str(op[1]), bytes(op[2]), now)  # type: ignore[arg-type]
        elif kind == "cut":
            model.set_cut(bool(op[1]), now)
        elif kind == "power":
            model.set_power(str(op[1]), bool(op[2]), now)
        elif kind == "listen":
            model.set_listening(str(op[1]), bool(op[2]), now)
        elif kind == "set":
            ber, drop, latency = op[1:]
            model.set_impairments(Impairments(ber, drop, latency), now)  # type: ignore[arg-type]
        else:
            received[str(op[1])] += len(model.receive(str(op[1]), now))
        for direction in ("a->b", "b->a"):
            c = counters(model, direction)
            assert c["bytes_in"] == c["bytes_delivered"] + c["in_flight"] + sum(
                c[k] for k in LOSS_KEYS
            )
    # Drain: everything ends up delivered or lost, and the receivers saw exactly
    # what was counted as delivered.
    end = now + 1.0
    for side in "ab":
        received[side] += len(model.receive(side, end))
    assert model.in_flight() == 0
    assert model.next_deadline() is None
    assert counters(model, "a->b")["bytes_delivered"] == received["b"]
    assert counters(model, "b->a")["bytes_delivered"] == received["a"]
