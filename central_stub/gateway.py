"""The gateway protocol: what central answers an outer module, request by request.

Theory of operation
-------------------
One :class:`GatewayConnection` per connection (a TLS connection or a modem
call) holds that connection's authentication state; one shared
:class:`CentralService` holds central's key, the repository and the caches.
Both are synchronous and take ``now`` (Unix seconds) explicitly: the asyncio
adapter (:mod:`central_stub.server`) only moves messages between them and a
:class:`~firmware.common.link.link.Link`.  Every reply is a message; refusals
are :class:`~firmware.common.link.messages.Error` replies with a stable code.

Authentication (a table, keyed by state)::

    state         AuthBegin(gw)                 AuthProof(sig)           other requests
    ANONYMOUS     known, live gw -> CHALLENGED  auth_required            auth_required
                  else unknown_gateway /
                       gateway_revoked (audited)
    CHALLENGED    as ANONYMOUS (new nonce)      good -> AUTHENTICATED    auth_required
                                                bad  -> ANONYMOUS,
                                                        bad_signature (audited)
    AUTHENTICATED already_authenticated         already_authenticated    served

The signature is over :func:`firmware.common.uplink.auth_transcript` (a
domain-separated transcript of gateway id, nonce and central's key id); a
nonce is used once.  After ``MAX_AUTH_FAILURES`` refusals the connection is
marked ``should_close``.  Every served request re-reads the gateway, so a
revocation takes effect on open connections too.

Requests, all idempotent:

* ``FetchService(service, have_version)`` -> ``Service(sealed_bundle,
  sealed_licence)``: the latest bundle of a service the gateway is licensed
  for (empty when ``have_version`` is already that version) and its licence
  set, both sealed to the gateway's inner HPKE key and signed by central.
* ``Sync(since_version)`` -> ``SyncData(sealed, sealed_licences)``: fresh
  sync metadata (central's signed time, expiring after the freeze window,
  listing the exact version and SHA-256 of the licence set and of every
  bundle the gateway is entitled to) and the licence set it lists, or b""
  when ``since_version`` is already that licence set's version.
* ``UsageReport(batch)`` -> ``UsageAck(batch_id, sealed_ack)``: the batch's
  inner-module signature is verified, its records are stored exactly once
  per (gateway, batch id) in one transaction with their audit entry; a
  re-delivery of the same bytes gets the same ack again and stores nothing.
* ``Status`` -> ``StatusReport``.

**Sealed objects are made once per version.**  HPKE sealing is randomised,
but sync metadata must name the exact bytes a later fetch returns, so the
licence set (version = ``licence_revision``) and each bundle (version = its
manifest version) are sealed once per gateway and version, kept as blobs and
served from there (and from a bounded in-memory cache).  Only the metadata
is sealed afresh on every sync: its version comes from
:class:`MetadataVersions`, a millisecond clock that never goes back, with a
ceiling persisted an hour ahead so a restart never reuses a version.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from central_stub.admin import gateway_keys
from central_stub.errors import Refused
from central_stub.licensing import Entitlement, entitlement, latest_bundles, next_version
from central_stub.repository import (
    AuditEntry,
    Gateway,
    Repository,
    SealedRef,
    Transaction,
    UsageBatchRecord,
    UsageRow,
)
from firmware.common.crypto.errors import InvalidSignature, KeyFileError
from firmware.common.crypto.freshness import ObjectRef, SyncMetadata
from firmware.common.crypto.keys import RecipientPublicKey, SigningKey, VerifyKey
from firmware.common.crypto.sealed import Compression, Kind, seal
from firmware.common.errors import StorageError
from firmware.common.link import messages
from firmware.common.uplink import (
    InvalidUsageBatch,
    UsageAckPayload,
    auth_transcript,
    encode_usage_ack,
    verify_usage_batch,
)

logger = logging.getLogger(__name__)

#: Challenge nonce: 32 random bytes, never repeated in practice.
NONCE_BYTES: Final = 32
#: Refused authentication attempts before the connection is closed.
MAX_AUTH_FAILURES: Final = 3
#: Bundles and licence sets are long-lived objects: freshness is enforced by
#: the sync metadata that lists them, so they only need to outlive the box.
OBJECT_LIFETIME: Final = 10 * 366 * 86400
#: A usage ack only needs to survive until the inner module reads it.
ACK_LIFETIME: Final = 366 * 86400
#: Sealed objects kept in memory (licence sets and bundles of active gateways).
CACHE_ENTRIES: Final = 4096
#: Metadata versions are reserved an hour of milliseconds at a time, so the
#: ceiling is written about once an hour, never on every sync.
VERSION_BLOCK: Final = 3_600_000
#: Counter names in the repository.
METADATA_CEILING: Final = "metadata_version_ceiling"
USAGE_ACKS: Final = "usage_acks"


class AuthState(enum.Enum):
    """Where a connection stands in the challenge-response handshake."""

    ANONYMOUS = "anonymous"
    CHALLENGED = "challenged"
    AUTHENTICATED = "authenticated"


@dataclass(frozen=True)
class Event:
    """One thing that happened, for the structured log (never holds secrets)."""

    name: str
    fields: dict[str, object]


class MetadataVersions:
    """Strictly increasing sync-metadata versions, based on milliseconds.

    ``next(now_ms)`` returns ``max(previous + 1, now_ms)``; whenever that
    reaches the persisted ceiling, the ceiling moves ``VERSION_BLOCK`` ahead
    (one small transaction), so after a restart versions start above
    anything ever handed out, even if the clock went back.
    """

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._ceiling = repo.snapshot().get_counter(METADATA_CEILING)
        self._last = self._ceiling

    def next(self, now_ms: int) -> int:
        """Return the next version.  Raises StorageError if the ceiling cannot be persisted."""
        version = max(self._last + 1, now_ms)
        if version >= self._ceiling:
            ceiling = version + VERSION_BLOCK
            with self._repo.transaction() as tx:
                ceiling = max(ceiling, tx.get_counter(METADATA_CEILING) + 1)
                tx.set_counter(METADATA_CEILING, ceiling)
            self._ceiling = ceiling
        self._last = version
        return version


class CentralService:
    """Central's shared state for the gateway protocol; see the module docstring.

    ``random_bytes`` makes challenge nonces (the OS CSPRNG unless a test
    passes its own).  ``on_event`` receives one :class:`Event` per thing
    worth a log line.
    """

    def __init__(
        self,
        repo: Repository,
        signing_key: SigningKey,
        *,
        sync_expiry: int,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.repo = repo
        self.key = signing_key
        self.sync_expiry = sync_expiry
        self.random_bytes = random_bytes
        self._on_event = on_event
        self.versions = MetadataVersions(repo)
        self.counters: Counter[str] = Counter()
        self._view: Transaction | None = None
        self._view_rev: object = object()
        self._entitlements: dict[str, Entitlement] = {}
        self._sealed: OrderedDict[tuple[str, int, str, int], bytes] = OrderedDict()

    # -- plumbing -------------------------------------------------------------------

    def event(self, name: str, **fields: object) -> None:
        """Count and report one event."""
        self.counters[name] += 1
        if self._on_event is not None:
            self._on_event(Event(name, fields))

    def view(self) -> Transaction:
        """Return a read-only view of the committed state, reloaded when it changed."""
        rev = self.repo.revision()
        if self._view is None or rev != self._view_rev:
            self._view = self.repo.snapshot()
            self._view_rev = rev
            self._entitlements.clear()
            self.counters["view_reloads"] += 1
        return self._view

    def audit(self, now: int, actor: str, action: str, target: str, detail: str) -> None:
        """Append a refusal to the audit log (its own transaction)."""
        with self.repo.transaction() as tx:
            tx.append_audit(AuditEntry(now, actor, action, target, False, detail))

    def refuse(
        self, now: int, code: str, detail: str, *, actor: str, target: str, audit: bool = True
    ) -> messages.Error:
        """Return an Error reply (audited unless ``audit`` is False) and count it."""
        self.event("refused", code=code, gateway=target, detail=detail)
        self.counters[f"refused_{code}"] += 1
        if audit:
            self.audit(now, actor, f"gateway.{code}", target, detail)
        return messages.Error(code=code, detail=detail, retry_after=None)

    def malformed(self, now: int, peer: str, gateway: str | None, count: int) -> None:
        """Audit and count ``count`` messages the Link refused as malformed (``bad_message``)."""
        self.counters["refused_bad_message"] += count
        self.event("refused", code="bad_message", gateway=gateway or "-", detail=f"{count}")
        self.audit(
            now, peer, "gateway.bad_message", gateway or "-", f"{count} malformed message(s)"
        )

    def live_gateway(self, gateway_id: str) -> Gateway:
        """Return the registered, unrevoked gateway.  Raises Refused otherwise."""
        gw = self.view().get_gateway(gateway_id)
        if gw is None:
            raise Refused("unknown_gateway", f"gateway {gateway_id!r} is not registered")
        if gw.revoked is not None:
            raise Refused("gateway_revoked", f"gateway {gateway_id!r} is revoked")
        return gw

    def entitlement(self, gateway: Gateway) -> Entitlement:
        """Return the gateway's entitlement under the current view (cached per view)."""
        view = self.view()
        ent = self._entitlements.get(gateway.gateway_id)
        if ent is None:
            ent = entitlement(view, gateway)
            self._entitlements[gateway.gateway_id] = ent
        return ent

    def sealed_object(
        self,
        gateway: Gateway,
        kind: Kind,
        subject: str,
        version: int,
        payload: Callable[[], bytes],
        now: int,
        compression: Compression = Compression.ZLIB,
    ) -> bytes:
        """Return the object sealed for ``gateway`` at ``version``, sealing it the first time.

        Raises StorageError if it cannot be stored.
        """
        key = (gateway.gateway_id, int(kind), subject, version)
        cached = self._sealed.get(key)
        if cached is not None:
            self._sealed.move_to_end(key)
            return cached
        blob = self.view().get_sealed(*key)
        if blob is not None:
            data = self.repo.blobs.get(blob)
        else:
            _, _, hpke = _keys(gateway)
            data = seal(
                payload(),
                kind=kind,
                subject=subject,
                version=version,
                created=now,
                expires=now + OBJECT_LIFETIME,
                issuer=self.key,
                recipient=hpke,
                compression=compression,
            )
            digest = self.repo.blobs.put(data)
            with self.repo.transaction() as tx:
                stored = tx.get_sealed(*key)
                if stored is None:
                    tx.put_sealed(
                        SealedRef(gateway.gateway_id, int(kind), subject, version, digest)
                    )
            if stored is not None:  # another process sealed it first: serve its bytes
                data = self.repo.blobs.get(stored)
            self.counters["objects_sealed"] += 1
        self._sealed[key] = data
        if len(self._sealed) > CACHE_ENTRIES:
            self._sealed.popitem(last=False)
        return data

    def licence_set(self, gateway: Gateway, now: int) -> tuple[bytes, int]:
        """Return (sealed licence set, its version) of ``gateway``."""
        ent = self.entitlement(gateway)
        data = self.sealed_object(
            gateway,
            Kind.LICENCE_SET,
            gateway.gateway_id,
            ent.revision,
            ent.licence_set.to_payload,
            now,
        )
        return data, ent.revision

    def bundle(self, gateway: Gateway, service: str, version: int, blob: str, now: int) -> bytes:
        """Return the bundle ``service``/``version`` sealed for ``gateway``."""
        return self.sealed_object(
            gateway, Kind.BUNDLE, service, version, lambda: self.repo.blobs.get(blob), now
        )

    def bundle_digest(
        self, gateway: Gateway, service: str, version: int, blob: str, now: int
    ) -> bytes:
        """Return the SHA-256 of the bundle sealed for ``gateway``, sealing it the first time.

        A bundle sealed before is named by its blob's digest without reading
        the blob, so one damaged blob fails the fetch of that bundle only, not
        every sync of the gateway.  Raises StorageError when it must be
        sealed and its source cannot be read.
        """
        key = (gateway.gateway_id, int(Kind.BUNDLE), service, version)
        cached = self._sealed.get(key)
        if cached is None:
            stored = self.view().get_sealed(*key)
            if stored is not None:
                return bytes.fromhex(stored)  # the blob store is addressed by SHA-256
            cached = self.bundle(gateway, service, version, blob, now)
        return hashlib.sha256(cached).digest()


