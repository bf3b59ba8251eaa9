"""Typed messages: round trips, strict decoding, and no crash on any input."""

from __future__ import annotations

import contextlib
import math

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import LocalProtocolError, MessageError
from firmware.common.link import messages as m
from firmware.common.link.kinds import Kind

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

#: One valid example of every message, the request ones with no reply_to.
EXAMPLES: list[m.Message] = [
    m.FetchService(service="dxf-convert", have_version=3),
    m.FetchService(service="pw", have_version=None),
    m.Sync(since_version=0),
    m.UsageReport(batch=b"signed records"),
    m.Status(),
    m.AuthBegin(gateway_id="gw-0001"),
    m.AuthProof(signature=b"\x01" * 64),
    m.Service(sealed_bundle=b"B" * 1000, sealed_licence=b"L"),
    m.Service(sealed_bundle=b"", sealed_licence=b"L", streamed=9000),
    m.ServicePart(offset=4096, data=b"P" * 4096),
    m.SyncData(sealed=b"S"),
    m.UsageAck(batch_id="batch-7"),
    m.StatusReport(fields={"uptime_s": 12, "load": 0.5, "ok": True, "name": "outer"}),
    m.AuthChallenge(nonce=b"n" * 32),
    m.AuthOk(),
    m.Error(code="payment_required", detail="renew 'dxf'", retry_after=None),
    m.Error(code="busy", detail="", retry_after=1.5),
    m.LinkEcho(nonce=b"1234", sent_at=12.25),
    m.LinkEchoReply(nonce=b"1234", sent_at=12.25),
    m.LinkData(chunk=b"x" * 100, index=4, last=True, transfer=0xDEADBEEF),
    m.LinkDigest(sha256=bytes(32), nbytes=1 << 20),
]


def _encode(msg: m.Message, corr: int = 9) -> bytes:
    return m.encode(msg, corr, 5 if msg.IS_REPLY else None)


def _raw(kind: Kind, envelope: object) -> tuple[int, bytes]:
    return int(kind), cbor2.dumps(envelope, canonical=True)


def _envelope(msg: m.Message, **override: object) -> dict[str, object]:
    env: dict[str, object] = {
        "v": m.FORMAT_VERSION,
        "id": 9,
        "re": 5 if msg.IS_REPLY else None,
        "body": m.body_of(msg),
    }
    env.update(override)
    return env


def test_every_kind_has_exactly_one_message_class() -> None:
    assert set(m.MESSAGE_TYPES) == set(Kind)
    for kind, cls in m.MESSAGE_TYPES.items():
        assert cls.KIND is kind
        assert m.message_type(int(kind)) is cls
    assert {type(e) for e in EXAMPLES} == set(m.MESSAGE_TYPES.values())


def test_every_request_has_a_reply_kind() -> None:
    requests = {k for k, cls in m.MESSAGE_TYPES.items() if not cls.IS_REPLY}
    assert set(m.REPLY_KIND) == requests
    for reply in m.REPLY_KIND.values():
        assert m.MESSAGE_TYPES[reply].IS_REPLY


def test_reply_flag_follows_the_kind_ranges() -> None:
    for kind, cls in m.MESSAGE_TYPES.items():
        if kind in range(0x01, 0x40):
            assert not cls.IS_REPLY
        elif kind in range(0x40, 0x80):
            assert cls.IS_REPLY
    assert not m.LinkEcho.IS_REPLY
    assert m.LinkEchoReply.IS_REPLY
    assert not m.LinkData.IS_REPLY
    assert m.LinkDigest.IS_REPLY


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip(msg: m.Message) -> None:
    data = _encode(msg, corr=0xFFFFFFFF)
    back, corr, reply_to = m.decode(msg.KIND, data)
    assert back == msg
    assert type(back) is type(msg)
    assert corr == 0xFFFFFFFF
    assert reply_to == (5 if msg.IS_REPLY else None)
    assert _encode(back, corr=0xFFFFFFFF) == data  # one encoding per message


def test_golden_encoding_of_a_request() -> None:
    # Pins key names, key order (length-first canonical) and integer forms.
    data = m.encode(m.Sync(since_version=7), 1)
    assert data.hex() == (
        "a4"  # map(4)
        "6176"
        "02"  # "v": 2
        "626964"
        "01"  # "id": 1
        "627265"
        "f6"  # "re": null
        "64626f6479"
        "a1"  # "body": map(1)
        "6d73696e63655f76657273696f6e"
        "07"  # "since_version": 7
    )


