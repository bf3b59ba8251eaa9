"""Anti-rollback and freshness: what the inner module accepts, and for how long.

Signatures prove an object is central's; they do not prove it is central's
*latest*.  An attacker who controls the path from central (a thief of the
outer module, a hostile mirror, a tap on the phone line) can replay old
objects, withhold new ones, or combine objects from different moments.  The
attacks The Update Framework names, and what answers each here:

rollback
    :class:`VersionRegistry` keeps the highest version accepted for every
    sealed object (by kind and subject) and every licence, persisted
    atomically; anything older raises :class:`RollbackError`.  A different
    object under an already accepted version is refused too.
freeze (and "keep a revoked licence alive")
    central sends **sync metadata** (kind ``SYNC_METADATA``) that expires
    after a window central configures per gateway (for example 7 days).
    :meth:`SyncVerifier.require_fresh` raises :class:`StaleMetadata` once
    the latest accepted metadata has expired at trusted time, so the inner
    module stops serving licensed calls: an upstream that withholds a
    revocation keeps a licence alive for at most that window.
mix-and-match
    sync metadata lists every current object's kind, subject, version and
    SHA-256 of its sealed bytes (a TUF snapshot).  An object is accepted
    only if the latest metadata lists exactly it.
arbitrary software
    nothing is accepted that central did not sign (``open_sealed``).
endless data
    ``open_sealed`` caps sealed size and decompressed size (the signed
    length, at most ``max_payload_bytes``).
wrong recipient
    objects are HPKE-sealed to one inner module's key and name its key id.

Sync metadata's ``created`` time is central's signed time: the caller feeds
it to the trusted clock (``firmware.inner.trusted_time``).  All of this is
pure; the only I/O is :func:`load_registry` / :func:`save_registry`, which
read and atomically replace one small JSON file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cbor2

from firmware.common.crypto.errors import (
    InvalidObject,
    RollbackError,
    StaleMetadata,
    UnlistedObject,
)
from firmware.common.crypto.keys import RecipientKey, VerifyKey
from firmware.common.crypto.sealed import Kind, Opened, open_sealed, verify_sealed
from firmware.common.errors import CryptoError
from firmware.common.licence import LicenceFormatError, LicenceSet
from firmware.common.store.atomic import atomic_write

#: The sync-metadata payload format this code writes and reads.
SYNC_FORMAT = 1

#: The registry file format.
REGISTRY_FORMAT = 1

#: A gateway holds a few bundles and one licence set; 10,000 entries is ample.
MAX_LISTED_OBJECTS = 10_000

_DIGEST_BYTES = 32


class RegistryCorrupt(CryptoError):
    """The persisted version registry is unreadable: refusing to start from nothing."""


def object_name(kind: Kind, subject: str) -> str:
    """Return the registry name of a sealed object: ``"<kind>/<subject>"``."""
    return f"{kind.name.lower()}/{subject}"


class VersionRegistry:
    """The highest accepted version of every named object (and the digest accepted with it)."""

    def __init__(self, entries: Mapping[str, tuple[int, bytes | None]] | None = None) -> None:
        self._entries: dict[str, tuple[int, bytes | None]] = dict(entries or {})

    def highest(self, name: str) -> int:
        """Return the highest version accepted for ``name``, 0 if none."""
        entry = self._entries.get(name)
        return 0 if entry is None else entry[0]

    def entries(self) -> dict[str, tuple[int, bytes | None]]:
        """Return a copy of every ``name -> (version, digest)``."""
        return dict(self._entries)

    def check(self, updates: Mapping[str, tuple[int, bytes | None]]) -> None:
        """Return None if every update may be recorded; raise RollbackError otherwise.

        An update may be recorded if its version is above the recorded one,
        or equal to it with the same digest (a re-delivery of one object).
        """
        for name, (version, digest) in updates.items():
            entry = self._entries.get(name)
            if entry is None:
                continue
            old_version, old_digest = entry
            if version < old_version:
                raise RollbackError(f"{name}: version {version} is older than {old_version}")
            if (
                version == old_version
                and digest is not None
                and old_digest is not None
                and digest != old_digest
            ):
                raise RollbackError(f"{name}: different content under version {version}")

    def record(self, updates: Mapping[str, tuple[int, bytes | None]]) -> None:
        """Record all ``updates`` or none: raise RollbackError (registry unchanged)."""
        self.check(updates)
        self._entries.update(updates)

    def to_json(self) -> bytes:
        """Return the registry's persisted form."""
        return json.dumps(
            {
                "format": REGISTRY_FORMAT,
                "entries": {
                    n: [v, None if d is None else d.hex()]
                    for n, (v, d) in sorted(self._entries.items())
                },
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VersionRegistry:
        """Return the registry in ``data``; raise RegistryCorrupt if it is not one."""
        try:
            doc = json.loads(data)
            if doc["format"] != REGISTRY_FORMAT:
                raise ValueError("format")
            entries: dict[str, tuple[int, bytes | None]] = {}
            for name, (version, digest) in doc["entries"].items():
                if type(version) is not int or version < 0:
                    raise ValueError("version")
                entries[str(name)] = (version, None if digest is None else bytes.fromhex(digest))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise RegistryCorrupt("version registry is corrupt") from e
        return cls(entries)


def load_registry(path: Path | str) -> VersionRegistry:
    """Return the registry stored at ``path``, or an empty one if the file does not exist.

    Raises RegistryCorrupt if the file exists but cannot be read or parsed:
    starting over from an empty registry would reopen every rollback.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return VersionRegistry()
    except OSError as e:
        raise RegistryCorrupt(f"cannot read version registry {path}: {e}") from e
    return VersionRegistry.from_json(data)


def save_registry(path: Path | str, registry: VersionRegistry) -> None:
    """Replace the file at ``path`` with ``registry`` atomically; raise StorageError."""
    atomic_write(path, registry.to_json())


# --------------------------------------------------------------------------- sync metadata


@dataclass(frozen=True)
class ObjectRef:
    """What sync metadata says about one current object."""

    kind: Kind
    subject: str
    version: int
    digest: bytes


@dataclass(frozen=True)
class SyncMetadata:
    """The payload of a ``SYNC_METADATA`` object: the current version of every object."""

    gateway: str
    objects: tuple[ObjectRef, ...] = ()

    @classmethod
    def listing(cls, gateway: str, sealed_objects: list[bytes], issuer: VerifyKey) -> SyncMetadata:
        """Return metadata listing exactly ``sealed_objects`` (central's side of a sync).

        Raises InvalidObject if one is not signed by ``issuer``, and
        ValueError if two share a kind and subject.
        """
        refs = []
        for data in sealed_objects:
            h = verify_sealed(data, issuer)
            refs.append(ObjectRef(h.kind, h.subject, h.version, hashlib.sha256(data).digest()))
        if len({(r.kind, r.subject) for r in refs}) != len(refs):
            raise ValueError("two objects with the same kind and subject")
        return cls(gateway=gateway, objects=tuple(refs))

    def find(self, kind: Kind, subject: str) -> ObjectRef | None:
        """Return the listed reference for ``kind``/``subject``, or None."""
        for ref in self.objects:
            if ref.kind is kind and ref.subject == subject:
                return ref
        return None

    def to_payload(self) -> bytes:
        """Return the CBOR payload."""
        return cbor2.dumps(
            {
                "format": SYNC_FORMAT,
                "gateway": self.gateway,
                "objects": [
                    [int(r.kind), r.subject, r.version, r.digest]
                    for r in sorted(self.objects, key=lambda r: (r.kind, r.subject))
                ],
            },
            canonical=True,
        )

    @classmethod
    def from_payload(cls, data: bytes) -> SyncMetadata:
        """Return the metadata in ``data``; raise InvalidObject if malformed."""
        try:
            doc = cbor2.loads(data)
            if cbor2.dumps(doc, canonical=True) != data:
                raise ValueError("not canonical")
            if not isinstance(doc, dict) or set(doc) != {"format", "gateway", "objects"}:
                raise ValueError("fields")
            if doc["format"] != SYNC_FORMAT or not isinstance(doc["gateway"], str):
                raise ValueError("format")
            raw = doc["objects"]
            if not isinstance(raw, list) or len(raw) > MAX_LISTED_OBJECTS:
                raise ValueError("objects")
            refs = []
            for item in raw:
                kind, subject, version, digest = item
                if not (
                    type(kind) is int
                    and isinstance(subject, str)
                    and type(version) is int
                    and version >= 0
                    and isinstance(digest, bytes)
                    and len(digest) == _DIGEST_BYTES
                ):
                    raise ValueError("object")
                refs.append(ObjectRef(Kind(kind), subject, version, digest))
        except Exception as e:  # hostile input: cbor2 and unpacking raise many types
            raise InvalidObject("sync metadata is not valid") from e
        if len({(r.kind, r.subject) for r in refs}) != len(refs):
            raise InvalidObject("sync metadata lists an object twice")
        return cls(gateway=doc["gateway"], objects=tuple(refs))


class SyncVerifier:
    """The inner module's gate for everything central sends (sans-I/O).

    Feed it sealed bytes and trusted time; it opens them, enforces rollback,
    freeze and mix-and-match protection, and updates its registry in memory.
    The caller persists :attr:`registry` (``save_registry``) after each
    successful ``accept_*`` and before acting on the object, keeps the
    last accepted sync metadata bytes to feed back after a reboot, and feeds
    each accepted metadata's ``header.created`` to the trusted clock.
    ``firmware.inner.trust.GatewayTrust`` does all of that.
    """

    def __init__(
        self,
        *,
        recipient: RecipientKey,
        central: VerifyKey,
        gateway: str,
        registry: VersionRegistry | None = None,
    ) -> None:
        self._recipient = recipient
        self._central = central
        self._gateway = gateway
        self.registry = registry if registry is not None else VersionRegistry()
        self._metadata: SyncMetadata | None = None
        self._metadata_expires: int | None = None

    @property
    def metadata(self) -> SyncMetadata | None:
        """The latest accepted sync metadata, or None before the first."""
        return self._metadata

    def accept_sync_metadata(self, data: bytes, now: int) -> Opened:
        """Open and adopt sync metadata; return it (``header.created`` is central's time).

        Raises InvalidObject (not valid, or for another gateway),
        ExpiredObject, or RollbackError (older than the metadata in use).
        """
        name = object_name(Kind.SYNC_METADATA, self._gateway)
        opened = open_sealed(
            data,
            self._recipient,
            self._central,
            now=now,
            expected_kind=Kind.SYNC_METADATA,
            expected_subject=self._gateway,
            min_version=self.registry.highest(name),
        )
        meta = SyncMetadata.from_payload(opened.payload)
        if meta.gateway != self._gateway:
            raise InvalidObject("sync metadata is for another gateway")
        self.registry.record({name: (opened.header.version, opened.digest)})
        self._metadata = meta
        self._metadata_expires = opened.header.expires
        return opened

    def accept_sync(
        self, metadata: bytes, licences: bytes, now: int
    ) -> tuple[Opened, LicenceSet | None]:
        """Adopt sync metadata and the licence set it lists together: both or neither.

        ``licences`` is the sealed set to hold from now on (the one central
        sent, or the one already held if central sent none; empty if there is
        none).  It must be exactly the version the metadata lists: a set the
        metadata does not list is never carried over under newer metadata,
        which would let whoever relays the sync (the outer module) keep a
        superseded set - say, one before a revocation - in force for as long
        as it keeps sending fresh metadata without the set.  Returns the
        opened metadata and the set (None if ``licences`` is empty).  Raises
        as :meth:`accept_sync_metadata` and :meth:`accept_licence_set`; on
        any error nothing changed.
        """
        saved = (self.registry.entries(), self._metadata, self._metadata_expires)
        try:
            opened = self.accept_sync_metadata(metadata, now)
            licence_set = self.accept_licence_set(licences, now) if licences else None
        except BaseException:
            self.registry = VersionRegistry(saved[0])
            self._metadata, self._metadata_expires = saved[1], saved[2]
            raise
        return opened, licence_set

    def require_fresh(self, now: int) -> None:
        """Return None if sync metadata valid at ``now`` was accepted; else raise StaleMetadata."""
        if self._metadata_expires is None:
            raise StaleMetadata("no sync metadata accepted yet")
        if now >= self._metadata_expires:
            raise StaleMetadata(
                f"sync metadata expired at {self._metadata_expires}; "
                "the gateway must reach central to go on serving licensed calls"
            )

    def _open_listed(self, data: bytes, kind: Kind, subject: str, now: int) -> Opened:
        """Return the object opened and checked against the metadata, without recording it."""
        self.require_fresh(now)
        assert self._metadata is not None  # require_fresh guarantees it
        name = object_name(kind, subject)
        ref = self._metadata.find(kind, subject)
        if ref is None:
            raise UnlistedObject(f"{name} is not in the sync metadata")
        opened = open_sealed(
            data,
            self._recipient,
            self._central,
            now=now,
            expected_kind=kind,
            expected_subject=subject,
            min_version=self.registry.highest(name),
        )
        if opened.header.version != ref.version or opened.digest != ref.digest:
            raise UnlistedObject(f"{name} is not the version the sync metadata lists")
        return opened

    def accept_object(self, data: bytes, kind: Kind, subject: str, now: int) -> Opened:
        """Open a bundle (or other listed object) that the current metadata lists.

        Returns it opened.  Raises StaleMetadata (no fresh metadata),
        InvalidObject (not valid; UnlistedObject: not the listed object, mix-and-match),
        ExpiredObject, or RollbackError.  The registry is updated only on success.
        """
        opened = self._open_listed(data, kind, subject, now)
        name = object_name(kind, subject)
        self.registry.record({name: (opened.header.version, opened.digest)})
        return opened

    def accept_licence_set(self, data: bytes, now: int) -> LicenceSet:
        """Open, check and adopt this gateway's licence set (subject = gateway name).

        Besides :meth:`accept_object`'s checks, no single licence may go back
        to an older version.  Raises as :meth:`accept_object`; a payload that
        is not a licence set for this gateway raises InvalidObject.  The
        registry is updated only on success, all at once.
        """
        opened = self._open_listed(data, Kind.LICENCE_SET, self._gateway, now)
        try:
            licences = LicenceSet.from_payload(opened.payload)
        except LicenceFormatError as e:
            raise InvalidObject("licence set payload is not valid") from e
        if licences.gateway != self._gateway:
            raise InvalidObject("licence set is for another gateway")
        updates: dict[str, tuple[int, bytes | None]] = {
            name: (version, None) for name, version in licences.versions().items()
        }
        updates[object_name(Kind.LICENCE_SET, self._gateway)] = (
            opened.header.version,
            opened.digest,
        )
        self.registry.record(updates)
        return licences
