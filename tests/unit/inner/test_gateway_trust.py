"""GatewayTrust: sync, decide, reboot, freeze and wound-back clocks, with real files."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import cbor2
import pytest

from firmware.common.crypto.apikeys import generate_api_key
from firmware.common.crypto.errors import InvalidObject, RollbackError
from firmware.common.crypto.freshness import ObjectRef, RegistryCorrupt, SyncMetadata
from firmware.common.crypto.keys import RecipientKey, SigningKey
from firmware.common.crypto.sealed import Kind, seal, verify_sealed
from firmware.common.errors import StorageError
from firmware.common.licence import Allow, Licence, LicenceSet, PaymentRequired, Revoked
from firmware.inner.trust import GatewayTrust, SyncRequired

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

GW = "gw-1"
T = 1_767_225_600
DAY = 86_400
KEY = generate_api_key()
CENTRAL = SigningKey.generate()
INNER = RecipientKey.generate()


class Central:
    def __init__(self) -> None:
        self.meta_version = 0
        self.set_version = 0

    def licence_set(self, *, until: int, revoked: bool = False) -> bytes:
        self.set_version += 1
        lic = Licence(
            "lic-1",
            "acme",
            GW,
            "dxf-convert",
            T - DAY,
            until,
            frozenset({KEY.key_hash}),
            self.set_version,
        )
        payload = LicenceSet(GW, (lic,), frozenset({"lic-1"} if revoked else ())).to_payload()
        return seal(
            payload,
            kind=Kind.LICENCE_SET,
            subject=GW,
            version=self.set_version,
            created=T,
            expires=T + 3650 * DAY,
            issuer=CENTRAL,
            recipient=INNER.public,
        )

    def metadata(self, objects: list[bytes], *, at: int, window: int = 7 * DAY) -> bytes:
        refs = []
        for data in objects:
            h = verify_sealed(data, CENTRAL.public)
            refs.append(ObjectRef(h.kind, h.subject, h.version, hashlib.sha256(data).digest()))
        self.meta_version += 1
        return seal(
            SyncMetadata(GW, tuple(refs)).to_payload(),
            kind=Kind.SYNC_METADATA,
            subject=GW,
            version=self.meta_version,
            created=at,
            expires=at + window,
            issuer=CENTRAL,
            recipient=INNER.public,
        )


def boot(state: Path, boot_id: str, mono: float = 1.0) -> GatewayTrust:
    return GatewayTrust(
        state,
        recipient=INNER,
        central=CENTRAL.public,
        gateway=GW,
        boot_id=boot_id,
        mono=mono,
        floor=T - 30 * DAY,
    )


def call(trust: GatewayTrust, mono: float) -> object:
    return trust.decide(service="dxf-convert", mono=mono, api_key=KEY.secret)


def test_fresh_box_needs_a_sync(tmp_path: Path) -> None:
    trust = boot(tmp_path, "b1")
    assert isinstance(call(trust, 2.0), SyncRequired)
    assert call(trust, 2.0).status == 503  # type: ignore[attr-defined]
    assert trust.now(2.0) == T - 30 * DAY + 1  # the provisioning floor, running forward


def test_sync_then_allow_then_reboot_keeps_working_offline(tmp_path: Path) -> None:
    central = Central()
    lics = central.licence_set(until=T + 30 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T), b"", 10.0)
    assert trust.now(10.0) == T
    assert isinstance(call(trust, 10.0), SyncRequired)  # metadata, but no licence set yet
    trust.receive_licence_set(lics, 11.0)
    assert isinstance(call(trust, 12.0), Allow)
    for name in ("versions.json", "time.json", "sync.cbor"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    # Reboot with no network: the stored objects are re-verified and used.
    again = boot(tmp_path, "b2", mono=0.5)
    assert isinstance(call(again, 100.0), Allow)
    assert again.now(100.0) >= T


def test_wound_back_wall_clock_and_reboots_cannot_extend_a_licence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The customer sets the wall clock a year back; nothing here may notice.
    monkeypatch.setattr(time, "time", lambda: float(T - 365 * DAY))
    central = Central()
    lics = central.licence_set(until=T + 2 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T, window=30 * DAY), b"", 0.0)
    trust.receive_licence_set(lics, 0.0)
    mono = 0.0
    boots = 1
    # Run for three days in one-hour steps, rebooting every 10 hours.
    for hour in range(1, 73):
        mono += 3600
        trust.tick(mono)
        if hour % 10 == 0:
            trust = boot(tmp_path, f"b{boots}", mono=5.0)
            boots += 1
            mono = 5.0
    decision = call(trust, mono)
    assert isinstance(decision, PaymentRequired)
    assert decision.valid_until == T + 2 * DAY


def test_freeze_ends_in_sync_required_then_revocation_applies(tmp_path: Path) -> None:
    central = Central()
    lics = central.licence_set(until=T + 365 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T, window=3 * DAY), b"", 0.0)
    trust.receive_licence_set(lics, 0.0)
    assert isinstance(call(trust, 3 * DAY - 1.0), Allow)
    assert isinstance(call(trust, 3 * DAY + 0.0), SyncRequired)
    # The frozen upstream replays the old metadata: expired.
    with pytest.raises(InvalidObject):
        trust.receive_sync(central.metadata([lics], at=T, window=3 * DAY), b"", 3 * DAY + 1.0)
    revoked = central.licence_set(until=T + 365 * DAY, revoked=True)
    trust.receive_sync(central.metadata([revoked], at=T + 4 * DAY), revoked, 3 * DAY + 2.0)
    assert isinstance(call(trust, 3 * DAY + 4.0), Revoked)


def test_a_sync_whose_licence_set_fails_changes_nothing(tmp_path: Path) -> None:
    central = Central()
    lics = central.licence_set(until=T + 365 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T, window=3 * DAY), lics, 0.0)
    files = {n: (tmp_path / n).read_bytes() for n in ("sync.cbor", "versions.json")}
    revoked = central.licence_set(until=T + 365 * DAY, revoked=True)
    damaged = bytearray(revoked)
    damaged[-1] ^= 1
    with pytest.raises(InvalidObject):
        trust.receive_sync(central.metadata([revoked], at=T + 2 * DAY), bytes(damaged), DAY)
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    assert trust.now(DAY) == T + DAY  # central's time in the refused sync was not taken
    # The set in force goes on under the metadata that listed it, after a reboot too.
    assert isinstance(call(trust, DAY + 1.0), Allow)
    assert isinstance(call(boot(tmp_path, "b2", mono=DAY + 1.0), DAY + 2.0), Allow)


def test_fresh_metadata_cannot_keep_a_set_it_does_not_list_in_force(tmp_path: Path) -> None:
    # The outer module relays central's new metadata but strips the new set
    # (a revocation): the old set must not live on under the new metadata.
    central = Central()
    lics = central.licence_set(until=T + 365 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T, window=3 * DAY), lics, 0.0)
    revoked = central.licence_set(until=T + 365 * DAY, revoked=True)
    for day in (1, 2, 3, 4):
        meta = central.metadata([revoked], at=T + day * DAY, window=3 * DAY)
        with pytest.raises(InvalidObject):
            trust.receive_sync(meta, b"", day * DAY)
    # No later than the old metadata's expiry the gateway stops, as if cut off ...
    assert isinstance(call(trust, 3 * DAY + 1.0), SyncRequired)
    # ... and the first whole sync applies the revocation.
    meta = central.metadata([revoked], at=T + 5 * DAY, window=3 * DAY)
    trust.receive_sync(meta, revoked, 3 * DAY + 2.0)
    assert isinstance(call(trust, 3 * DAY + 3.0), Revoked)


def test_rollback_refused_and_state_unchanged(tmp_path: Path) -> None:
    central = Central()
    old_lics = central.licence_set(until=T + DAY)
    old_meta = central.metadata([old_lics], at=T)
    new_lics = central.licence_set(until=T + 9 * DAY)
    new_meta = central.metadata([new_lics], at=T + 60)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(new_meta, b"", 0.0)
    trust.receive_licence_set(new_lics, 0.0)
    registry_before = (tmp_path / "versions.json").read_bytes()
    with pytest.raises(RollbackError):
        trust.receive_sync(old_meta, b"", 1.0)
    with pytest.raises(RollbackError):
        trust.receive_licence_set(old_lics, 1.0)
    assert (tmp_path / "versions.json").read_bytes() == registry_before
    # An attacker who swaps the stored file for old objects gains nothing after reboot.
    (tmp_path / "sync.cbor").write_bytes(cbor2.dumps([old_meta, old_lics]))
    again = boot(tmp_path, "b2")
    assert isinstance(call(again, 2.0), SyncRequired)
    assert again.licences is None


def test_tampered_stored_objects_are_ignored(tmp_path: Path) -> None:
    central = Central()
    lics = central.licence_set(until=T + DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T), b"", 0.0)
    trust.receive_licence_set(lics, 0.0)
    meta, stored = cbor2.loads((tmp_path / "sync.cbor").read_bytes())
    data = bytearray(stored)
    data[-1] ^= 1
    (tmp_path / "sync.cbor").write_bytes(cbor2.dumps([meta, bytes(data)]))
    again = boot(tmp_path, "b2")
    assert again.licences is None
    assert isinstance(call(again, 2.0), SyncRequired)
    (tmp_path / "sync.cbor").write_bytes(b"\xff not cbor")
    assert boot(tmp_path, "b3").licences is None


def test_a_power_cut_during_a_sync_leaves_the_previous_one_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metadata and the licence set it lists are one write: never one without the other."""
    central = Central()
    lics = central.licence_set(until=T + 30 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T), lics, 0.0)
    renewed = central.licence_set(until=T + 60 * DAY)

    def cut(path: Path, data: bytes, mode: int = 0o600) -> None:
        raise StorageError("power cut")

    monkeypatch.setattr("firmware.inner.trust.atomic_write", cut)
    with pytest.raises(StorageError):
        trust.receive_sync(central.metadata([renewed], at=T + 60), renewed, 1.0)
    monkeypatch.undo()
    again = boot(tmp_path, "b2")
    assert isinstance(call(again, 2.0), Allow)  # the old sync, whole, still serves
    assert again.licences is not None
    assert max(lic.valid_until for lic in again.licences.licences) == T + 30 * DAY


