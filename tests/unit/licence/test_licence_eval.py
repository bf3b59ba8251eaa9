"""Licence evaluation: every outcome, every boundary; strict payload decoding."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.apikeys import generate_api_key
from firmware.common.licence import (
    Allow,
    Licence,
    LicenceFormatError,
    LicenceSet,
    NotLicensed,
    PaymentRequired,
    Revoked,
    UnknownCredential,
    decision_body,
    evaluate,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

GW = "gw-1"
T0 = 1_767_225_600
UNTIL = T0 + 30 * 86_400
ALICE = generate_api_key()
BOB = generate_api_key()


def lic(
    licence_id: str = "lic-1",
    service: str = "dxf-convert",
    valid_from: int = T0,
    valid_until: int = UNTIL,
    creds: tuple[str, ...] = (ALICE.key_hash,),
    gateway: str = GW,
    version: int = 1,
) -> Licence:
    return Licence(
        licence_id=licence_id,
        customer="acme",
        gateway=gateway,
        service=service,
        valid_from=valid_from,
        valid_until=valid_until,
        credentials=frozenset(creds),
        version=version,
    )


def lset(*licences: Licence, revoked: tuple[str, ...] = ()) -> LicenceSet:
    return LicenceSet(GW, licences, frozenset(revoked))


def test_allow_inside_period() -> None:
    d = evaluate(lset(lic()), api_key=ALICE.secret, service="dxf-convert", now=T0 + 100)
    assert d == Allow(licence_id="lic-1", customer="acme", service="dxf-convert", valid_until=UNTIL)
    assert d.status == 200


def test_allow_by_hash() -> None:
    d = evaluate(lset(lic()), key_hash=ALICE.key_hash, service="dxf-convert", now=T0)
    assert isinstance(d, Allow)


def test_boundaries_valid_until_inclusive() -> None:
    s = lset(lic())
    assert isinstance(evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=UNTIL), Allow)
    after = evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=UNTIL + 1)
    assert after == PaymentRequired(
        licence_id="lic-1",
        customer="acme",
        renew="dxf-convert",
        valid_from=T0,
        valid_until=UNTIL,
        not_yet_valid=False,
    )
    assert after.status == 402


def test_boundaries_valid_from_inclusive() -> None:
    s = lset(lic())
    assert isinstance(evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0), Allow)
    before = evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0 - 1)
    assert isinstance(before, PaymentRequired)
    assert before.not_yet_valid
    assert before.status == 402


@pytest.mark.parametrize(
    "kwargs",
    [
        {"api_key": BOB.secret},
        {"api_key": "og_live_short"},
        {"api_key": ""},
        {"key_hash": hashlib.sha256(b"x").hexdigest()},
        {},
    ],
)
def test_unknown_credential_401(kwargs: dict[str, str]) -> None:
    d = evaluate(lset(lic()), service="dxf-convert", now=T0, **kwargs)  # type: ignore[arg-type]
    assert d == UnknownCredential()
    assert d.status == 401


def test_credential_of_a_licence_for_another_gateway_is_unknown() -> None:
    s = LicenceSet(GW, (lic(gateway="gw-2"),))
    assert evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0) == UnknownCredential()


def test_not_licensed_for_service_403() -> None:
    d = evaluate(lset(lic()), api_key=ALICE.secret, service="doc-encrypt", now=T0)
    assert d == NotLicensed(service="doc-encrypt")
    assert d.status == 403


def test_revoked_403_even_inside_period() -> None:
    d = evaluate(
        lset(lic(), revoked=("lic-1",)), api_key=ALICE.secret, service="dxf-convert", now=T0
    )
    assert d == Revoked(service="dxf-convert", licence_ids=("lic-1",))
    assert d.status == 403


def test_one_valid_licence_among_revoked_and_expired_allows() -> None:
    s = lset(
        lic("old", valid_until=T0 - 1, valid_from=T0 - 100),
        lic("bad"),
        lic("good", valid_until=UNTIL - 5),
        revoked=("bad",),
    )
    d = evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0 + 1)
    assert isinstance(d, Allow)
    assert d.licence_id == "good"


def test_longest_valid_licence_wins() -> None:
    s = lset(lic("a", valid_until=UNTIL), lic("b", valid_until=UNTIL + 50))
    d = evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0)
    assert isinstance(d, Allow)
    assert d.licence_id == "b"


def test_payment_required_names_the_latest_expired_licence() -> None:
    s = lset(lic("a", valid_until=T0 + 10), lic("b", valid_until=T0 + 20))
    d = evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0 + 100)
    assert isinstance(d, PaymentRequired)
    assert (d.licence_id, d.valid_until, d.renew) == ("b", T0 + 20, "dxf-convert")


def test_credentials_are_per_licence() -> None:
    s = lset(
        lic("a", creds=(ALICE.key_hash,)), lic("b", service="doc-encrypt", creds=(BOB.key_hash,))
    )
    assert isinstance(evaluate(s, api_key=BOB.secret, service="doc-encrypt", now=T0), Allow)
    assert evaluate(s, api_key=BOB.secret, service="dxf-convert", now=T0) == NotLicensed(
        "dxf-convert"
    )


def test_decision_bodies() -> None:
    s = lset(lic())
    bodies = [
        decision_body(evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0)),
        decision_body(evaluate(s, api_key=BOB.secret, service="dxf-convert", now=T0)),
        decision_body(evaluate(s, api_key=ALICE.secret, service="x", now=T0)),
        decision_body(evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=UNTIL + 1)),
        decision_body(evaluate(s, api_key=ALICE.secret, service="dxf-convert", now=T0 - 1)),
    ]
    assert bodies[0] == {"allowed": True, "licence_id": "lic-1"}
    assert [b.get("error") for b in bodies[1:]] == [
        "unknown_credential",
        "not_licensed",
        "licence_expired",
        "not_yet_valid",
    ]
    assert bodies[3]["valid_until"] == UNTIL
    assert bodies[3]["renew"] == "dxf-convert"


# ------------------------------------------------------------------ payload


def test_payload_roundtrip_and_versions() -> None:
    s = lset(lic("a", version=3), lic("b", service="doc-encrypt", version=9), revoked=("z",))
    back = LicenceSet.from_payload(s.to_payload())
    assert back.gateway == s.gateway
    assert set(back.licences) == set(s.licences)
    assert back.revoked == s.revoked
    assert back.versions() == {"licence/a": 3, "licence/b": 9}


def _doc() -> dict[str, object]:
    return cbor2.loads(lset(lic()).to_payload())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(extra=1),
        lambda d: d.pop("revoked"),
        lambda d: d.update(gateway=""),
        lambda d: d.update(licences="nope"),
        lambda d: d["licences"][0].update(valid_from=UNTIL + 1),
        lambda d: d["licences"][0].update(valid_until=-1),
        lambda d: d["licences"][0].update(valid_until=True),
        lambda d: d["licences"][0].update(version=1.0),
        lambda d: d["licences"][0].update(credentials=["not-a-hash"]),
        lambda d: d["licences"][0].update(credentials=[ALICE.secret]),
        lambda d: d["licences"][0].update(gateway="gw-2"),
        lambda d: d["licences"][0].pop("service"),
        lambda d: d["licences"].append(dict(d["licences"][0])),
        lambda d: d.update(revoked=[1]),
    ],
)
def test_payload_strictness(mutate) -> None:  # type: ignore[no-untyped-def]
    doc = _doc()
    mutate(doc)
    with pytest.raises(LicenceFormatError):
        LicenceSet.from_payload(cbor2.dumps(doc, canonical=True))


def test_non_canonical_payload_rejected() -> None:
    data = lset(lic()).to_payload()
    with pytest.raises(LicenceFormatError):
        LicenceSet.from_payload(data + b"\x00")
    unsorted = dict(reversed(list(_doc().items())))
    assert cbor2.loads(cbor2.dumps(unsorted)) == _doc()
    with pytest.raises(LicenceFormatError):
        LicenceSet.from_payload(cbor2.dumps(unsorted))
    with pytest.raises(LicenceFormatError):
        LicenceSet.from_payload(b"\xbf\xff")  # indefinite-length empty map


@given(st.binary(max_size=1024))
def test_garbage_payload_is_a_typed_error(data: bytes) -> None:
    try:
        parsed = LicenceSet.from_payload(data)
    except LicenceFormatError:
        return
    assert parsed.to_payload() == data


@given(
    st.lists(
        st.builds(
            lic,
            licence_id=st.text(min_size=1, max_size=10),
            service=st.sampled_from(["dxf-convert", "doc-encrypt"]),
            valid_from=st.integers(T0 - 100, T0 + 100),
            valid_until=st.integers(T0 + 100, T0 + 300),
        ),
        max_size=5,
        unique_by=lambda x: x.licence_id,
    ),
    st.integers(T0 - 200, T0 + 400),
    st.sampled_from(["dxf-convert", "doc-encrypt"]),
)
def test_evaluation_is_total_and_consistent(ls: list[Licence], now: int, service: str) -> None:
    s = lset(*ls)
    d = evaluate(s, api_key=ALICE.secret, service=service, now=now)
    back = LicenceSet.from_payload(s.to_payload())
    assert evaluate(back, api_key=ALICE.secret, service=service, now=now) == d
    should_allow = any(x.service == service and x.valid_from <= now <= x.valid_until for x in ls)
    assert isinstance(d, Allow) == should_allow


def test_holding_finds_a_key_among_many_in_set_order() -> None:
    keys = [generate_api_key().key_hash for _ in range(300)]
    first = lic("lic-a", creds=tuple(keys[:200]))
    second = lic("lic-b", service="doc-encrypt", creds=tuple(keys[100:]))
    foreign = lic("lic-c", creds=(keys[0],), gateway="gw-2")
    s = lset(first, second, foreign)
    assert s.holding(keys[0]) == (first,)
    assert s.holding(keys[150]) == (first, second)
    assert s.holding(keys[299]) == (second,)
    assert s.holding(BOB.key_hash) == ()
    assert s.holding("") == ()
    d = evaluate(s, key_hash=keys[150], service="doc-encrypt", now=T0)
    assert d == Allow(licence_id="lic-b", customer="acme", service="doc-encrypt", valid_until=UNTIL)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([GW, "gw-2"]),
            st.sets(st.integers(0, 7), max_size=8),
        ),
        max_size=6,
    ),
    st.integers(0, 8),
)
def test_holding_is_the_licences_that_list_the_hash(
    shape: list[tuple[str, set[int]]], probe: int
) -> None:
    hashes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(9)]
    licences = [
        lic(f"lic-{n}", gateway=gw, creds=tuple(hashes[i] for i in held))
        for n, (gw, held) in enumerate(shape)
    ]
    s = lset(*licences)
    want = tuple(x for x in licences if x.gateway == GW and hashes[probe] in x.credentials)
    assert s.holding(hashes[probe]) == want