def test_float_fields_take_ints_locally_and_encode_as_floats() -> None:
    msg = m.LinkEcho(nonce=b"a", sent_at=5)  # type: ignore[arg-type]
    assert msg.sent_at == 5.0
    assert type(msg.sent_at) is float
    assert m.decode(Kind.LINK_ECHO, m.encode(msg, 1))[0] == msg


def test_status_report_copies_its_map() -> None:
    fields: dict[str, str | int | float | bool] = {"a": 1}
    msg = m.StatusReport(fields=fields)
    fields["b"] = 2
    assert msg.fields == {"a": 1}


# ---------------------------------------------------------------- strict decoding


def _rejects(kind: int, data: bytes, match: str) -> m.InvalidMessage:
    with pytest.raises(m.InvalidMessage, match=match) as info:
        m.decode(kind, data)
    assert isinstance(info.value, MessageError)
    return info.value


def test_unknown_kind() -> None:
    data = _encode(m.Status())
    for kind in (0x00, 0x05, 0x3F, 0x7E, 0x84, 0xBF, 0xFF, 0x100, -1):
        _rejects(kind, data, "unknown message kind")


def test_kind_and_body_must_agree() -> None:
    # A Sync body under the Status kind: extra field; under FetchService: missing.
    data = _encode(m.Sync(since_version=1))
    _rejects(Kind.STATUS, data, "unexpected field 'since_version'")
    _rejects(Kind.FETCH_SERVICE, data, "missing field")


def test_missing_field() -> None:
    msg = m.FetchService(service="a", have_version=None)
    kind, data = _raw(Kind.FETCH_SERVICE, _envelope(msg, body={"service": "a"}))
    err = _rejects(kind, data, "missing field have_version")
    assert err.corr_id == 9


def test_extra_field() -> None:
    msg = m.Sync(since_version=1)
    kind, data = _raw(Kind.SYNC, _envelope(msg, body={"since_version": 1, "x": 0}))
    _rejects(kind, data, "unexpected field 'x'")


@pytest.mark.parametrize(
    ("msg", "field", "value", "match"),
    [
        (m.Sync(since_version=1), "since_version", "1", "expected integer"),
        (m.Sync(since_version=1), "since_version", True, "expected integer"),
        (m.Sync(since_version=1), "since_version", 1.0, "expected integer"),
        (m.Sync(since_version=1), "since_version", -1, "outside"),
        (m.Sync(since_version=1), "since_version", 2**63, "outside"),
        (m.FetchService("a", None), "service", b"a", "expected text"),
        (m.FetchService("a", None), "service", "", "length 0"),
        (m.FetchService("a", None), "service", "é" * 65, "outside"),
        (m.FetchService("a", None), "have_version", "3", "expected integer"),
        (m.LinkData(b"", 0, False), "last", 1, "expected bool"),
        (m.LinkData(b"", 0, False), "chunk", "text", "expected bytes"),
        (m.LinkData(b"", 0, False), "index", 2**32, "outside"),
        (m.LinkData(b"", 0, False), "transfer", -1, "outside"),
        (m.LinkDigest(bytes(32), 0), "sha256", bytes(31), "length 31"),
        (m.LinkEcho(b"a", 0.0), "sent_at", 1, "expected float"),
        (m.LinkEcho(b"a", 0.0), "sent_at", math.nan, "not finite"),
        (m.LinkEcho(b"a", 0.0), "sent_at", math.inf, "not finite"),
        (m.LinkEcho(b"a", 0.0), "nonce", b"", "length 0"),
        (m.LinkEcho(b"a", 0.0), "nonce", b"x" * 65, "length 65"),
        (m.Error("x", "", None), "code", "Not A Code", "does not match"),
        (m.Error("x", "", None), "retry_after", -1.0, "outside"),
        (m.Error("x", "", None), "retry_after", "soon", "expected float"),
        (m.AuthChallenge(b"n" * 16), "nonce", b"n" * 15, "length 15"),
        (m.StatusReport({}), "fields", [], "expected map"),
        (m.StatusReport({}), "fields", {"a": None}, "unsupported type"),
        (m.StatusReport({}), "fields", {"a": [1]}, "unsupported type"),
        (m.StatusReport({}), "fields", {"A": 1}, "does not match"),
        (m.StatusReport({}), "fields", {"a": "x" * 1025}, "longer than 1024"),
        (m.StatusReport({}), "fields", {f"k{i}": i for i in range(257)}, "more than 256"),
    ],
)
def test_wrong_type_or_out_of_bounds(msg: m.Message, field: str, value: object, match: str) -> None:
    body = m.body_of(msg)
    body[field] = value
    kind, data = _raw(msg.KIND, _envelope(msg, body=body))
    _rejects(kind, data, match)
    # The same value is refused locally, as a bug of the sender (an int is
    # the one exception: float fields take it and store a float).
    if not (field == "sent_at" and type(value) is int):
        with pytest.raises(LocalProtocolError):
            type(msg)(**body)


