"""Central's records and the narrow repository interface they are stored behind.

Theory of operation
-------------------
Everything central knows is a handful of record types (frozen dataclasses
below): customers, gateways with their public keys, published bundle
versions, licences (each with a version that only grows), payments, client
API key hashes, usage batches and their records, sealed objects already made
for a gateway, named counters, and the audit log.

Code above this module sees them only through :class:`Transaction` (the
operations of one unit of work) and :class:`Repository` (how units of work
are opened).  Both are :class:`typing.Protocol` classes with nothing
TinyDB-specific in them: a PostgreSQL backend implements ``transaction()``
as ``BEGIN ... COMMIT`` (SERIALIZABLE) with one table per record type, and
``revision()`` as a counter bumped by a trigger.

:class:`TinyRepository` is the embedded implementation, on the project's
atomic TinyDB storage (:mod:`firmware.common.store.tinystore`):

* ``transaction()`` takes the database's owner lock for the length of the
  transaction only (retrying for up to ``lock_timeout`` if another process
  holds it), so the admin CLI can change the database while ``central run``
  serves gateways.  All writes of a transaction are one atomic file
  replacement on exit; an exception inside the block writes nothing.
* ``snapshot()`` is a read-only view parsed from the committed file without
  the lock (an atomic rename never shows a half-written file).
* ``revision()`` is the file's identity and modification time: the server
  caches what it derives from a snapshot until the revision changes.

Large immutable byte strings (published bundles, sealed objects) live in a
:class:`BlobStore` beside the database, content-addressed by SHA-256 and
written (atomically) *before* the transaction that refers to them, so a
crash can leave an unreferenced blob but never a reference to a missing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from tinydb import Query, TinyDB
from tinydb.storages import MemoryStorage
from tinydb.table import Table

from firmware.common.errors import LocalProtocolError, StorageError
from firmware.common.store.atomic import atomic_write
from firmware.common.store.lock import StoreLocked
from firmware.common.store.tinystore import CorruptDatabase, Store, _decode

#: Database file name inside the state directory.
DB_NAME: Final = "central.json"
#: Blob directory name inside the state directory.
BLOB_DIR: Final = "blobs"
#: How long a transaction waits for another process's transaction to end.
#: A transaction is a read, a change and one atomic write: milliseconds,
#: seconds for a database of many megabytes.  Ten seconds covers both.
DEFAULT_LOCK_TIMEOUT: Final = 10.0
#: Pause between attempts to take a held lock.
_LOCK_RETRY: Final = 0.01

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Customer:
    """A customer of the vendor."""

    customer_id: str
    name: str
    created: int


@dataclass(frozen=True)
class Gateway:
    """A registered gateway: its owner and the public keys from ``gateway.json``.

    Keys are base64 of the raw public key bytes; ``hpke_suite`` names the
    inner HPKE key's suite (``X25519`` or ``MLKEM768_X25519``).
    """

    gateway_id: str
    customer_id: str
    outer_signing: str
    inner_signing: str
    inner_hpke: str
    hpke_suite: str
    registered: int
    revoked: int | None = None


@dataclass(frozen=True)
class BundleVersion:
    """One published version of a service's bundle (``blob`` is its SHA-256 hex)."""

    service: str
    version: int
    blob: str
    size: int
    published: int
    signer: str  # key id of the signature that was verified at publish


@dataclass(frozen=True)
class LicenceRecord:
    """A licence: ``customer_id`` may use ``service`` in [valid_from, valid_until].

    ``gateway_id`` None means every gateway of the customer.  ``version``
    grows with every change; ``revoked`` is the revocation time, if any.
    """

    licence_id: str
    customer_id: str
    service: str
    gateway_id: str | None
    valid_from: int
    valid_until: int
    version: int
    created: int
    revoked: int | None = None


@dataclass(frozen=True)
class Payment:
    """A recorded payment that extended a licence by ``extend_seconds``."""

    payment_id: str
    licence_id: str
    amount_minor: int  # in the currency's minor unit (cents)
    currency: str
    extend_seconds: int
    at: int
    new_valid_until: int


@dataclass(frozen=True)
class ClientKey:
    """A client API key, kept only as its SHA-256 hex hash."""

    key_id: str
    customer_id: str
    key_hash: str
    label: str
    created: int
    revoked: int | None = None


@dataclass(frozen=True)
class UsageBatchRecord:
    """A stored usage batch: stored once per (gateway, batch id); ``ack`` is the sealed ack blob."""

    gateway_id: str
    batch_id: str
    digest: str
    records: int
    received: int
    ack: str


