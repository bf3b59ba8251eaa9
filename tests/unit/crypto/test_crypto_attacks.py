"""The attacks The Update Framework names (and a few more), each answered and tested.

rollback, freeze, mix-and-match, arbitrary software, endless data, wrong
recipient; plus the version registry and sync-metadata codec they rest on.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from trust_fixtures import DAY, NOW, Publisher, forge, header_fields

from firmware.common.crypto.apikeys import generate_api_key
from firmware.common.crypto.errors import (
    ExpiredObject,
    InvalidObject,
    RollbackError,
    StaleMetadata,
)
from firmware.common.crypto.freshness import (
    RegistryCorrupt,
    SyncMetadata,
    SyncVerifier,
    VersionRegistry,
    load_registry,
    save_registry,
)
from firmware.common.crypto.keys import RecipientKey, SigningKey
from firmware.common.crypto.sealed import Kind
from firmware.common.licence import Allow, Licence, LicenceSet, Revoked, evaluate

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

GW = "gw-1"
KEY = generate_api_key()


def licences(version: int, *, revoked: bool = False, lic_version: int | None = None) -> bytes:
    lic = Licence(
        licence_id="lic-1",
        customer="acme",
        gateway=GW,
        service="dxf-convert",
        valid_from=NOW - DAY,
        valid_until=NOW + 365 * DAY,
        credentials=frozenset({KEY.key_hash}),
        version=lic_version if lic_version is not None else version,
    )
    return LicenceSet(GW, (lic,), frozenset({"lic-1"} if revoked else ())).to_payload()


@pytest.fixture
def pub(central: SigningKey, inner: RecipientKey) -> Publisher:
    return Publisher(central, inner.public, GW)


@pytest.fixture
def verifier(central: SigningKey, inner: RecipientKey) -> SyncVerifier:
    return SyncVerifier(recipient=inner, central=central.public, gateway=GW)


def test_happy_path_sync(pub: Publisher, verifier: SyncVerifier) -> None:
    bundle = pub.object(Kind.BUNDLE, "dxf-convert", 1, b"code")
    lics = pub.object(Kind.LICENCE_SET, GW, 1, licences(1))
    meta = pub.metadata([bundle, lics], created=NOW)
    opened = verifier.accept_sync_metadata(meta, NOW)
    assert opened.header.created == NOW  # central's signed time, for the trusted clock
    verifier.require_fresh(NOW + 1)
    assert verifier.accept_object(bundle, Kind.BUNDLE, "dxf-convert", NOW + 1).payload == b"code"
    lset = verifier.accept_licence_set(lics, NOW + 1)
    assert isinstance(evaluate(lset, api_key=KEY.secret, service="dxf-convert", now=NOW), Allow)
    assert verifier.registry.highest("bundle/dxf-convert") == 1
    assert verifier.registry.highest("licence/lic-1") == 1


# ------------------------------------------------------------------ rollback


def test_attack_rollback_of_sync_metadata(pub: Publisher, verifier: SyncVerifier) -> None:
    old = pub.metadata([], created=NOW)
    new = pub.metadata([], created=NOW + 10)
    verifier.accept_sync_metadata(new, NOW + 10)
    with pytest.raises(RollbackError):
        verifier.accept_sync_metadata(old, NOW + 11)
    verifier.accept_sync_metadata(new, NOW + 12)  # re-delivery of the same one is fine


def test_attack_rollback_of_licence_set(pub: Publisher, verifier: SyncVerifier) -> None:
    v1 = pub.object(Kind.LICENCE_SET, GW, 1, licences(1))
    verifier.accept_sync_metadata(pub.metadata([v1], created=NOW), NOW)
    verifier.accept_licence_set(v1, NOW)
    v2 = pub.object(Kind.LICENCE_SET, GW, 2, licences(2, revoked=True))
    verifier.accept_sync_metadata(pub.metadata([v2], created=NOW + 5), NOW + 5)
    verifier.accept_licence_set(v2, NOW + 5)
    before = verifier.registry.entries()
    with pytest.raises(RollbackError):
        verifier.accept_licence_set(v1, NOW + 6)
    assert verifier.registry.entries() == before


def test_attack_rollback_of_one_licence_inside_a_newer_set(
    pub: Publisher, verifier: SyncVerifier
) -> None:
    v1 = pub.object(Kind.LICENCE_SET, GW, 1, licences(1, lic_version=5))
    verifier.accept_sync_metadata(pub.metadata([v1], created=NOW), NOW)
    verifier.accept_licence_set(v1, NOW)
    # A newer set that carries an older version of lic-1 (central bug or forged history).
    v2 = pub.object(Kind.LICENCE_SET, GW, 2, licences(2, lic_version=4))
    verifier.accept_sync_metadata(pub.metadata([v2], created=NOW + 5), NOW + 5)
    before = verifier.registry.entries()
    with pytest.raises(RollbackError):
        verifier.accept_licence_set(v2, NOW + 6)
    assert verifier.registry.entries() == before  # all or nothing


def test_attack_rollback_survives_reboot(
    pub: Publisher, central: SigningKey, inner: RecipientKey, tmp_path: Path
) -> None:
    first = SyncVerifier(recipient=inner, central=central.public, gateway=GW)
    old = pub.metadata([], created=NOW)
    new = pub.metadata([], created=NOW + 10)
    first.accept_sync_metadata(new, NOW + 10)
    save_registry(tmp_path / "versions.json", first.registry)
    assert (tmp_path / "versions.json").stat().st_mode & 0o777 == 0o600
    after_reboot = SyncVerifier(
        recipient=inner,
        central=central.public,
        gateway=GW,
        registry=load_registry(tmp_path / "versions.json"),
    )
    with pytest.raises(RollbackError):
        after_reboot.accept_sync_metadata(old, NOW + 11)
    after_reboot.accept_sync_metadata(new, NOW + 11)  # the stored metadata re-adopted


# ------------------------------------------------------------------ freeze


def test_attack_freeze(pub: Publisher, verifier: SyncVerifier) -> None:
    """A frozen upstream keeps replaying old metadata: it works only until it expires."""
    bundle = pub.object(Kind.BUNDLE, "dxf-convert", 1, b"code")
    meta = pub.metadata([bundle], created=NOW, lifetime=7 * DAY)
    verifier.accept_sync_metadata(meta, NOW)
    verifier.require_fresh(NOW + 7 * DAY - 1)
    with pytest.raises(StaleMetadata):
        verifier.require_fresh(NOW + 7 * DAY)
    with pytest.raises(StaleMetadata):
        verifier.accept_object(bundle, Kind.BUNDLE, "dxf-convert", NOW + 7 * DAY)
    with pytest.raises(ExpiredObject):
        verifier.accept_sync_metadata(meta, NOW + 7 * DAY)


def test_attack_freeze_cannot_keep_a_revoked_licence_alive(
    pub: Publisher, verifier: SyncVerifier
) -> None:
    """Central revokes lic-1; the outer module withholds the new set.  The old
    set still allows calls, but only until the old metadata's window closes."""
    v1 = pub.object(Kind.LICENCE_SET, GW, 1, licences(1))
    verifier.accept_sync_metadata(pub.metadata([v1], created=NOW, lifetime=3 * DAY), NOW)
    lset = verifier.accept_licence_set(v1, NOW)

    def serve(now: int) -> bool:
        try:
            verifier.require_fresh(now)
        except StaleMetadata:
            return False
        return isinstance(evaluate(lset, api_key=KEY.secret, service="dxf-convert", now=now), Allow)

    assert serve(NOW + 3 * DAY - 1)
    assert not serve(NOW + 3 * DAY)
    # Once the revocation gets through, it applies at once.
    v2 = pub.object(Kind.LICENCE_SET, GW, 2, licences(2, revoked=True))
    verifier.accept_sync_metadata(pub.metadata([v2], created=NOW + 4 * DAY), NOW + 4 * DAY)
    lset2 = verifier.accept_licence_set(v2, NOW + 4 * DAY)
    refused = evaluate(lset2, api_key=KEY.secret, service="dxf-convert", now=NOW + 4 * DAY)
    assert isinstance(refused, Revoked)