def _keys(gateway: Gateway) -> tuple[VerifyKey, VerifyKey, RecipientPublicKey]:
    try:
        return gateway_keys(gateway)
    except (KeyFileError, ValueError) as e:
        raise Refused("internal_error", f"stored keys of {gateway.gateway_id} do not load") from e


class GatewayConnection:
    """The protocol state of one connection; see the module docstring."""

    def __init__(self, service: CentralService, peer: str) -> None:
        self.service = service
        self.peer = peer
        self.state = AuthState.ANONYMOUS
        self.gateway_id: str | None = None
        self._nonce: bytes | None = None
        self._claimed: str | None = None
        self.failures = 0

    @property
    def should_close(self) -> bool:
        """True once the peer failed authentication too often."""
        return self.failures >= MAX_AUTH_FAILURES

    def handle(self, msg: messages.Message, now: int) -> messages.Message:
        """Return the reply to ``msg`` (an Error reply for every refusal).

        Raises StorageError when the repository fails (the adapter answers
        ``internal_error``); nothing is half-written then.
        """
        svc = self.service
        try:
            if isinstance(msg, messages.AuthBegin):
                return self._begin(msg.gateway_id, now)
            if isinstance(msg, messages.AuthProof):
                return self._proof(msg.signature, now)
            if self.state is not AuthState.AUTHENTICATED or self.gateway_id is None:
                return svc.refuse(
                    now,
                    "auth_required",
                    f"authenticate before {msg.KIND.name}",
                    actor=self.peer,
                    target="-",
                    audit=False,
                )
            gateway = svc.live_gateway(self.gateway_id)
            if isinstance(msg, messages.Sync):
                return self._sync(gateway, msg.since_version, now)
            if isinstance(msg, messages.FetchService):
                return self._fetch(gateway, msg.service, msg.have_version, now)
            if isinstance(msg, messages.UsageReport):
                return self._usage(gateway, msg.batch, now)
            if isinstance(msg, messages.Status):
                return self._status(gateway, now)
            return svc.refuse(
                now,
                "unsupported",
                f"central does not serve {msg.KIND.name}",
                actor=self.peer,
                target=gateway.gateway_id,
                audit=False,
            )
        except Refused as e:
            target = self.gateway_id or self._claimed or "-"
            return svc.refuse(now, e.code, e.detail, actor=self.peer, target=target)

    # -- authentication ---------------------------------------------------------------

    def _begin(self, gateway_id: str, now: int) -> messages.Message:
        svc = self.service
        if self.state is AuthState.AUTHENTICATED:
            raise Refused("already_authenticated", "this connection is already authenticated")
        self._claimed = gateway_id
        self._nonce = None
        self.state = AuthState.ANONYMOUS
        try:
            svc.live_gateway(gateway_id)
        except Refused:
            self.failures += 1
            raise
        self._nonce = svc.random_bytes(NONCE_BYTES)
        self.state = AuthState.CHALLENGED
        svc.event("auth_challenge", gateway=gateway_id, peer=self.peer)
        return messages.AuthChallenge(nonce=self._nonce)

    def _proof(self, signature: bytes, now: int) -> messages.Message:
        svc = self.service
        if self.state is AuthState.AUTHENTICATED:
            raise Refused("already_authenticated", "this connection is already authenticated")
        nonce, claimed = self._nonce, self._claimed
        self._nonce = None  # single use, whatever happens next
        self.state = AuthState.ANONYMOUS
        if nonce is None or claimed is None:
            return svc.refuse(
                now,
                "auth_required",
                "AuthProof without a challenge",
                actor=self.peer,
                target="-",
                audit=False,
            )
        gateway = svc.live_gateway(claimed)
        outer, _, _ = _keys(gateway)
        transcript = auth_transcript(claimed, nonce, svc.key.key_id)
        try:
            outer.verify(signature, transcript)
        except InvalidSignature:
            self.failures += 1
            raise Refused(
                "bad_signature", f"authentication proof for {claimed!r} does not verify"
            ) from None
        self.state = AuthState.AUTHENTICATED
        self.gateway_id = claimed
        svc.event("auth_ok", gateway=claimed, peer=self.peer)
        return messages.AuthOk()

    # -- requests --------------------------------------------------------------------

    def _sync(self, gateway: Gateway, since: int, now: int) -> messages.Message:
        svc = self.service
        licences, revision = svc.licence_set(gateway, now)
        refs = [
            ObjectRef(
                Kind.LICENCE_SET, gateway.gateway_id, revision, hashlib.sha256(licences).digest()
            )
        ]
        for b in svc.entitlement(gateway).bundles:
            try:
                digest = svc.bundle_digest(gateway, b.service, b.version, b.blob, now)
            except StorageError as e:
                # never sealed for this gateway, so it holds no copy to withdraw;
                # the rest of the sync (licences, payments, upgrades) still goes
                svc.event("sync_bundle_unreadable", gateway=gateway.gateway_id, error=str(e))
                continue
            refs.append(ObjectRef(Kind.BUNDLE, b.service, b.version, digest))
        meta = SyncMetadata(gateway=gateway.gateway_id, objects=tuple(refs))
        _, _, hpke = _keys(gateway)
        sealed_meta = seal(
            meta.to_payload(),
            kind=Kind.SYNC_METADATA,
            subject=gateway.gateway_id,
            version=svc.versions.next(now * 1000),
            created=now,
            expires=now + svc.sync_expiry,
            issuer=svc.key,
            recipient=hpke,
        )
        svc.event("sync", gateway=gateway.gateway_id, revision=revision, objects=len(refs))
        # the gateway already holds this very licence set: list it, do not resend it
        # (a modem line is slow; the metadata still names its version and digest)
        unchanged = since == revision
        return messages.SyncData(sealed=sealed_meta, sealed_licences=b"" if unchanged else licences)

    def _fetch(
        self, gateway: Gateway, service: str, have_version: int | None, now: int
    ) -> messages.Message:
        svc = self.service
        if service not in latest_bundles(svc.view()):
            raise Refused("unknown_service", f"no service {service!r} is published")
        wanted = [b for b in svc.entitlement(gateway).bundles if b.service == service]
        if not wanted:
            raise Refused(
                "not_licensed", f"gateway {gateway.gateway_id!r} holds no licence for {service!r}"
            )
        b = wanted[0]
        sealed_bundle = (
            b""
            if have_version == b.version
            else svc.bundle(gateway, b.service, b.version, b.blob, now)
        )
        licences, _ = svc.licence_set(gateway, now)
        svc.event(
            "fetch",
            gateway=gateway.gateway_id,
            service=service,
            version=b.version,
            unchanged=not sealed_bundle,
        )
        return messages.Service(sealed_bundle=sealed_bundle, sealed_licence=licences)

    def _usage(self, gateway: Gateway, batch_bytes: bytes, now: int) -> messages.Message:
        svc = self.service
        _, inner, hpke = _keys(gateway)
        try:
            batch = verify_usage_batch(batch_bytes, inner)
        except InvalidUsageBatch as e:
            raise Refused("bad_usage_batch", str(e)) from None
        if batch.gateway != gateway.gateway_id:
            raise Refused("wrong_gateway", f"batch {batch.batch_id!r} names {batch.gateway!r}")
        digest = batch.digest.hex()
        known = svc.view().get_usage_batch(gateway.gateway_id, batch.batch_id)
        if known is None:
            ack_version = next_version(svc.view().get_counter(USAGE_ACKS), now)
            ack = seal(
                encode_usage_ack(
                    UsageAckPayload(
                        gateway.gateway_id, batch.batch_id, batch.digest, len(batch.records)
                    )
                ),
                kind=Kind.USAGE_ACK,
                subject=gateway.gateway_id,
                version=ack_version,
                created=now,
                expires=now + ACK_LIFETIME,
                issuer=svc.key,
                recipient=hpke,
            )
            ack_blob = svc.repo.blobs.put(ack)
            rows = [
                UsageRow(
                    gateway_id=gateway.gateway_id,
                    batch_id=batch.batch_id,
                    customer_id=gateway.customer_id,
                    service=r.service,
                    licence_id=r.licence,
                    credential=r.credential,
                    at=r.at,
                    units=r.units,
                    duration_ms=r.duration_ms,
                    outcome=r.outcome,
                    bytes_in=r.bytes_in,
                    bytes_out=r.bytes_out,
                )
                for r in batch.records
            ]
            with svc.repo.transaction() as tx:
                known = tx.get_usage_batch(gateway.gateway_id, batch.batch_id)
                if known is None:
                    tx.set_counter(USAGE_ACKS, max(ack_version, tx.get_counter(USAGE_ACKS) + 1))
                    record = UsageBatchRecord(
                        gateway.gateway_id, batch.batch_id, digest, len(rows), now, ack_blob
                    )
                    tx.add_usage_batch(record, rows)
                    tx.append_audit(
                        AuditEntry(
                            now,
                            gateway.gateway_id,
                            "usage.store",
                            batch.batch_id,
                            True,
                            f"records={len(rows)} sha256={digest}",
                        )
                    )
            if known is None:
                svc.event(
                    "usage_stored",
                    gateway=gateway.gateway_id,
                    batch=batch.batch_id,
                    records=len(rows),
                )
                return messages.UsageAck(batch_id=batch.batch_id, sealed_ack=ack)
        if known.digest != digest:
            raise Refused(
                "usage_conflict",
                f"batch {batch.batch_id!r} was already stored with other content",
            )
        svc.audit(now, gateway.gateway_id, "usage.duplicate", batch.batch_id, "acknowledged again")
        svc.event("usage_duplicate", gateway=gateway.gateway_id, batch=batch.batch_id)
        return messages.UsageAck(batch_id=batch.batch_id, sealed_ack=svc.repo.blobs.get(known.ack))

    def _status(self, gateway: Gateway, now: int) -> messages.Message:
        ent = self.service.entitlement(gateway)
        return messages.StatusReport(
            fields={
                "gateway": gateway.gateway_id,
                "time": now,
                "licence_revision": ent.revision,
                "licences": len(ent.licence_set.licences),
                "bundles": len(ent.bundles),
            }
        )