@dataclass(frozen=True)
class UsageRow:
    """One usage record, attributed to the customer owning the gateway.

    The last four fields came with usage format 2; rows stored before have
    their defaults.
    """

    gateway_id: str
    batch_id: str
    customer_id: str
    service: str
    licence_id: str
    credential: str
    at: int
    units: int
    duration_ms: int = 0
    outcome: str = "ok"
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class SealedRef:
    """A sealed object already made for a gateway (``blob`` is its SHA-256 hex)."""

    gateway_id: str
    kind: int
    subject: str
    version: int
    blob: str


@dataclass(frozen=True)
class AuditEntry:
    """One administrative change or refused request; ``seq`` is assigned on append."""

    at: int
    actor: str
    action: str
    target: str
    ok: bool
    detail: str
    seq: int = 0


# ---------------------------------------------------------------------------- interface


class Transaction(Protocol):
    """The operations of one unit of work.  ``get_*`` return None for an unknown id."""

    def get_customer(self, customer_id: str) -> Customer | None: ...
    def list_customers(self) -> list[Customer]: ...
    def add_customer(self, customer: Customer) -> None: ...

    def get_gateway(self, gateway_id: str) -> Gateway | None: ...
    def list_gateways(self) -> list[Gateway]: ...
    def put_gateway(self, gateway: Gateway) -> None: ...

    def list_bundles(self, service: str | None = None) -> list[BundleVersion]: ...
    def add_bundle(self, bundle: BundleVersion) -> None: ...

    def get_licence(self, licence_id: str) -> LicenceRecord | None: ...
    def list_licences(self, customer_id: str | None = None) -> list[LicenceRecord]: ...
    def put_licence(self, licence: LicenceRecord) -> None: ...

    def add_payment(self, payment: Payment) -> None: ...
    def list_payments(self, licence_id: str | None = None) -> list[Payment]: ...

    def add_client_key(self, key: ClientKey) -> None: ...
    def put_client_key(self, key: ClientKey) -> None: ...
    def list_client_keys(self, customer_id: str | None = None) -> list[ClientKey]: ...

    def get_usage_batch(self, gateway_id: str, batch_id: str) -> UsageBatchRecord | None: ...
    def add_usage_batch(self, batch: UsageBatchRecord, rows: list[UsageRow]) -> None: ...
    def list_usage(self, customer_id: str, start: int, end: int) -> list[UsageRow]: ...

    def get_sealed(self, gateway_id: str, kind: int, subject: str, version: int) -> str | None: ...
    def put_sealed(self, ref: SealedRef) -> None: ...

    def get_counter(self, name: str) -> int: ...
    def set_counter(self, name: str, value: int) -> None: ...

    def append_audit(self, entry: AuditEntry) -> AuditEntry: ...
    def list_audit(self, limit: int | None = None) -> list[AuditEntry]: ...


class Repository(Protocol):
    """Where central's records live; see the module docstring."""

    @property
    def blobs(self) -> BlobStore: ...

    def transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        """Open a read-write unit of work: all its writes commit on exit, or none."""
        ...

    def snapshot(self) -> Transaction:
        """Return a read-only view of the committed state (writes raise LocalProtocolError)."""
        ...

    def revision(self) -> object:
        """Return a token that differs whenever committed state has changed."""
        ...

    def next_counter(self, name: str) -> int:
        """Return the next value of counter ``name`` (its own transaction)."""
        ...


