"""TinyDB on atomic storage, with one owner process and batched commits.

Theory of operation
-------------------
TinyDB's storage interface is two methods: ``read()`` returns the whole
database as ``{table: {doc_id: document}}`` and ``write(data)`` replaces it.
Every TinyDB operation (insert, update, remove...) is one read, a change in
memory and one write of the whole file.

:class:`AtomicJSONStorage` implements that interface over
:func:`~firmware.common.store.atomic.atomic_write`, so each write is a
temporary file, fsync, rename and directory fsync: a power cut at any instant
leaves the previous or the new file, never a mixture.  It never caches
writes (TinyDB's ``CachingMiddleware`` can lose them); reads go to the file.

* A missing file reads as an empty database (first start).
* A file that is not the JSON TinyDB wrote - truncated, garbage, wrong
  shape, even empty (an atomic writer never produces an empty file) - raises
  :class:`CorruptDatabase`.  It is never treated as empty, because the next
  write would then silently erase everything that was in it.
* A value JSON cannot carry faithfully (a set, bytes, NaN, a lone
  surrogate, a non-string key, a tuple) raises :class:`UnencodableValue`
  before anything is written: what is read back is exactly what was written.

:class:`Store` is the handle a daemon holds: it takes the :class:`OwnerLock`
(one owner process: TinyDB has no process safety), removes temporary files a
crash left behind, and opens TinyDB on the atomic storage.  ``Store.batch()``
groups several operations into one atomic commit: inside the block the
storage keeps the database in memory (as encoded JSON, so what a later read
inside the batch sees is exactly what will be written) and the block's exit
writes it once.  If the block raises, or the commit fails, nothing of the
batch reaches the disk and TinyDB's query caches are dropped so no
uncommitted result is ever served.

Batches do not nest: a nested batch would either commit the inner block's
changes after it failed or abort the outer one behind its back, so it is an
API misuse (:class:`~firmware.common.errors.LocalProtocolError`).  A store is
used from one thread (TinyDB is not thread-safe); document ids consumed by an
aborted batch are not reused.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from firmware.common.errors import LocalProtocolError, StorageError

from .atomic import PRIVATE_MODE, atomic_write
from .lock import OwnerLock

#: Signature of the durable writer; :func:`atomic_write` is the real one.  It
#: is a parameter so a test can inject a failing disk where mounting a tiny
#: file system is not allowed.
Writer = Callable[[Path, bytes, int], None]

#: Suffix of the ownership lock file next to the database.
LOCK_SUFFIX = ".lock"


class CorruptDatabase(StorageError):
    """The database file exists but is not a database this storage wrote."""


class UnencodableValue(StorageError, TypeError):
    """A document holds a value JSON cannot represent; nothing was written."""


def _encode(data: dict[str, dict[str, Any]]) -> bytes:
    try:
        # allow_nan=False: NaN/Infinity are not JSON and would not read back.
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        encoded = text.encode("utf-8")  # a lone surrogate fails here
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise UnencodableValue(f"cannot store value: {e}") from e
    # json quietly turns {1: x} into {"1": x} and tuples into lists: what is
    # read back must be what was written, so such values are refused too.
    if json.loads(text) != data:
        raise UnencodableValue(
            "cannot store value: it would not read back as written"
            " (only str keys, lists, and JSON scalars are stored faithfully)"
        )
    return encoded


def _decode(raw: bytes, origin: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptDatabase(f"{origin} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptDatabase(f"{origin}: top level is not an object")
    for table_name, table in data.items():
        if not isinstance(table, dict):
            raise CorruptDatabase(f"{origin}: table {table_name!r} is not an object")
        for doc_id, doc in table.items():
            if not (doc_id.isdigit() and isinstance(doc, dict)):
                raise CorruptDatabase(f"{origin}: bad document {doc_id!r} in {table_name!r}")
    return data


class AtomicJSONStorage(Storage):
    """TinyDB storage writing the whole database atomically and durably.

    ``path`` is the database file; ``mode`` its permission bits (private by
    default); ``writer`` the durable writer (the real :func:`atomic_write`
    unless a test injects a failing one).  Raises
    :class:`~firmware.common.errors.StorageError` (or its subclasses
    :class:`CorruptDatabase`, :class:`UnencodableValue`) - never returns a
    partial or guessed database.
    """

    def __init__(
        self, path: Path | str, mode: int = PRIVATE_MODE, writer: Writer = atomic_write
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self._writer = writer
        self._pending: bytes | None = None  # encoded database while batching

    # -- TinyDB's interface ---------------------------------------------------

    def read(self) -> dict[str, dict[str, Any]] | None:
        """Return the database, None when the file does not exist yet."""
        if self._pending is not None:
            return _decode(self._pending, self.path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(e.errno, f"cannot read {self.path}: {e.strerror}") from e
        return _decode(raw, self.path)

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        """Replace the database (or the batch buffer while batching)."""
        encoded = _encode(data)
        if self._pending is not None:
            self._pending = encoded
        else:
            self._writer(self.path, encoded, self.mode)

    def close(self) -> None:
        """Nothing to release: no file stays open between operations."""

    # -- batching ---------------------------------------------------------------

    @property
    def batching(self) -> bool:
        """True between :meth:`begin` and :meth:`commit`/:meth:`rollback`."""
        return self._pending is not None

    def begin(self) -> None:
        """Start buffering writes in memory; raises LocalProtocolError if already."""
        if self._pending is not None:
            raise LocalProtocolError("a batch is already open on this storage")
        current = self.read()
        self._pending = _encode(current if current is not None else {})

    def commit(self) -> None:
        """Write the buffered database once; on failure the buffer is dropped.

        Raises StorageError when the write fails; the file then holds the
        state from before :meth:`begin`.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            raise LocalProtocolError("commit without an open batch")
        self._writer(self.path, pending, self.mode)

    def rollback(self) -> None:
        """Drop the buffered changes."""
        self._pending = None