def test_oversized_bytes_field() -> None:
    msg = m.AuthProof(signature=b"s")
    big = b"s" * (m.MAX_SIGNATURE + 1)
    kind, data = _raw(Kind.AUTH_PROOF, _envelope(msg, body={"signature": big}))
    _rejects(kind, data, "length 1025 outside")


def test_oversized_message() -> None:
    _rejects(Kind.STATUS, b"\xa0" * (m.MAX_MESSAGE + 1), "> 67108864")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"v": 1}, "unsupported format version"),  # before Service.streamed
        ({"v": 3}, "unsupported format version"),
        ({"v": 2.0}, "unsupported format version"),
        ({"v": True}, "unsupported format version"),
        ({"id": -1}, "id must be"),
        ({"id": 2**32}, "id must be"),
        ({"id": "1"}, "id must be"),
        ({"re": "x"}, "re must be"),
        ({"re": 3}, "is a request but carries re"),
        ({"body": [1]}, "body must be a map"),
    ],
)
def test_bad_envelope(override: dict[str, object], match: str) -> None:
    msg = m.Sync(since_version=1)
    kind, data = _raw(Kind.SYNC, _envelope(msg, **override))
    _rejects(kind, data, match)


def test_reply_must_name_its_request() -> None:
    msg = m.AuthOk()
    kind, data = _raw(Kind.AUTH_OK, _envelope(msg, re=None))
    err = _rejects(kind, data, "names no request")
    assert err.corr_id == 9
    assert err.reply_to is None


def test_envelope_keys_are_exact() -> None:
    msg = m.Status()
    env = _envelope(msg)
    del env["re"]
    _rejects(*_raw(Kind.STATUS, env), "exactly v, id, re, body")
    _rejects(*_raw(Kind.STATUS, {**_envelope(msg), "x": 1}), "exactly v, id, re, body")
    _rejects(*_raw(Kind.STATUS, [1, 2, None, {}]), "exactly v, id, re, body")


def test_broken_reply_names_the_request_it_answers() -> None:
    body = {"nonce": b"", "sent_at": 1.0}
    kind, data = _raw(
        Kind.LINK_ECHO_REPLY, {"v": m.FORMAT_VERSION, "id": 4, "re": 77, "body": body}
    )
    err = _rejects(kind, data, "length 0")
    assert (err.corr_id, err.reply_to) == (4, 77)


def test_non_canonical_encodings_are_refused() -> None:
    good = _encode(m.Sync(since_version=1))
    _rejects(Kind.SYNC, good + b"\x00", "canonical")  # trailing byte
    # "since_version": 1 as a two-byte integer instead of one byte.
    longer = good[:-1] + b"\x18\x01"
    _rejects(Kind.SYNC, longer, "canonical")
    # Same map with keys in a different order.
    env = _envelope(m.Sync(since_version=1))
    unsorted = cbor2.dumps({k: env[k] for k in ("body", "re", "id", "v")})
    _rejects(Kind.SYNC, unsorted, "canonical")
    # A float as float64 where float16 suffices.
    echo = m.LinkEcho(nonce=b"a", sent_at=1.0)
    wide = cbor2.dumps(_envelope(echo), canonical=False)
    assert wide != _encode(echo)
    _rejects(Kind.LINK_ECHO, wide, "canonical")


def test_malformed_cbor() -> None:
    good = _encode(m.Sync(since_version=1))
    for bad in (b"", good[:-1], b"\xff", b"\x1c", b"\xa1\xa0\x00"):
        _rejects(Kind.SYNC, bad, "not valid CBOR|exactly v")


