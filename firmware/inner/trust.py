"""The inner module's trust state: the one object the daemon asks "may this call run?".

It composes the pure pieces and persists their state in one directory:

* :class:`~firmware.common.crypto.freshness.SyncVerifier` opens what central
  sends and enforces rollback, freeze and mix-and-match protection;
* :class:`~firmware.inner.trusted_time.TrustedClock` gives trusted time;
* :func:`~firmware.common.licence.evaluate` makes the licence decision.

Files under ``state_dir`` (all written atomically, mode 0600)::

    versions.json           highest accepted version of every object and licence
    time.json               trusted-time high-water mark and anchor
    sync.cbor               the last accepted sync metadata and the licence set
                            in force, as received, in one file: [metadata, licences]

The metadata and the licence set it lists are written together: a power cut
between two separate writes could leave metadata naming a licence set that is
not on disk, and the mix-and-match protection would then refuse the old one
at the next start, leaving every call at 503 until central is reached.
(``sync-metadata.sealed`` and ``licences.sealed``, the earlier pair of files,
are still read when ``sync.cbor`` is absent.)

On start the stored sealed objects are opened again (signature, recipient,
expiry and version all re-checked), so a tampered file is simply ignored and
an expired one leaves the gateway answering :class:`SyncRequired` until it
reaches central.  The registry is never reset: a corrupt one raises
``RegistryCorrupt`` and the daemon must stop.

Ordering: an object is written before the registry that records it, and the
registry before the object is used, so a power cut at any instant can lose
an update but never let an older object back in.

This is a thin adapter: the only I/O is reading and atomically writing the
files above.  Time comes in as ``mono`` (the caller's monotonic clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cbor2

from firmware.common.crypto.errors import InvalidObject, StaleMetadata
from firmware.common.crypto.freshness import SyncVerifier, load_registry, save_registry
from firmware.common.crypto.keys import RecipientKey, VerifyKey
from firmware.common.crypto.sealed import Kind, Opened
from firmware.common.licence import Decision, LicenceSet, evaluate
from firmware.common.store.atomic import atomic_write
from firmware.inner.trusted_time import TrustedClock, TrustedTimeStore

REGISTRY_FILE = "versions.json"
TIME_FILE = "time.json"
SYNC_FILE = "sync.cbor"
#: The earlier layout: one file each, written one after the other.
METADATA_FILE = "sync-metadata.sealed"
LICENCES_FILE = "licences.sealed"


@dataclass(frozen=True)
class SyncRequired:
    """No fresh sync metadata or no licence set: the gateway must reach central first."""

    reason: str
    status: ClassVar[int] = 503


class GatewayTrust:
    """Trust state of one inner module, persisted under ``state_dir``.

    Construct once per process.  Raises RegistryCorrupt or
    TrustedTimeCorrupt if persisted state is unreadable (never resets it).
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        recipient: RecipientKey,
        central: VerifyKey,
        gateway: str,
        boot_id: str,
        mono: float,
        floor: int = 0,
    ) -> None:
        self._dir = Path(state_dir)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._time_store = TrustedTimeStore(self._dir / TIME_FILE)
        self._clock = TrustedClock(self._time_store.load(), boot_id=boot_id, mono=mono, floor=floor)
        self._verifier = SyncVerifier(
            recipient=recipient,
            central=central,
            gateway=gateway,
            registry=load_registry(self._dir / REGISTRY_FILE),
        )
        self._licences: LicenceSet | None = None
        self._metadata_bytes: bytes | None = None  # as persisted, to rewrite with new licences
        self._licence_bytes = b""
        self._readopt(mono)

    def _read(self, name: str) -> bytes | None:
        try:
            return (self._dir / name).read_bytes()
        except OSError:
            return None

    def _stored_sync(self) -> tuple[bytes | None, bytes]:
        """Return the stored (metadata, licences); what cannot be read counts as absent."""
        data = self._read(SYNC_FILE)
        if data is None:
            return self._read(METADATA_FILE), self._read(LICENCES_FILE) or b""
        try:
            pair = cbor2.loads(data)
        except Exception:  # a damaged file: as if there were none, central will resend
            return None, b""
        if type(pair) is not list or len(pair) != 2 or not all(type(p) is bytes for p in pair):
            return None, b""
        return pair[0], pair[1]

    def _readopt(self, mono: float) -> None:
        """Open the stored metadata and licence set again; ignore what no longer opens."""
        now = self._clock.now(mono)
        meta, lics = self._stored_sync()
        if meta is None:
            return
        try:
            self._verifier.accept_sync_metadata(meta, now)
        except InvalidObject:  # expired, rolled back, tampered: wait for central
            return
        self._metadata_bytes = meta
        if lics:
            try:
                self._licences = self._verifier.accept_licence_set(lics, now)
                self._licence_bytes = lics
            except (InvalidObject, StaleMetadata):
                self._licences = None

    def _persist_sync(self) -> None:
        """Write the metadata and licence set in force as one file, then the registry."""
        if self._metadata_bytes is not None:
            pair = cbor2.dumps([self._metadata_bytes, self._licence_bytes])
            atomic_write(self._dir / SYNC_FILE, pair)
        save_registry(self._dir / REGISTRY_FILE, self._verifier.registry)

    @property
    def licences(self) -> LicenceSet | None:
        """The licence set in force, or None before the first one arrives."""
        return self._licences

    @property
    def licence_version(self) -> int:
        """The version of the licence set in force, 0 if none (what a sync names as held).

        The set in force is always the one the metadata in force lists.
        """
        meta = self._verifier.metadata
        if self._licences is None or meta is None:
            return 0
        ref = meta.find(Kind.LICENCE_SET, meta.gateway)
        return 0 if ref is None else ref.version

    @property
    def verifier(self) -> SyncVerifier:
        """The underlying verifier (for status and tests)."""
        return self._verifier

    def now(self, mono: float) -> int:
        """Return trusted time (Unix seconds) at monotonic reading ``mono``."""
        return self._clock.now(mono)

    def tick(self, mono: float) -> None:
        """Persist trusted time if it moved enough since last time; raise StorageError."""
        if self._clock.should_persist(mono):
            self._time_store.save(self._clock.state(mono))

    def receive_sync(self, metadata: bytes, licences: bytes, mono: float) -> Opened:
        """Adopt a sync: new metadata, central's signed time and the licence set it lists.

        ``licences`` empty means central sent no set: the one in force must
        then be the one the new metadata lists.  The metadata and the set are
        adopted together or not at all (see ``SyncVerifier.accept_sync``) and
        persisted in one atomic write.  Raises InvalidObject, ExpiredObject,
        RollbackError or StaleMetadata (state unchanged), or StorageError
        (accepted in memory, not on disk).
        """
        now = self._clock.now(mono)
        held = bytes(licences) or self._licence_bytes
        opened, licence_set = self._verifier.accept_sync(metadata, held, now)
        self._metadata_bytes = bytes(metadata)
        self._licences = licence_set
        self._licence_bytes = held
        self._persist_sync()
        self._clock.observe_signed_time(opened.header.created, mono)
        self._time_store.save(self._clock.state(mono))
        return opened

    def receive_licence_set(self, data: bytes, mono: float) -> LicenceSet:
        """Adopt a new licence set listed by the current metadata; persist it; return it.

        Raises StaleMetadata, InvalidObject, ExpiredObject, RollbackError
        (state unchanged) or StorageError.
        """
        licences = self._verifier.accept_licence_set(data, self._clock.now(mono))
        self._licences = licences
        self._licence_bytes = bytes(data)
        self._persist_sync()
        return licences

    def receive_bundle(self, data: bytes, service: str, mono: float) -> Opened:
        """Open a bundle listed by the current metadata; record its version; return it.

        The caller stores the bundle.  Raises StaleMetadata, InvalidObject,
        ExpiredObject, RollbackError (state unchanged) or StorageError.
        """
        opened = self._verifier.accept_object(data, Kind.BUNDLE, service, self._clock.now(mono))
        save_registry(self._dir / REGISTRY_FILE, self._verifier.registry)
        return opened

    def decide(
        self,
        *,
        service: str,
        mono: float,
        api_key: str | None = None,
        key_hash: str | None = None,
    ) -> Decision | SyncRequired:
        """Return the licence decision for a call at ``mono`` (never raises).

        :class:`SyncRequired` (503) when the sync metadata has expired (a
        frozen or unreachable upstream) or no licence set has arrived yet;
        otherwise :func:`~firmware.common.licence.evaluate`'s answer.
        """
        now = self._clock.now(mono)
        try:
            self._verifier.require_fresh(now)
        except StaleMetadata as e:
            return SyncRequired(str(e))
        if self._licences is None:
            return SyncRequired("no licence set received yet")
        return evaluate(
            self._licences, service=service, now=now, api_key=api_key, key_hash=key_hash
        )
