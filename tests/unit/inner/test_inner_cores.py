"""The inner daemon's pure parts: build board, failure limiter, journal codec, parsers, config."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.keys import SigningKey
from firmware.common.errors import ConfigError
from firmware.common.uplink import verify_usage_batch
from firmware.inner.api import ApiError, parse_cbor, parse_json
from firmware.inner.builder import BuildBoard, BuildState, Ready, Refuse, Start, Wait
from firmware.inner.config import parse_config
from firmware.inner.limiter import FailureLimiter
from firmware.inner.metering import UsageEntry, decode_segment, encode_entry, make_batches
from firmware.inner.observe import EventLog, Metrics

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

H = "ab" * 32


def entry(i: int = 0, outcome: str = "ok") -> UsageEntry:
    return UsageEntry(1_767_225_600 + i, "acme", "echo", "L-1", H, 3, outcome, 10, 20)


# -- build board -------------------------------------------------------------------


def test_board_single_flight_and_backoff() -> None:
    board = BuildBoard(retry_after=2.0)
    assert board.on_call("s", 0.0) == Start()
    assert board.on_call("s", 0.1) == Wait()
    assert board.state("s") is BuildState.BUILDING
    assert board.failed("s", 1.0, "InvalidObject", None) == 2.0
    refuse = board.on_call("s", 2.0)
    assert isinstance(refuse, Refuse)
    assert refuse.retry_after == pytest.approx(1.0)
    assert board.on_call("s", 3.0) == Start()  # backoff over: one new attempt
    assert board.failed("s", 3.0, "x", None) == 4.0  # doubled
    assert board.on_call("s", 7.0) == Start()
    assert board.failed("s", 7.0, "x", None) == 8.0
    assert board.on_call("s", 15.0) == Start()
    assert board.failed("s", 15.0, "x", None) == 16.0  # capped at 8 x retry_after
    assert board.on_call("s", 31.0) == Start()
    assert board.failed("s", 31.0, "x", None) == 16.0
    assert board.on_call("s", 47.0) == Start()
    board.succeeded("s", 3)
    assert board.on_call("s", 47.0) == Ready()
    assert board.version("s") == 3


def test_board_failed_upgrade_keeps_the_built_version() -> None:
    board = BuildBoard(retry_after=2.0)
    board.on_call("s", 0)
    board.succeeded("s", 1)
    assert board.begin_upgrade("s")
    assert board.failed("s", 1.0, "x", None) == 0.0
    assert board.on_call("s", 1.0) == Ready()
    board.removed("s")
    assert board.state("s") is BuildState.ABSENT


def test_board_unreachable_is_not_a_failure() -> None:
    board = BuildBoard(retry_after=2.0)
    assert board.on_call("s", 0) == Start()
    board.unavailable("s", 0.0, "no link", 2.0)
    assert board.on_call("s", 0.1) == Start()  # asks again: the link may be back


# -- limiter -----------------------------------------------------------------------


def test_limiter_blocks_after_max_failures_in_window() -> None:
    lim = FailureLimiter(3, window=10.0, block=5.0)
    assert lim.failed("a", 0.0) is None
    assert lim.failed("a", 1.0) is None
    assert lim.retry_after("a", 1.5) is None
    assert lim.failed("a", 2.0) == 5.0
    assert lim.retry_after("a", 3.0) == pytest.approx(4.0)
    assert lim.retry_after("b", 3.0) is None  # per address
    assert lim.retry_after("a", 7.0) is None


def test_limiter_forgets_old_failures_and_bounds_memory() -> None:
    lim = FailureLimiter(2, window=1.0, block=5.0, max_addresses=3)
    lim.failed("a", 0.0)
    assert lim.failed("a", 5.0) is None  # the first fell out of the window
    for i in range(10):
        lim.failed(f"x{i}", 6.0)
    assert lim.tracked() == 3
    with pytest.raises(ValueError, match="positive"):
        FailureLimiter(0, 1.0, 1.0)


# -- journal codec -------------------------------------------------------------------


def test_segment_round_trip_and_torn_tail() -> None:
    entries = [entry(i) for i in range(5)]
    data = b"".join(encode_entry(e) for e in entries)
    assert decode_segment(data) == (entries, len(data))
    for cut in range(1, 30):  # a torn last entry is cut off, the rest kept
        got, valid = decode_segment(data[:-cut])
        assert got == entries[:4]
        assert valid == len(data) - len(encode_entry(entries[4]))
    flipped = bytearray(data)
    flipped[len(encode_entry(entries[0])) + 12] ^= 1
    assert decode_segment(bytes(flipped))[0] == entries[:1]


@given(st.binary(max_size=600))
def test_decode_segment_never_raises(data: bytes) -> None:
    got, valid = decode_segment(data)
    assert 0 <= valid <= len(data)
    assert all(isinstance(e, UsageEntry) for e in got)


def test_batches_are_deterministic_signed_and_split() -> None:
    key = SigningKey.generate()
    entries = [entry(i, "ok" if i % 2 else "invalid_params") for i in range(5)]
    a = make_batches(entries, key=key, gateway="gw", install_id="0" * 16, segment=7, max_records=2)
    b = make_batches(entries, key=key, gateway="gw", install_id="0" * 16, segment=7, max_records=2)
    assert a == b  # a crash between batching and deleting the segment changes nothing
    assert [bid for bid, _ in a] == [
        "0000000000000000-7-0",
        "0000000000000000-7-1",
        "0000000000000000-7-2",
    ]
    batch = verify_usage_batch(a[0][1], key.public)
    assert [r.units for r in batch.records] == [0, 1]
    assert batch.created == entries[1].at


# -- body parsers ----------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_parse_json_raises_only_api_errors(data: bytes) -> None:
    status = 200
    try:
        parse_json(data, "body")
    except ApiError as e:
        status = e.status
    assert status in {200, 400}


@given(st.binary(max_size=200))
def test_parse_cbor_raises_only_api_errors(data: bytes) -> None:
    status, blob = 200, b""
    try:
        _, blob = parse_cbor(data)
    except ApiError as e:
        status = e.status
    assert status in {200, 400}
    assert isinstance(blob, bytes)


def test_parsers_refuse_deep_nesting_and_constants() -> None:
    with pytest.raises(ApiError):
        parse_json(b"[" * 100_000, "body")
    with pytest.raises(ApiError):
        parse_json(b'{"a": NaN}', "body")
    with pytest.raises(ApiError):
        parse_cbor(cbor2.dumps({"params": {}, "data": "text"}))
    assert parse_cbor(cbor2.dumps({"params": {"a": 1}})) == ({"a": 1}, b"")


# -- config -----------------------------------------------------------------------------

BASE = {"gateway": {"keys_dir": "k", "state_dir": "s"}}


def test_config_defaults_and_paths() -> None:
    cfg = parse_config(BASE, Path("/etc/optogate"))
    assert cfg.keys_dir == Path("/etc/optogate/k")
    assert cfg.api.port == 8443
    assert cfg.link.transport == "serial"
    assert cfg.gpio.backend == "none"


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {**BASE, "api": {"port": "8443"}},
        {**BASE, "api": {"prot": 1}},
        {**BASE, "api": {"port": 0}},
        {**BASE, "link": {"transport": "pigeon"}},
        {**BASE, "link": {"transport": "tcp", "address": "nohost"}},
        {**BASE, "runtime": {"isolate_network": 1}},
        {**BASE, "gpio": {"backend": "sim"}},
        {**BASE, "extra": {}},
        {**BASE, "metering": {"batch_max_records": -1}},
    ],
)
def test_config_errors_name_the_key(doc: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parse_config(doc, Path(tempfile.gettempdir()))


# -- observability ----------------------------------------------------------------------


def test_metrics_render_prometheus_text() -> None:
    m = Metrics()
    m.describe("x_total", "counter", "things")
    m.inc("x_total", {"a": 'q"\\\n'})
    m.inc("x_total", {"a": 'q"\\\n'}, 2)
    m.add_collector(lambda: [("g", {}, 1.5)])
    text = m.render()
    assert '# TYPE x_total counter\nx_total{a="q\\"\\\\\\n"} 3\n' in text
    assert "g 1.5" in text


def test_metrics_counter_adds_to_the_same_series_as_inc() -> None:
    m = Metrics()
    m.describe("calls_total", "counter", "calls")
    add = m.counter("calls_total", {"service": "echo", "outcome": "ok"})
    add(1)
    add(2.5)
    m.inc("calls_total", {"outcome": "ok", "service": "echo"})  # label order does not matter
    m.counter("calls_total", {"service": "dxf2svg", "outcome": "ok"})  # made, never added to
    assert m.value("calls_total", {"service": "echo", "outcome": "ok"}) == 4.5
    text = m.render()
    assert 'calls_total{outcome="ok",service="echo"} 4.5\n' in text
    assert "dxf2svg" not in text  # no series until something is counted


def test_event_log_counts_drops() -> None:
    out = io.StringIO()
    log = EventLog(out, clock=lambda: 1.0)
    log("started", port=1)
    assert json.loads(out.getvalue()) == {"ts": 1.0, "event": "started", "port": 1}
    out.close()
    log("lost")
    assert (log.written, log.dropped) == (1, 1)


_scalars = st.one_of(
    st.integers(-5, 70000), st.floats(allow_nan=False), st.text(max_size=8), st.booleans()
)
_keys = st.sampled_from(
    ["port", "host", "transport", "address", "baud", "pool_size", "user", "backend", "x", "control"]
)


@given(
    st.dictionaries(
        st.sampled_from(["gateway", "api", "link", "runtime", "metering", "gpio", "sim", "zz"]),
        st.dictionaries(_keys, _scalars, max_size=4),
        max_size=5,
    )
)
def test_config_parser_raises_only_config_errors(doc: dict[str, dict[str, object]]) -> None:
    doc = {**doc, "gateway": {"keys_dir": "k", "state_dir": "s"}}
    try:
        cfg = parse_config(doc, Path("/etc/optogate"))
    except ConfigError:
        return
    assert cfg.api.port > 0