class Store:
    """An owned TinyDB database on :class:`AtomicJSONStorage`.

    Opening takes ``<path>.lock`` (raises
    :class:`~firmware.common.store.lock.StoreLocked` if another process owns
    the database), removes temporary files a crash left beside ``path`` and
    checks that the file is readable (raises :class:`CorruptDatabase`).
    The parent directory must exist.
    """

    def __init__(self, path: Path | str, *, writer: Writer = atomic_write) -> None:
        self.path = Path(path)
        self._lock = OwnerLock(self.path.with_name(self.path.name + LOCK_SUFFIX))
        self._lock.acquire()
        try:
            self._remove_stale_temporaries()
            self._storage = AtomicJSONStorage(self.path, writer=writer)
            self._storage.read()  # fail now, not at the first query
            self._db = TinyDB(storage=lambda: self._storage)
        except BaseException:
            self._lock.release()
            raise
        self._closed = False

    def _remove_stale_temporaries(self) -> None:
        # atomic_write names its temporary ".<name>.<pid>.tmp"; we own the
        # lock, so any such file is debris from a process that died mid-write.
        for debris in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                debris.unlink()

    @property
    def db(self) -> TinyDB:
        """The TinyDB object (default table operations, ``tables()``...)."""
        self._check_open()
        return self._db

    def table(self, name: str) -> Table:
        """The TinyDB table ``name`` (created on first write)."""
        self._check_open()
        return self._db.table(name)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The committed content, as read from the file (for status and tests)."""
        self._check_open()
        data = AtomicJSONStorage(self.path).read()
        return data if data is not None else {}

    @contextlib.contextmanager
    def batch(self) -> Iterator[TinyDB]:
        """Apply every operation inside the block in one atomic write.

        Yields the TinyDB object.  On normal exit the batch is committed
        (StorageError if that fails, with the file unchanged); if the block
        raises, nothing is written.  Either way a failed batch leaves no trace.
        """
        self._check_open()
        self._storage.begin()
        try:
            yield self._db
        except BaseException:
            self._storage.rollback()
            self._drop_caches()
            raise
        try:
            self._storage.commit()
        except BaseException:
            self._drop_caches()
            raise
        self._drop_caches()

    def _drop_caches(self) -> None:
        # Query results computed inside an aborted batch must not be served;
        # clearing after a commit too is cheap and keeps one rule.  TinyDB
        # has no public list of the Table objects it handed out (a table
        # created inside an aborted batch is in no file), hence ``_tables``.
        for table in self._db._tables.values():
            table.clear_cache()

    def close(self) -> None:
        """Release the database and its lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._storage.batching:
            self._storage.rollback()
        self._db.close()
        self._lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError(f"store {self.path} is closed")

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