# ---------------------------------------------------------------------------- blobs


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class BlobStore:
    """Immutable byte strings by SHA-256 hex, one atomically written file each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, digest: str) -> Path:
        if not _HEX64.fullmatch(digest):
            raise LocalProtocolError(f"not a blob digest: {digest!r}")
        return self.directory / digest[:2] / digest

    def remove_debris(self) -> int:
        """Remove temporaries of writers that died mid-write; return how many went.

        ``atomic_write`` names its temporary ``.<name>.<pid>.tmp``.  Several
        processes write blobs (the server, the operator's commands), so only
        those whose process no longer exists are removed; one whose pid was
        reused meanwhile stays until a later start.
        """
        removed = 0
        for debris in self.directory.glob("??/.*.tmp"):
            try:
                pid = int(debris.name.rsplit(".", 2)[-2])
            except ValueError:
                continue
            if pid <= 0 or _process_exists(pid):
                continue
            with contextlib.suppress(FileNotFoundError):
                debris.unlink()
                removed += 1
        return removed

    def put(self, data: bytes) -> str:
        """Store ``data`` (if not already stored); return its SHA-256 hex.  Raises StorageError."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if path.exists():
            return digest
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StorageError(e.errno, f"cannot create {path.parent}: {e.strerror}") from e
        atomic_write(path, data)
        return digest

    def get(self, digest: str) -> bytes:
        """Return the blob ``digest``.  Raises StorageError if it is missing or damaged."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StorageError(e.errno, f"cannot read blob {digest}: {e.strerror}") from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise StorageError(f"blob {digest} is damaged")
        return data


# ---------------------------------------------------------------------------- TinyDB

_R = TypeVar("_R")

_T_CUSTOMERS: Final = "customers"
_T_GATEWAYS: Final = "gateways"
_T_BUNDLES: Final = "bundles"
_T_LICENCES: Final = "licences"
_T_PAYMENTS: Final = "payments"
_T_CLIENT_KEYS: Final = "client_keys"
_T_USAGE_BATCHES: Final = "usage_batches"
_T_USAGE: Final = "usage"
_T_SEALED: Final = "sealed"
_T_COUNTERS: Final = "counters"
_T_AUDIT: Final = "audit"


def _doc(record: object) -> dict[str, Any]:
    return dataclasses.asdict(record)  # type: ignore[call-overload, no-any-return]


def _rec(cls: type[_R], doc: dict[str, Any]) -> _R:
    try:
        return cls(**doc)
    except TypeError as e:
        raise CorruptDatabase(f"a {cls.__name__} record does not have the expected fields") from e


class _TinyTransaction:
    """:class:`Transaction` over one TinyDB object (on disk in a batch, or in memory)."""

    def __init__(self, db: TinyDB, *, writable: bool) -> None:
        self._db = db
        self._writable = writable

    def _t(self, name: str) -> Table:
        return self._db.table(name)

    def _w(self, name: str) -> Table:
        if not self._writable:
            raise LocalProtocolError("this is a read-only snapshot")
        return self._db.table(name)

    def _one(self, name: str, cls: type[_R], **match: object) -> _R | None:
        q = Query()
        cond = None
        for key, value in match.items():
            c = q[key] == value
            cond = c if cond is None else cond & c
        assert cond is not None
        found = self._t(name).search(cond)
        return _rec(cls, dict(found[0])) if found else None

    def _all(self, name: str, cls: type[_R]) -> list[_R]:
        return [_rec(cls, dict(d)) for d in self._t(name).all()]

    def _upsert(self, name: str, record: object, **match: object) -> None:
        q = Query()
        cond = None
        for key, value in match.items():
            c = q[key] == value
            cond = c if cond is None else cond & c
        assert cond is not None
        self._w(name).upsert(_doc(record), cond)

    # customers
    def get_customer(self, customer_id: str) -> Customer | None:
        return self._one(_T_CUSTOMERS, Customer, customer_id=customer_id)

    def list_customers(self) -> list[Customer]:
        return self._all(_T_CUSTOMERS, Customer)

    def add_customer(self, customer: Customer) -> None:
        self._w(_T_CUSTOMERS).insert(_doc(customer))

    # gateways
    def get_gateway(self, gateway_id: str) -> Gateway | None:
        return self._one(_T_GATEWAYS, Gateway, gateway_id=gateway_id)

    def list_gateways(self) -> list[Gateway]:
        return self._all(_T_GATEWAYS, Gateway)

    def put_gateway(self, gateway: Gateway) -> None:
        self._upsert(_T_GATEWAYS, gateway, gateway_id=gateway.gateway_id)

    # bundles
    def list_bundles(self, service: str | None = None) -> list[BundleVersion]:
        rows = self._all(_T_BUNDLES, BundleVersion)
        if service is not None:
            rows = [b for b in rows if b.service == service]
        return sorted(rows, key=lambda b: (b.service, b.version))

    def add_bundle(self, bundle: BundleVersion) -> None:
        self._w(_T_BUNDLES).insert(_doc(bundle))

    # licences
    def get_licence(self, licence_id: str) -> LicenceRecord | None:
        return self._one(_T_LICENCES, LicenceRecord, licence_id=licence_id)

    def list_licences(self, customer_id: str | None = None) -> list[LicenceRecord]:
        rows = self._all(_T_LICENCES, LicenceRecord)
        if customer_id is not None:
            rows = [r for r in rows if r.customer_id == customer_id]
        return rows

    def put_licence(self, licence: LicenceRecord) -> None:
        self._upsert(_T_LICENCES, licence, licence_id=licence.licence_id)

    # payments
    def add_payment(self, payment: Payment) -> None:
        self._w(_T_PAYMENTS).insert(_doc(payment))

    def list_payments(self, licence_id: str | None = None) -> list[Payment]:
        rows = self._all(_T_PAYMENTS, Payment)
        if licence_id is not None:
            rows = [p for p in rows if p.licence_id == licence_id]
        return rows

    # client keys
    def add_client_key(self, key: ClientKey) -> None:
        self._w(_T_CLIENT_KEYS).insert(_doc(key))

    def put_client_key(self, key: ClientKey) -> None:
        self._upsert(_T_CLIENT_KEYS, key, key_id=key.key_id)

    def list_client_keys(self, customer_id: str | None = None) -> list[ClientKey]:
        rows = self._all(_T_CLIENT_KEYS, ClientKey)
        if customer_id is not None:
            rows = [k for k in rows if k.customer_id == customer_id]
        return rows

    # usage
    def get_usage_batch(self, gateway_id: str, batch_id: str) -> UsageBatchRecord | None:
        return self._one(
            _T_USAGE_BATCHES, UsageBatchRecord, gateway_id=gateway_id, batch_id=batch_id
        )

    def add_usage_batch(self, batch: UsageBatchRecord, rows: list[UsageRow]) -> None:
        self._w(_T_USAGE_BATCHES).insert(_doc(batch))
        if rows:
            self._w(_T_USAGE).insert_multiple([_doc(r) for r in rows])

    def list_usage(self, customer_id: str, start: int, end: int) -> list[UsageRow]:
        q = Query()
        found = self._t(_T_USAGE).search(
            (q.customer_id == customer_id) & (q.at >= start) & (q.at < end)
        )
        return [_rec(UsageRow, dict(d)) for d in found]

    # sealed objects
    def get_sealed(self, gateway_id: str, kind: int, subject: str, version: int) -> str | None:
        ref = self._one(
            _T_SEALED, SealedRef, gateway_id=gateway_id, kind=kind, subject=subject, version=version
        )
        return None if ref is None else ref.blob

    def put_sealed(self, ref: SealedRef) -> None:
        self._upsert(
            _T_SEALED,
            ref,
            gateway_id=ref.gateway_id,
            kind=ref.kind,
            subject=ref.subject,
            version=ref.version,
        )

    # counters
    def get_counter(self, name: str) -> int:
        found = self._t(_T_COUNTERS).search(Query().name == name)
        if not found:
            return 0
        value = found[0].get("value")
        if type(value) is not int:
            raise CorruptDatabase(f"counter {name!r} is not an integer")
        return value

    def set_counter(self, name: str, value: int) -> None:
        self._w(_T_COUNTERS).upsert({"name": name, "value": value}, Query().name == name)

    # audit
    def append_audit(self, entry: AuditEntry) -> AuditEntry:
        seq = self.get_counter("audit") + 1
        self.set_counter("audit", seq)
        stored = dataclasses.replace(entry, seq=seq)
        self._w(_T_AUDIT).insert(_doc(stored))
        return stored

    def list_audit(self, limit: int | None = None) -> list[AuditEntry]:
        rows = sorted(self._all(_T_AUDIT, AuditEntry), key=lambda e: e.seq)
        return rows[-limit:] if limit else rows


class TinyRepository:
    """:class:`Repository` on the atomic TinyDB storage under ``state_dir``.

    The directory must exist (``central init`` makes it).  Raises
    StorageError (StoreLocked after ``lock_timeout``, CorruptDatabase) from
    :meth:`transaction` and :meth:`snapshot`.
    """

    def __init__(self, state_dir: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self._blobs = BlobStore(state_dir / BLOB_DIR)
        self._lock_timeout = lock_timeout

    @property
    def blobs(self) -> BlobStore:
        """The blob store beside the database."""
        return self._blobs

    def _open(self) -> Store:
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                return Store(self.path)
            except StoreLocked:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_LOCK_RETRY)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Yield a read-write unit of work; commit on exit, write nothing if the block raises."""
        store = self._open()
        try:
            with store.batch() as db:
                yield _TinyTransaction(db, writable=True)
        finally:
            store.close()

    def snapshot(self) -> Transaction:
        """Return a read-only in-memory view of the committed file (no lock needed)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            data: dict[str, dict[str, Any]] = {}
        except OSError as e:
            raise StorageError(e.errno, f"cannot read {self.path}: {e.strerror}") from e
        else:
            data = _decode(raw, self.path)
        db = TinyDB(storage=MemoryStorage)
        db.storage.write(data)
        return _TinyTransaction(db, writable=False)

    def revision(self) -> object:
        """The database file's identity, size and modification time (None if absent)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(e.errno, f"cannot stat {self.path}: {e.strerror}") from e
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def next_counter(self, name: str) -> int:
        """Return the next value of counter ``name``, committed in its own transaction."""
        with self.transaction() as tx:
            value = tx.get_counter(name) + 1
            tx.set_counter(name, value)
        return value