def test_the_earlier_two_file_layout_is_still_read(tmp_path: Path) -> None:
    central = Central()
    lics = central.licence_set(until=T + 30 * DAY)
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([lics], at=T), lics, 0.0)
    meta, stored = cbor2.loads((tmp_path / "sync.cbor").read_bytes())
    (tmp_path / "sync.cbor").unlink()
    (tmp_path / "sync-metadata.sealed").write_bytes(meta)
    (tmp_path / "licences.sealed").write_bytes(stored)
    assert isinstance(call(boot(tmp_path, "b2"), 1.0), Allow)


def test_corrupt_registry_stops_the_module(tmp_path: Path) -> None:
    (tmp_path / "versions.json").write_bytes(b"{not json")
    with pytest.raises(RegistryCorrupt):
        boot(tmp_path, "b1")


def test_bundle_must_be_listed(tmp_path: Path) -> None:
    central = Central()
    bundle = seal(
        b"code",
        kind=Kind.BUNDLE,
        subject="dxf-convert",
        version=1,
        created=T,
        expires=T + 365 * DAY,
        issuer=CENTRAL,
        recipient=INNER.public,
    )
    trust = boot(tmp_path, "b1")
    trust.receive_sync(central.metadata([], at=T), b"", 0.0)
    with pytest.raises(InvalidObject):
        trust.receive_bundle(bundle, "dxf-convert", 1.0)
    trust.receive_sync(central.metadata([bundle], at=T + 1), b"", 2.0)
    assert trust.receive_bundle(bundle, "dxf-convert", 3.0).payload == b"code"
    assert trust.verifier.registry.highest("bundle/dxf-convert") == 1


def test_new_state_directory_is_private(tmp_path: Path) -> None:
    boot(tmp_path / "state", "b1")
    assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700