def test_tags_indefinite_lengths_duplicates_and_depth() -> None:
    # Tag 2 (bignum) hiding the integer 1.
    body = {"since_version": cbor2.CBORTag(2, b"\x01")}
    data = cbor2.dumps(_envelope(m.Sync(since_version=1), body=body), canonical=True)
    _rejects(Kind.SYNC, data, "tag")
    # Tag 1 (epoch datetime) and an unknown tag.
    for tag in (1, 0x9999):
        body2 = {"since_version": cbor2.CBORTag(tag, 1)}
        data = cbor2.dumps(_envelope(m.Sync(since_version=1), body=body2), canonical=True)
        _rejects(Kind.SYNC, data, "tag")
    # Indefinite-length map for the body.
    data = _encode(m.Status())
    assert data.endswith(b"\xa0")
    _rejects(Kind.STATUS, data[:-1] + b"\xbf\xff", "indefinite")
    # Duplicate key in the envelope.
    dup = b"\xa5" + _encode(m.Status())[1:] + b"\x61v\x01"
    _rejects(Kind.STATUS, dup, "not valid CBOR")
    # Nested deeper than any message needs.
    deep = m.body_of(m.StatusReport({}))
    deep["fields"] = {"a": {"b": {"c": 1}}}
    _rejects(*_raw(Kind.STATUS_REPORT, _envelope(m.StatusReport({}), body=deep)), "CBOR")


# ---------------------------------------------------------------- encoding misuse


def test_encode_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="reply_to is required"):
        m.encode(m.AuthOk(), 1)
    with pytest.raises(LocalProtocolError, match="reply_to must be None"):
        m.encode(m.Status(), 1, 2)
    for bad in (-1, 2**32, True):
        with pytest.raises(LocalProtocolError, match="corr_id"):
            m.encode(m.Status(), bad)
    with pytest.raises(LocalProtocolError, match="reply_to"):
        m.encode(m.AuthOk(), 1, -5)
    with pytest.raises(LocalProtocolError, match="not a registered message"):
        m.encode(m.Message(), 1)


def test_construction_refuses_bad_values() -> None:
    with pytest.raises(LocalProtocolError, match=r"LinkDigest\.sha256"):
        m.LinkDigest(sha256=b"short", nbytes=0)
    with pytest.raises(LocalProtocolError, match=r"FetchService\.service"):
        m.FetchService(service=7)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="bytes"):
        m.UsageReport(batch=bytearray(b"x"))  # type: ignore[arg-type]


# ---------------------------------------------------------------- property tests

_scalar = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.booleans(),
    st.none(),
)
_cbor_values = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=12,
)


@given(kind=st.integers(0, 255), data=st.binary(max_size=200))
def test_random_bytes_never_crash(kind: int, data: bytes) -> None:
    try:
        msg, corr, reply_to = m.decode(kind, data)
    except m.InvalidMessage:
        return
    assert kind == msg.KIND  # anything accepted is a real, re-encodable message
    assert m.encode(msg, corr, reply_to) == data


@given(kind=st.sampled_from(list(Kind)), body=_cbor_values, corr=st.integers(-2, 2**33))
def test_random_envelopes_never_crash(kind: Kind, body: object, corr: int) -> None:
    data = cbor2.dumps(
        {"v": m.FORMAT_VERSION, "id": corr, "re": None, "body": body}, canonical=True
    )
    try:
        msg, _, _ = m.decode(kind, data)
    except m.InvalidMessage:
        return
    assert m.encode(msg, corr) == data


@given(
    kind=st.sampled_from(list(Kind)),
    seed=st.sampled_from(EXAMPLES),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
)
def test_corrupted_valid_messages_never_crash(
    kind: Kind, seed: m.Message, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(_encode(seed))
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    with contextlib.suppress(m.InvalidMessage):
        m.decode(kind, bytes(data))


@given(
    nonce=st.binary(min_size=1, max_size=m.MAX_NONCE),
    sent_at=st.floats(allow_nan=False, allow_infinity=False),
    corr=st.integers(0, m.MAX_CORR_ID),
)
def test_echo_round_trip_property(nonce: bytes, sent_at: float, corr: int) -> None:
    msg = m.LinkEcho(nonce=nonce, sent_at=sent_at)
    assert m.decode(Kind.LINK_ECHO, m.encode(msg, corr)) == (msg, corr, None)


@given(
    fields=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=40),
            st.booleans(),
        ),
        max_size=20,
    ),
    re_=st.integers(0, m.MAX_CORR_ID),
)
def test_status_report_round_trip_property(
    fields: dict[str, str | int | float | bool], re_: int
) -> None:
    msg = m.StatusReport(fields=fields)
    back, _, reply_to = m.decode(Kind.STATUS_REPORT, m.encode(msg, 3, re_))
    assert back == msg
    assert reply_to == re_