def test_no_metadata_yet_is_stale(verifier: SyncVerifier, pub: Publisher) -> None:
    with pytest.raises(StaleMetadata):
        verifier.require_fresh(NOW)
    bundle = pub.object(Kind.BUNDLE, "dxf-convert", 1, b"code")
    with pytest.raises(StaleMetadata):
        verifier.accept_object(bundle, Kind.BUNDLE, "dxf-convert", NOW)


# ------------------------------------------------------------------ mix-and-match


def test_attack_mix_and_match(pub: Publisher, verifier: SyncVerifier) -> None:
    bundle_v1 = pub.object(Kind.BUNDLE, "dxf-convert", 1, b"code v1")
    bundle_v2 = pub.object(Kind.BUNDLE, "dxf-convert", 2, b"code v2")
    bundle_v2_other = pub.object(Kind.BUNDLE, "dxf-convert", 2, b"other code v2")
    unlisted = pub.object(Kind.BUNDLE, "doc-encrypt", 1, b"code")
    verifier.accept_sync_metadata(pub.metadata([bundle_v2], created=NOW), NOW)
    # An older bundle than the metadata lists (never accepted before): refused.
    with pytest.raises(InvalidObject):
        verifier.accept_object(bundle_v1, Kind.BUNDLE, "dxf-convert", NOW)
    # Same version, other content (signed by central, but not the listed one): refused.
    with pytest.raises(InvalidObject):
        verifier.accept_object(bundle_v2_other, Kind.BUNDLE, "dxf-convert", NOW)
    # Not listed at all: refused.
    with pytest.raises(InvalidObject):
        verifier.accept_object(unlisted, Kind.BUNDLE, "doc-encrypt", NOW)
    # A bundle presented under another subject: refused.
    with pytest.raises(InvalidObject):
        verifier.accept_object(bundle_v2, Kind.BUNDLE, "doc-encrypt", NOW)
    assert verifier.registry.highest("bundle/dxf-convert") == 0
    assert verifier.accept_object(bundle_v2, Kind.BUNDLE, "dxf-convert", NOW).payload == (
        b"code v2"
    )


