"""The gateway protocol core: auth, fetch, sync and usage, opened with a real inner key."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central_stub import admin
from central_stub.gateway import MAX_AUTH_FAILURES, AuthState, CentralService, GatewayConnection
from central_stub.testing import TempCentral, make_central
from firmware.common.crypto.freshness import SyncMetadata, SyncVerifier
from firmware.common.crypto.keys import SigningKey
from firmware.common.crypto.sealed import Kind, open_sealed, verify_sealed
from firmware.common.errors import StorageError
from firmware.common.licence import Allow, Revoked, evaluate
from firmware.common.link import messages as m
from firmware.common.uplink import UsageRecord, auth_transcript, decode_usage_ack, sign_usage_batch
from provisioning.bundle import load_bundle

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

NOW = int(time.time())


@pytest.fixture
def central(tmp_path: Path) -> TempCentral:
    return make_central(tmp_path, now=NOW, gateways=2)


def _service(central: TempCentral) -> CentralService:
    return CentralService(central.repo, central.key, sync_expiry=7 * 86400)


def _authed(central: TempCentral, svc: CentralService, name: str = "gw1") -> GatewayConnection:
    conn = GatewayConnection(svc, "test-peer")
    challenge = conn.handle(m.AuthBegin(gateway_id=name), NOW)
    assert isinstance(challenge, m.AuthChallenge)
    proof = central.gateways[name].outer.sign(
        auth_transcript(name, challenge.nonce, central.key.key_id)
    )
    assert isinstance(conn.handle(m.AuthProof(signature=proof), NOW), m.AuthOk)
    assert conn.state is AuthState.AUTHENTICATED
    return conn


def _audit_actions(central: TempCentral) -> list[str]:
    return [e.action for e in central.repo.snapshot().list_audit()]


def _code(reply: m.Message) -> str:
    assert isinstance(reply, m.Error), reply
    return reply.code


def test_nothing_is_served_before_authentication(central: TempCentral) -> None:
    conn = GatewayConnection(_service(central), "p")
    for msg in (m.Sync(since_version=0), m.FetchService(service="echo"), m.Status()):
        assert _code(conn.handle(msg, NOW)) == "auth_required"
    assert _code(conn.handle(m.AuthProof(signature=b"x" * 64), NOW)) == "auth_required"


def test_unknown_gateway_is_refused_and_audited(central: TempCentral) -> None:
    conn = GatewayConnection(_service(central), "p")
    assert _code(conn.handle(m.AuthBegin(gateway_id="nobody"), NOW)) == "unknown_gateway"
    assert "gateway.unknown_gateway" in _audit_actions(central)


def test_revoked_gateway_is_refused_even_on_an_open_connection(central: TempCentral) -> None:
    svc = _service(central)
    conn = _authed(central, svc)
    admin.revoke_gateway(central.repo, "gw1", now=NOW, actor="test")
    assert _code(conn.handle(m.Sync(since_version=0), NOW)) == "gateway_revoked"
    fresh = GatewayConnection(svc, "p2")
    assert _code(fresh.handle(m.AuthBegin(gateway_id="gw1"), NOW)) == "gateway_revoked"
    assert _audit_actions(central).count("gateway.gateway_revoked") == 2


def test_bad_signature_is_refused_and_the_nonce_is_single_use(central: TempCentral) -> None:
    svc = _service(central)
    conn = GatewayConnection(svc, "p")
    challenge = conn.handle(m.AuthBegin(gateway_id="gw1"), NOW)
    assert isinstance(challenge, m.AuthChallenge)
    # signed by another gateway's key, and then a correct proof for the spent nonce
    wrong = central.gateways["gw2"].outer.sign(
        auth_transcript("gw1", challenge.nonce, central.key.key_id)
    )
    assert _code(conn.handle(m.AuthProof(signature=wrong), NOW)) == "bad_signature"
    right = central.gateways["gw1"].outer.sign(
        auth_transcript("gw1", challenge.nonce, central.key.key_id)
    )
    assert _code(conn.handle(m.AuthProof(signature=right), NOW)) == "auth_required"
    assert conn.state is AuthState.ANONYMOUS
    assert "gateway.bad_signature" in _audit_actions(central)


def test_a_proof_for_another_central_does_not_verify(central: TempCentral) -> None:
    conn = GatewayConnection(_service(central), "p")
    challenge = conn.handle(m.AuthBegin(gateway_id="gw1"), NOW)
    assert isinstance(challenge, m.AuthChallenge)
    other = SigningKey.generate().key_id
    proof = central.gateways["gw1"].outer.sign(auth_transcript("gw1", challenge.nonce, other))
    assert _code(conn.handle(m.AuthProof(signature=proof), NOW)) == "bad_signature"


def test_repeated_failures_close_the_connection(central: TempCentral) -> None:
    conn = GatewayConnection(_service(central), "p")
    for _ in range(MAX_AUTH_FAILURES):
        assert not conn.should_close
        conn.handle(m.AuthBegin(gateway_id="ghost"), NOW)
    assert conn.should_close


def test_sync_opens_with_the_inner_key_and_lists_what_fetch_returns(central: TempCentral) -> None:
    svc = _service(central)
    conn = _authed(central, svc)
    gw = central.gateways["gw1"]
    verifier = SyncVerifier(recipient=gw.inner_hpke, central=central.public, gateway="gw1")
    data = conn.handle(m.Sync(since_version=0), NOW)
    assert isinstance(data, m.SyncData)
    opened = verifier.accept_sync_metadata(data.sealed, NOW)
    assert opened.header.created == NOW
    assert opened.header.expires == NOW + 7 * 86400
    licences = verifier.accept_licence_set(data.sealed_licences, NOW)
    api_key = next(iter(central.api_keys.values()))
    assert isinstance(evaluate(licences, service="echo", now=NOW, api_key=api_key), Allow)

    service = conn.handle(m.FetchService(service="echo", have_version=None), NOW)
    assert isinstance(service, m.Service)
    assert service.sealed_licence == data.sealed_licences  # same bytes: listed in the metadata
    bundle = verifier.accept_object(service.sealed_bundle, Kind.BUNDLE, "echo", NOW)
    assert load_bundle(bundle.payload).to_bytes() == central.bundle

    again = conn.handle(m.FetchService(service="echo", have_version=1), NOW)
    assert isinstance(again, m.Service)
    assert again.sealed_bundle == b""  # already installed: not sent again


def test_sync_is_idempotent_and_metadata_versions_only_grow(central: TempCentral) -> None:
    svc = _service(central)
    conn = _authed(central, svc)
    first = conn.handle(m.Sync(since_version=0), NOW)
    second = conn.handle(m.Sync(since_version=0), NOW)
    assert isinstance(first, m.SyncData)
    assert isinstance(second, m.SyncData)
    assert first.sealed_licences == second.sealed_licences
    held = verify_sealed(first.sealed_licences, central.public).version
    lean = conn.handle(m.Sync(since_version=held), NOW)
    assert isinstance(lean, m.SyncData)
    assert lean.sealed_licences == b""  # already held: listed, not resent
    v1 = verify_sealed(first.sealed, central.public).version
    v2 = verify_sealed(second.sealed, central.public).version
    assert v2 > v1
    # a new service instance (a restart) continues above every version handed out
    restarted = _authed(central, _service(central))
    third = restarted.handle(m.Sync(since_version=0), NOW)
    assert isinstance(third, m.SyncData)
    assert verify_sealed(third.sealed, central.public).version > v2


def test_revocation_and_payment_reach_the_gateway_by_sync(central: TempCentral) -> None:
    svc = _service(central)
    conn = _authed(central, svc)
    gw = central.gateways["gw1"]
    verifier = SyncVerifier(recipient=gw.inner_hpke, central=central.public, gateway="gw1")
    data = conn.handle(m.Sync(since_version=0), NOW)
    assert isinstance(data, m.SyncData)
    verifier.accept_sync_metadata(data.sealed, NOW)
    verifier.accept_licence_set(data.sealed_licences, NOW)
    admin.revoke_licence(central.repo, "lic-000001", now=NOW, actor="test")
    data = conn.handle(m.Sync(since_version=0), NOW + 1)
    assert isinstance(data, m.SyncData)
    verifier.accept_sync_metadata(data.sealed, NOW + 1)
    licences = verifier.accept_licence_set(data.sealed_licences, NOW + 1)
    api_key = next(iter(central.api_keys.values()))
    assert isinstance(evaluate(licences, service="echo", now=NOW + 1, api_key=api_key), Revoked)
    # a revoked client key leaves the licence set at the next sync
    admin.revoke_client_key(central.repo, "key-000001", now=NOW + 2, actor="test")
    data = conn.handle(m.Sync(since_version=0), NOW + 2)
    assert isinstance(data, m.SyncData)
    verifier.accept_sync_metadata(data.sealed, NOW + 2)
    licences = verifier.accept_licence_set(data.sealed_licences, NOW + 2)
    assert all(not lic.credentials for lic in licences.licences)
    # a revoked licence's service is no longer served
    assert _code(conn.handle(m.FetchService(service="echo"), NOW + 1)) == "not_licensed"


def test_unknown_service_is_refused(central: TempCentral) -> None:
    conn = _authed(central, _service(central))
    assert _code(conn.handle(m.FetchService(service="nope"), NOW)) == "unknown_service"


def _batch(central: TempCentral, batch_id: str, units: int = 1, gateway: str = "gw1") -> bytes:
    key_hash = central.repo.snapshot().list_client_keys("acme")[0].key_hash
    return sign_usage_batch(
        central.gateways[gateway].inner_signing,
        gateway=gateway,
        batch_id=batch_id,
        created=NOW,
        records=[UsageRecord(NOW, "echo", "lic-000001", key_hash, units, 12, "ok", 100, 40)] * 2
        + [UsageRecord(NOW, "echo", "lic-000001", key_hash, 0, 5000, "algorithm_timeout", 7, 0)],
    )


def test_usage_is_stored_exactly_once_and_acknowledged_signed(central: TempCentral) -> None:
    conn = _authed(central, _service(central))
    batch = _batch(central, "b-1")
    ack = conn.handle(m.UsageReport(batch=batch), NOW)
    assert isinstance(ack, m.UsageAck)
    assert ack.batch_id == "b-1"
    gw = central.gateways["gw1"]
    opened = open_sealed(
        ack.sealed_ack, gw.inner_hpke, central.public, now=NOW, expected_kind=Kind.USAGE_ACK
    )
    payload = decode_usage_ack(opened.payload)
    assert (payload.batch_id, payload.records, payload.gateway) == ("b-1", 3, "gw1")

    replay = conn.handle(m.UsageReport(batch=batch), NOW + 5)
    assert isinstance(replay, m.UsageAck)
    assert replay.sealed_ack == ack.sealed_ack  # the same ack, nothing new stored
    month = time.strftime("%Y-%m", time.gmtime(NOW))
    lines = admin.usage_report(central.repo, "acme", month)
    # the failed call is a call, not a unit; its duration and bytes are reported
    assert [
        (u.calls, u.units, u.failed, u.duration_ms, u.bytes_in, u.bytes_out) for u in lines
    ] == [(3, 2, 1, 5024, 207, 80)]
    actions = _audit_actions(central)
    assert actions.count("usage.store") == 1
    assert actions.count("usage.duplicate") == 1


def test_usage_conflict_forgery_and_wrong_gateway_store_nothing(central: TempCentral) -> None:
    conn = _authed(central, _service(central))
    assert isinstance(conn.handle(m.UsageReport(batch=_batch(central, "b-1")), NOW), m.UsageAck)
    before = central.repo.snapshot().list_usage("acme", 0, 2**62)
    other = _batch(central, "b-1", units=9)
    assert _code(conn.handle(m.UsageReport(batch=other), NOW)) == "usage_conflict"
    forged = bytearray(_batch(central, "b-2"))
    forged[-1] ^= 1
    assert _code(conn.handle(m.UsageReport(batch=bytes(forged)), NOW)) == "bad_usage_batch"
    signed_by_gw2 = _batch(central, "b-3", gateway="gw2")
    assert _code(conn.handle(m.UsageReport(batch=signed_by_gw2), NOW)) == "bad_usage_batch"
    assert central.repo.snapshot().list_usage("acme", 0, 2**62) == before
    actions = _audit_actions(central)
    assert {"gateway.usage_conflict", "gateway.bad_usage_batch"} <= set(actions)


def test_status_reports_the_gateway_entitlement(central: TempCentral) -> None:
    conn = _authed(central, _service(central))
    report = conn.handle(m.Status(), NOW)
    assert isinstance(report, m.StatusReport)
    assert report.fields["gateway"] == "gw1"
    assert report.fields["bundles"] == 1


_REQUESTS = st.one_of(
    st.builds(m.AuthBegin, gateway_id=st.sampled_from(["gw1", "gw2", "ghost", "é" * 3])),
    st.builds(m.AuthProof, signature=st.binary(min_size=1, max_size=80)),
    st.builds(m.Sync, since_version=st.integers(0, 2**63 - 1)),
    st.builds(
        m.FetchService,
        service=st.sampled_from(["echo", "nope", "x" * 128]),
        have_version=st.none() | st.integers(0, 3),
    ),
    st.builds(m.UsageReport, batch=st.binary(min_size=1, max_size=200)),
    st.just(m.Status()),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_REQUESTS, max_size=12))
def test_any_request_sequence_gets_a_reply_and_nothing_before_auth(
    central: TempCentral, requests: list[m.Message]
) -> None:
    conn = GatewayConnection(_service(central), "fuzz")
    for msg in requests:
        reply = conn.handle(msg, NOW)
        assert reply.IS_REPLY
        if not isinstance(msg, m.AuthBegin | m.AuthProof):
            # no random proof can verify, so nothing else is ever served
            assert isinstance(reply, m.Error)
            assert reply.code == "auth_required"
    assert central.repo.snapshot().list_usage("acme", 0, 2**62) == []


_KNOWN_CODES = {
    "already_authenticated",
    "unknown_service",
    "not_licensed",
    "bad_usage_batch",
}


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_REQUESTS, max_size=12))
def test_an_authenticated_gateway_gets_a_typed_reply_to_anything(
    central: TempCentral, requests: list[m.Message]
) -> None:
    conn = _authed(central, _service(central))
    for msg in requests:
        reply = conn.handle(msg, NOW)
        if isinstance(reply, m.Error):
            assert reply.code in _KNOWN_CODES, reply
        else:
            assert reply.KIND is m.REPLY_KIND[msg.KIND]
    assert central.repo.snapshot().list_usage("acme", 0, 2**62) == []  # random batches never stick


def test_a_damaged_bundle_blob_fails_its_fetch_but_not_the_sync(central: TempCentral) -> None:
    svc = _service(central)
    conn = _authed(central, svc)
    first = conn.handle(m.Sync(since_version=0), NOW)
    assert isinstance(first, m.SyncData)
    fetched = conn.handle(m.FetchService(service="echo", have_version=None), NOW)
    assert isinstance(fetched, m.Service)
    digest = hashlib.sha256(fetched.sealed_bundle).hexdigest()
    path = central.config.state_dir / "blobs" / digest[:2] / digest
    assert path.read_bytes() == fetched.sealed_bundle
    path.write_bytes(b"x" + fetched.sealed_bundle[1:])  # a bit rotted on disk

    svc = _service(central)  # a restarted central: nothing in memory
    conn = _authed(central, svc)
    gw = central.gateways["gw1"]
    verifier = SyncVerifier(recipient=gw.inner_hpke, central=central.public, gateway="gw1")
    data = conn.handle(m.Sync(since_version=0), NOW + 1)
    assert isinstance(data, m.SyncData)  # licences and payments still reach the gateway
    meta = verifier.accept_sync_metadata(data.sealed, NOW + 1)
    ref = SyncMetadata.from_payload(meta.payload).find(Kind.BUNDLE, "echo")
    assert ref is not None and ref.digest.hex() == digest  # still listed: not withdrawn
    with pytest.raises(StorageError, match="damaged"):
        conn.handle(m.FetchService(service="echo", have_version=None), NOW + 1)
