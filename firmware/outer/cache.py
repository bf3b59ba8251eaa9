"""The relay's cache of sealed objects, by content hash, atomically on disk.

Theory of operation
-------------------
The outer module cannot read what it relays, but it can keep it: a repeated
``FETCH_SERVICE`` (the inner module lost its disk, or was re-imaged, or a
second request raced the first) is answered from here without a call.

Layout under the cache directory::

    objects/<sha256 hex>   one sealed object, exactly as central sent it
    index.json             what the objects are: per service the bundle
                           version and object; the newest licence set; the
                           last sync reply and when it was stored

Every file is written with :func:`~firmware.common.store.atomic.atomic_write`
(temporary file, fsync, rename, fsync of the directory), objects before the
index that names them, so a power cut leaves the last committed index with
every object it names.  Objects no index names are removed after each commit.

Nothing read back is trusted blindly: an object whose SHA-256 does not match
its name (a flipped bit, a truncated file) is dropped from the index and
counted (``corrupt``), and the caller goes to central instead; an index that
does not parse is counted and replaced by an empty one.  Central's signature
on every object was checked before it was stored (by the relay), and the
inner module checks everything again.

Bad input (an index of another shape, a digest that is not 64 hex digits)
never raises out of :meth:`SealedCache.load`; a failed write raises
:class:`~firmware.outer.errors.CacheError` and leaves the previous index and
every object it names intact.

:func:`plan_fetch` is the pure decision of whether a fetch can be answered
from the cache (tested without a disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from firmware.common.errors import StorageError
from firmware.common.store.atomic import atomic_write
from firmware.outer.errors import CacheError

#: Format number of index.json; another number is treated as an empty cache.
INDEX_FORMAT: Final = 1
#: index.json is a few hundred bytes per service; anything far larger is not ours.
MAX_INDEX_BYTES: Final = 4 * 2**20
#: Largest object accepted: the link's largest message.
MAX_OBJECT_BYTES: Final = 64 * 2**20

_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True)
class ServiceEntry:
    """What the cache knows about one service.

    ``bundle`` is the digest of the sealed bundle of ``version``, or None when
    central answered "unchanged" for ``version`` (so only that holder of
    ``version`` can be answered).
    """

    version: int
    bundle: str | None
    stored_at: float


@dataclass(frozen=True)
class LicenceEntry:
    """The newest sealed licence set seen: its header version and digest."""

    version: int
    digest: str


@dataclass(frozen=True)
class SyncEntry:
    """The last sync reply from central and when it was stored (Unix seconds).

    ``licences`` is the digest of the licence set the sync lists, or None when
    central sent none (the set was unchanged) and the cache does not hold it.
    """

    sealed: str
    licences: str | None
    stored_at: float


@dataclass(frozen=True)
class FetchPlan:
    """What to do with a FETCH_SERVICE.

    ``answer``: reply from the cache (``send_bundle``: with the cached bundle,
    else with an empty one, the holder being up to date).  Otherwise ask
    central with ``ask_have_version``.
    """

    answer: bool
    send_bundle: bool = False
    ask_have_version: int | None = None


def plan_fetch(
    entry: ServiceEntry | None,
    licence: LicenceEntry | None,
    have_version: int | None,
    now: float,
    max_age: float,
) -> FetchPlan:
    """Return how to serve a fetch of a service whose cache entry is ``entry``.

    A fresh entry (younger than ``max_age`` seconds at ``now``) answers when
    the inner module already holds its version, or when it holds the bundle
    and the inner module holds nothing newer.  Otherwise central is asked,
    with the cached version when the cache holds a bundle (so central can
    answer "unchanged" and the cache stays whole), else with the inner
    module's version.
    """
    if entry is None:
        return FetchPlan(answer=False, ask_have_version=have_version)
    stale = now - entry.stored_at > max_age or now < entry.stored_at
    if not stale and licence is not None:
        if have_version is not None and have_version == entry.version:
            return FetchPlan(answer=True, send_bundle=False)
        if entry.bundle is not None and (have_version is None or have_version < entry.version):
            return FetchPlan(answer=True, send_bundle=True)
    if entry.bundle is not None and (have_version is None or have_version <= entry.version):
        return FetchPlan(answer=False, ask_have_version=entry.version)
    return FetchPlan(answer=False, ask_have_version=have_version)


def digest_of(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


class SealedCache:
    """Sealed objects on disk, by content hash; see the module docstring.

    Create, then :meth:`load`.  One process owns the directory.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.objects = self.directory / "objects"
        self.index_path = self.directory / "index.json"
        self.services: dict[str, ServiceEntry] = {}
        self.licence: LicenceEntry | None = None
        self.sync: SyncEntry | None = None
        self.counters: Counter[str] = Counter()

    # -- loading -------------------------------------------------------------------

    def load(self) -> None:
        """Create the directories if needed and read the index.

        A missing or unreadable index means an empty cache (counted
        ``index_invalid`` when the file was there).  Raises CacheError only
        when the directories cannot be created.
        """
        try:
            self.objects.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CacheError(e.errno, f"cannot create the cache {self.directory}: {e}") from e
        for tmp in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        for tmp in self.objects.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.services, self.licence, self.sync = {}, None, None
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError:
            self.counters["index_invalid"] += 1
            return
        try:
            if len(raw) > MAX_INDEX_BYTES:
                raise ValueError("index too large")
            self._parse(json.loads(raw))
        except (ValueError, TypeError, KeyError):
            self.counters["index_invalid"] += 1
            self.services, self.licence, self.sync = {}, None, None

    def _parse(self, doc: Any) -> None:
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise ValueError("not a cache index")
        if set(doc) != {"format", "services", "licence_set", "sync"}:
            raise ValueError("index keys")
        services = doc["services"]
        if not isinstance(services, dict):
            raise ValueError("services")
        for name, item in services.items():
            if not isinstance(name, str) or not 0 < len(name.encode()) <= 128:
                raise ValueError("service name")
            if not isinstance(item, dict) or set(item) != {"version", "bundle", "stored_at"}:
                raise ValueError("service entry")
            self.services[name] = ServiceEntry(
                _version(item["version"]), _digest(item["bundle"], True), _time(item["stored_at"])
            )
        lic = doc["licence_set"]
        if lic is not None:
            if not isinstance(lic, dict) or set(lic) != {"version", "object"}:
                raise ValueError("licence entry")
            self.licence = LicenceEntry(_version(lic["version"]), _need(lic["object"]))
        sync = doc["sync"]
        if sync is not None:
            if not isinstance(sync, dict) or set(sync) != {"sealed", "licences", "stored_at"}:
                raise ValueError("sync entry")
            self.sync = SyncEntry(
                _need(sync["sealed"]), _digest(sync["licences"], True), _time(sync["stored_at"])
            )

    # -- reading ---------------------------------------------------------------------

    def read(self, digest: str) -> bytes | None:
        """Return the object named ``digest``, or None when it is missing or corrupt.

        A corrupt or missing object is dropped from the index (counted
        ``corrupt``), so the next request goes to central.
        """
        try:
            data = (self.objects / digest).read_bytes()
        except OSError:
            data = None
        if data is not None and digest_of(data) == digest:
            self.counters["object_reads"] += 1
            return data
        self.counters["corrupt"] += 1
        self._forget(digest)
        return None

    def _forget(self, digest: str) -> None:
        for name, entry in list(self.services.items()):
            if entry.bundle == digest:
                del self.services[name]
        if self.licence is not None and self.licence.digest == digest:
            self.licence = None
        if self.sync is not None and digest in (self.sync.sealed, self.sync.licences):
            self.sync = None
        with contextlib.suppress(CacheError):
            self._commit()

    # -- writing ---------------------------------------------------------------------

    def store_service(
        self,
        service: str,
        version: int,
        bundle: bytes | None,
        licence: tuple[int, bytes] | None,
        now: float,
    ) -> None:
        """Record a fetch answered by central: the bundle of ``version`` (None:
        central said unchanged) and the licence set (version, bytes) if any.

        Raises CacheError when a write fails; the previous state is then kept.
        """
        saved = (dict(self.services), self.licence, self.sync)
        try:
            digest = self._put(bundle) if bundle is not None else None
            old = self.services.get(service)
            if digest is None and old is not None and old.version == version:
                digest = old.bundle  # central said unchanged: keep the bundle we hold
            self.services[service] = ServiceEntry(version, digest, now)
            if licence is not None:
                self._note_licence(*licence)
            self._commit()
        except CacheError:
            self.services, self.licence, self.sync = saved
            raise

    def store_sync(
        self,
        sealed: bytes,
        licences: tuple[int, bytes] | None,
        now: float,
        unchanged: int = 0,
    ) -> None:
        """Record a sync reply from central.  Raises CacheError like :meth:`store_service`.

        ``licences`` is the set central sent (version, bytes), or None when it
        sent none because the request named the set it lists as held: then
        ``unchanged`` is that version, and the entry keeps the cached set if
        it is that one.
        """
        saved = (dict(self.services), self.licence, self.sync)
        try:
            meta = self._put(sealed)
            lic = None
            if licences is not None:
                lic = self._put(licences[1])
                self._note_licence(*licences)
            elif self.licence is not None and unchanged and self.licence.version == unchanged:
                lic = self.licence.digest
            self.sync = SyncEntry(meta, lic, now)
            self._commit()
        except CacheError:
            self.services, self.licence, self.sync = saved
            raise

    def _note_licence(self, version: int, data: bytes) -> None:
        if self.licence is None or version >= self.licence.version:
            self.licence = LicenceEntry(version, self._put(data))

    def _put(self, data: bytes) -> str:
        if len(data) > MAX_OBJECT_BYTES:
            raise CacheError(f"object of {len(data)} bytes is too large to cache")
        digest = digest_of(data)
        path = self.objects / digest
        if not path.exists():
            try:
                atomic_write(path, data)
            except StorageError as e:
                raise CacheError(e.errno, str(e)) from e
            self.counters["objects_written"] += 1
        return digest

    def _commit(self) -> None:
        doc: dict[str, object] = {
            "format": INDEX_FORMAT,
            "services": {
                name: {"version": e.version, "bundle": e.bundle, "stored_at": e.stored_at}
                for name, e in sorted(self.services.items())
            },
            "licence_set": None
            if self.licence is None
            else {"version": self.licence.version, "object": self.licence.digest},
            "sync": None
            if self.sync is None
            else {
                "sealed": self.sync.sealed,
                "licences": self.sync.licences,
                "stored_at": self.sync.stored_at,
            },
        }
        try:
            atomic_write(self.index_path, json.dumps(doc, sort_keys=True).encode())
        except StorageError as e:
            raise CacheError(e.errno, str(e)) from e
        self.counters["index_writes"] += 1
        self._collect()

    def _collect(self) -> None:
        live = {e.bundle for e in self.services.values() if e.bundle is not None}
        if self.licence is not None:
            live.add(self.licence.digest)
        if self.sync is not None:
            live.add(self.sync.sealed)
            if self.sync.licences is not None:
                live.add(self.sync.licences)
        for path in self.objects.iterdir():
            if _DIGEST_RE.fullmatch(path.name) and path.name not in live:
                with contextlib.suppress(OSError):
                    path.unlink()
                    self.counters["objects_removed"] += 1

    def statistics(self) -> Mapping[str, int]:
        """Return the cache's counters and sizes."""
        stats = dict(self.counters)
        stats["services"] = len(self.services)
        return stats


def _version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise ValueError("version")
    return value


def _time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError("time")
    return float(value)


def _need(value: object) -> str:
    digest = _digest(value, False)
    if digest is None:
        raise ValueError("digest")
    return digest


def _digest(value: object, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise ValueError("digest")
    return value