def test_attack_mix_and_match_same_version_other_content_in_registry() -> None:
    reg = VersionRegistry({"bundle/x": (2, b"a" * 32)})
    with pytest.raises(RollbackError):
        reg.record({"bundle/x": (2, b"b" * 32)})
    reg.record({"bundle/x": (2, b"a" * 32)})
    assert reg.entries() == {"bundle/x": (2, b"a" * 32)}


def test_attack_mix_and_match_metadata_for_another_gateway(
    central: SigningKey, inner: RecipientKey, verifier: SyncVerifier
) -> None:
    other = Publisher(central, inner.public, "gw-2")
    with pytest.raises(InvalidObject):
        verifier.accept_sync_metadata(other.metadata([], created=NOW), NOW)


# ------------------------------------------------------------------ arbitrary software


def test_attack_arbitrary_software(
    central: SigningKey, inner: RecipientKey, verifier: SyncVerifier, pub: Publisher
) -> None:
    attacker = SigningKey.generate()
    evil = Publisher(attacker, inner.public, GW)
    evil_bundle = evil.object(Kind.BUNDLE, "dxf-convert", 99, b"malware")
    with pytest.raises(InvalidObject):
        verifier.accept_sync_metadata(evil.metadata([evil_bundle], created=NOW), NOW)
    verifier.accept_sync_metadata(pub.metadata([], created=NOW), NOW)
    with pytest.raises(InvalidObject):
        verifier.accept_object(evil_bundle, Kind.BUNDLE, "dxf-convert", NOW)


# ------------------------------------------------------------------ endless data


def test_attack_endless_data(central: SigningKey, inner: RecipientKey, pub: Publisher) -> None:
    """A validly signed object whose payload inflates without end stops at the signed length."""
    bomb = zlib.compress(b"\x00" * 30_000_000, 9)
    fields = header_fields(
        issuer=central, recipient=inner.public, compression=1, payload_length=1024
    )
    data = forge(fields, bomb, issuer=central, recipient=inner.public)
    verifier = SyncVerifier(recipient=inner, central=central.public, gateway=GW)
    verifier.accept_sync_metadata(pub.metadata([data], created=NOW), NOW)
    with pytest.raises(InvalidObject):
        verifier.accept_object(data, Kind.BUNDLE, "dxf-convert", NOW + 1)
    with pytest.raises(InvalidObject):
        verifier.accept_sync_metadata(b"\x83" + b"\x5b" + b"\xff" * 8, NOW)


# ------------------------------------------------------------------ wrong recipient


def test_attack_wrong_recipient(
    central: SigningKey, inner: RecipientKey, other_inner: RecipientKey
) -> None:
    """An object for another gateway (another customer's licences) does not open here."""
    theirs = Publisher(central, other_inner.public, GW)
    bundle = theirs.object(Kind.BUNDLE, "dxf-convert", 1, b"their code")
    meta = theirs.metadata([bundle], created=NOW)
    verifier = SyncVerifier(recipient=inner, central=central.public, gateway=GW)
    with pytest.raises(InvalidObject):
        verifier.accept_sync_metadata(meta, NOW)


# ------------------------------------------------------------------ registry and codec


def test_registry_persistence_roundtrip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "versions.json"
    assert load_registry(path).entries() == {}
    reg = VersionRegistry()
    reg.record({"bundle/a": (3, hashlib.sha256(b"a").digest()), "licence/x": (7, None)})
    save_registry(path, reg)
    assert load_registry(path).entries() == reg.entries()
    for junk in (
        b"",
        b"{",
        b'{"format": 2, "entries": {}}',
        b'{"format": 1, "entries": {"a": [-1, null]}}',
        b"[]",
    ):
        path.write_bytes(junk)
        with pytest.raises(RegistryCorrupt):
            load_registry(path)


def test_registry_record_is_all_or_nothing() -> None:
    reg = VersionRegistry({"a": (5, None)})
    with pytest.raises(RollbackError):
        reg.record({"b": (1, None), "a": (4, None)})
    assert reg.entries() == {"a": (5, None)}
    assert reg.highest("b") == 0


def test_sync_metadata_roundtrip() -> None:
    meta = SyncMetadata(GW, ())
    assert SyncMetadata.from_payload(meta.to_payload()) == meta


@given(st.binary(max_size=512))
def test_sync_metadata_garbage_is_a_typed_error(data: bytes) -> None:
    try:
        meta = SyncMetadata.from_payload(data)
    except InvalidObject:
        return
    assert meta.to_payload() == data  # only canonical, well-formed payloads parse


def test_sync_metadata_rejects_duplicates_and_bad_digests() -> None:
    ref = [1, "x", 1, b"\x00" * 32]
    for objects in ([ref, ref], [[1, "x", 1, b"\x00" * 31]], [[9, "x", 1, b"\x00" * 32]]):
        doc = {"format": 1, "gateway": GW, "objects": objects}
        with pytest.raises(InvalidObject):
            SyncMetadata.from_payload(cbor2.dumps(doc, canonical=True))


@given(st.binary(max_size=300) | st.just(b"[" * 100_000))
def test_registry_parser_is_total(data: bytes) -> None:
    try:
        reg = VersionRegistry.from_json(data)
    except RegistryCorrupt:
        return
    assert all(v >= 0 for v, _ in reg.entries().values())


def test_listing_checks_issuer_and_duplicates(pub: Publisher, central: SigningKey) -> None:
    a = pub.object(Kind.BUNDLE, "a", 1, b"a")
    a2 = pub.object(Kind.BUNDLE, "a", 2, b"a2")
    meta = SyncMetadata.listing(GW, [a], central.public)
    assert meta.find(Kind.BUNDLE, "a") is not None
    assert meta.find(Kind.BUNDLE, "a").digest == hashlib.sha256(a).digest()  # type: ignore[union-attr]
    assert meta.find(Kind.LICENCE_SET, "a") is None
    with pytest.raises(ValueError):
        SyncMetadata.listing(GW, [a, a2], central.public)
    with pytest.raises(InvalidObject):
        SyncMetadata.listing(GW, [a], SigningKey.generate().public)
