"""Metering: one durable usage record per call, shipped to central exactly once.

Theory of operation
-------------------
Every call that passed the licence check leaves a :class:`UsageEntry`
(customer, service, licence, credential hash, trusted time, duration,
outcome, bytes in and out).  Its life has three durable stages, each a file
under ``state_dir/usage/``:

1. **Journal segment** ``seg-<n>.log``: the entry is appended (length,
   CRC-32, compact JSON) and the file fdatasync'ed *before* the caller gets
   its answer.  Appends from concurrent calls are grouped: while one
   fdatasync runs, the next entries queue up and share the next one (group
   commit), so the cost per call falls as load rises.  The writes and
   fdatasyncs run in one commit thread of the journal's own, which under
   load goes from one group to the next without sleeping: an entry costs
   the event loop a list append, and each group one callback back.
2. **Batch** ``batch-<n>-<k>.cbor``: :meth:`UsageJournal.cut` closes the
   current segment and turns it into signed batches (the uplink format of
   :mod:`firmware.common.uplink`, signed by the inner module's Ed25519 key),
   each written atomically, *then* deletes the segment.  A batch's id is
   ``<install id>-<n>-<k>`` and its ``created`` is the latest record's time,
   so rebuilding a batch after a crash between the two steps gives the
   *same bytes*: nothing is lost and nothing is counted twice.
3. **Acknowledged**: the batch is sent (``USAGE_REPORT``) until central's
   signed ack (a sealed object of kind ``USAGE_ACK`` naming this batch id and
   the SHA-256 of exactly these bytes) comes back; only then is the file
   deleted.  Resending the same batch id is how a lost ack is healed:
   central stores a batch id once.

A torn tail (a power cut mid-append) fails its CRC and is cut off when the
segment is read; such an entry's call had not been answered yet.

The pure parts - the entry codec, segment decoding, batching, ack checking -
are functions here; :class:`UsageJournal` is the thin adapter that owns the
files and the commit task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from firmware.common.crypto.keys import RecipientKey, SigningKey, VerifyKey
from firmware.common.crypto.sealed import Kind, open_sealed
from firmware.common.errors import CryptoError, OptogateError, StorageError
from firmware.common.store.atomic import atomic_write, fsync_directory
from firmware.common.uplink import (
    InvalidUsageBatch,
    UsageRecord,
    decode_usage_ack,
    sign_usage_batch,
)

#: Length + CRC-32 of every journal entry.
_ENTRY_HEAD: Final = struct.Struct(">II")
# Built once: json.dumps with an option builds an encoder on every call.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))
#: An entry is ~250 bytes of JSON; anything claiming more is garbage.
MAX_ENTRY_BYTES: Final = 64 * 1024
#: A batch id is ``<16 hex>-<n>-<k>``: well inside the wire's 128 bytes.
INSTALL_ID_FILE: Final = "install-id"
_SEGMENT_RE: Final = re.compile(r"seg-(\d{12})\.log")
_BATCH_RE: Final = re.compile(r"batch-(\d{12})-(\d{6})\.cbor")


class MeteringError(OptogateError):
    """Usage could not be recorded or shipped."""


class InvalidAck(MeteringError):
    """A usage ack did not open, or names another batch or other bytes."""


@dataclass(frozen=True)
class UsageEntry:
    """One metered call, as journaled locally."""

    at: int  # trusted time, Unix seconds
    customer: str
    service: str
    licence: str
    credential: str  # SHA-256 hex of the API key, never the key
    duration_ms: int
    outcome: str  # "ok", "invalid_params", "algorithm_crashed", ...
    bytes_in: int
    bytes_out: int

    def to_record(self) -> UsageRecord:
        """Return the uplink record: one billable unit for a call that succeeded."""
        return UsageRecord(
            at=self.at,
            service=self.service,
            licence=self.licence,
            credential=self.credential,
            units=1 if self.outcome == "ok" else 0,
            duration_ms=self.duration_ms,
            outcome=self.outcome,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )


def encode_entry(entry: UsageEntry) -> bytes:
    """Return the journal bytes of ``entry`` (head + compact JSON)."""
    body = _COMPACT.encode(
        {
            "at": entry.at,
            "bytes_in": entry.bytes_in,
            "bytes_out": entry.bytes_out,
            "credential": entry.credential,
            "customer": entry.customer,
            "duration_ms": entry.duration_ms,
            "licence": entry.licence,
            "outcome": entry.outcome,
            "service": entry.service,
        },
    ).encode()
    return _ENTRY_HEAD.pack(len(body), zlib.crc32(body)) + body


def decode_segment(data: bytes) -> tuple[list[UsageEntry], int]:
    """Return the entries of a segment and the length of its valid prefix.

    Decoding stops at the first entry that is truncated, fails its CRC or
    does not parse: what follows a torn write is never trusted.  Never raises.
    """
    entries: list[UsageEntry] = []
    pos = 0
    fields = set(UsageEntry.__dataclass_fields__)
    while pos + _ENTRY_HEAD.size <= len(data):
        length, crc = _ENTRY_HEAD.unpack_from(data, pos)
        start = pos + _ENTRY_HEAD.size
        body = data[start : start + length]
        if length > MAX_ENTRY_BYTES or len(body) != length or zlib.crc32(body) != crc:
            break
        try:
            raw = json.loads(body)
            if not isinstance(raw, dict) or set(raw) != fields:
                break
            entry = UsageEntry(**raw)
        except (ValueError, TypeError):
            break
        entries.append(entry)
        pos = start + length
    return entries, pos


def make_batches(
    entries: list[UsageEntry],
    *,
    key: SigningKey,
    gateway: str,
    install_id: str,
    segment: int,
    max_records: int,
) -> list[tuple[str, bytes]]:
    """Return ``[(batch_id, signed batch bytes)]`` for one segment's entries (deterministic)."""
    out = []
    for k, start in enumerate(range(0, len(entries), max_records)):
        chunk = entries[start : start + max_records]
        batch_id = f"{install_id}-{segment}-{k}"
        data = sign_usage_batch(
            key,
            gateway=gateway,
            batch_id=batch_id,
            created=max(e.at for e in chunk),
            records=[e.to_record() for e in chunk],
        )
        out.append((batch_id, data))
    return out


def check_ack(
    sealed_ack: bytes,
    *,
    batch_id: str,
    batch: bytes,
    gateway: str,
    recipient: RecipientKey,
    central: VerifyKey,
    now: int,
) -> None:
    """Return None if ``sealed_ack`` is central's ack of exactly ``batch``.

    Raises InvalidAck otherwise (unsigned, forged, expired, another batch or other bytes).
    """
    if not sealed_ack:
        raise InvalidAck("the usage ack is not signed")
    try:
        opened = open_sealed(
            sealed_ack,
            recipient,
            central,
            now=now,
            expected_kind=Kind.USAGE_ACK,
            expected_subject=gateway,
        )
        ack = decode_usage_ack(opened.payload)
    except (CryptoError, InvalidUsageBatch) as e:
        raise InvalidAck(f"usage ack does not open: {e}") from e
    if ack.gateway != gateway or ack.batch_id != batch_id:
        raise InvalidAck("usage ack names another batch")
    if ack.sha256 != hashlib.sha256(batch).digest():
        raise InvalidAck("usage ack is for other bytes under this batch id")


@dataclass
class _Pending:
    data: bytes
    future: asyncio.Future[None]


#: Name of the journal's commit thread.
COMMIT_THREAD: Final = "usage-commit"


class UsageJournal:
    """The durable usage queue under ``directory`` (see the module docstring).

    Use from one event loop.  :meth:`open` before anything else; :meth:`aclose`
    at the end.
    """

    def __init__(
        self,
        directory: Path,
        *,
        key: SigningKey,
        gateway: str,
        max_records: int,
        fsync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self._dir = directory
        self._key = key
        self._gateway = gateway
        self._max_records = max_records
        self._fsync = fsync
        self._fd: int | None = None
        self._segment = 0
        self._segment_entries = 0
        # Shared with the commit thread, under _cond: entries waiting for it,
        # whether it is busy, whether it must stop.
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Event loop side: entries handed to the thread, and settled by it.
        self._handed = 0
        self._settled = 0
        self._wake_soon = False
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._install_id = ""
        self._closed = False
        self.failed: StorageError | None = None
        self.stats = {"appended": 0, "commits": 0, "batches_made": 0, "torn_tails": 0}

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the directory, recover leftovers, start a new segment.

        Earlier segments (a crash or restart) are turned into batches at
        once.  Raises StorageError.
        """
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        id_file = self._dir / INSTALL_ID_FILE
        try:
            self._install_id = id_file.read_text().strip()
        except FileNotFoundError:
            self._install_id = ""
        if not re.fullmatch(r"[0-9a-f]{16}", self._install_id):
            self._install_id = secrets.token_hex(8)
            atomic_write(id_file, self._install_id.encode())
        segments = self._segments()
        batches = [n for n, _ in self._batches()]
        self._segment = max([*segments, *batches, 0]) + 1
        # The new segment exists on disk before the old ones are batched and
        # deleted: at every instant the highest number ever used is on disk,
        # so an open cut short by a power cut never numbers a segment again
        # (a reused batch id with other records is refused by central).
        self._open_segment()
        try:
            for n in segments:
                self._batch_segment(n)
        except BaseException:
            self._close_fd()
            raise
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._commit_forever, name=COMMIT_THREAD, daemon=True
        )
        self._thread.start()

    async def aclose(self) -> None:
        """Commit what is pending, stop the commit thread, close the segment (idempotent)."""
        if self._closed:
            return
        await self._quiesce()
        self._closed = True
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join()  # idle: it returns at once
            self._thread = None
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ appending

    def append(self, entry: UsageEntry) -> asyncio.Future[None]:
        """Hand ``entry`` to the commit thread; return a future done once it is durable.

        Raises StorageError or MeteringError at once when nothing can be
        journaled; the future fails with StorageError if the write does.
        A future rather than a coroutine: awaiting it directly spares the
        caller a level of coroutines on every call.
        """
        if self._closed or self._loop is None:
            raise MeteringError("the usage journal is closed")
        if self.failed is not None:
            # After a failed fdatasync the kernel may have dropped the dirty
            # pages: nothing written since can be trusted until a restart
            # re-reads the segment (and cuts any torn tail).
            raise self.failed
        fut: asyncio.Future[None] = self._loop.create_future()
        pending = _Pending(encode_entry(entry), fut)
        with self._cond:
            self._pending.append(pending)
        self._handed += 1
        if not self._wake_soon:
            # One wake-up of the commit thread per turn of the event loop, for
            # all the entries appended in it: waking a thread is the costly part.
            self._wake_soon = True
            self._loop.call_soon(self._wake)
        return fut

    def _wake(self) -> None:
        self._wake_soon = False
        with self._cond:
            if self._pending and not self._busy:
                self._cond.notify()

    async def flush(self) -> None:
        """Return once everything appended so far is durable (or has failed)."""
        target = self._handed
        if self._settled >= target or self._loop is None:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._flushes.append((target, fut))
        await fut

    async def _quiesce(self) -> None:
        # Entries may be appended while a flush waits: return only at an
        # instant when the commit thread holds nothing (no await follows in
        # the caller before it touches the segment's descriptor).
        while self._settled < self._handed:
            await self.flush()

    def _commit_forever(self) -> None:
        """The commit thread: write and fdatasync each group of waiting entries.

        While one fdatasync runs, the entries appended meanwhile wait and
        share the next one (group commit).  Under load the thread never
        sleeps between groups, so handing it an entry costs the event loop a
        list append under a lock (and a wake-up per turn of the loop when the
        thread sleeps), and the answer comes back as one callback per group.
        After a failure it writes nothing more; every later group fails with
        the same error.
        """
        assert self._loop is not None
        error: OSError | None = None
        while True:
            with self._cond:
                self._busy = False
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                group, self._pending = self._pending, []
                self._busy = True
                fd = self._fd
            if error is None:
                try:
                    if fd is None:
                        raise OSError(9, "the usage journal has no open segment")
                    self._write_sync(fd, b"".join(p.data for p in group))
                except OSError as e:
                    error = e
                except Exception as e:  # the thread must live on to answer every entry
                    error = OSError(5, f"{type(e).__name__}: {e}")
            try:
                self._loop.call_soon_threadsafe(self._committed, group, error)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                return

    def _committed(self, group: list[_Pending], error: OSError | None) -> None:
        """Event loop side of a commit: settle its entries, then the flushes it completes."""
        if error is not None:
            if self.failed is None:
                errno = getattr(error, "errno", None) or 5
                self.failed = StorageError(errno, f"usage journal: {error}")
            for p in group:
                if not p.future.done():
                    p.future.set_exception(self.failed)
        else:
            self._segment_entries += len(group)
            self.stats["appended"] += len(group)
            self.stats["commits"] += 1
            for p in group:
                if not p.future.done():
                    p.future.set_result(None)
        self._settled += len(group)
        if self._flushes:
            waiting = []
            for target, fut in self._flushes:
                if target <= self._settled:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    waiting.append((target, fut))
            self._flushes = waiting

    def _write_sync(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self._fsync(fd)

    # ------------------------------------------------------------------ batches

    def _segments(self) -> list[int]:
        return sorted(
            int(m.group(1)) for p in self._dir.iterdir() if (m := _SEGMENT_RE.fullmatch(p.name))
        )

    def _batches(self) -> list[tuple[int, int]]:
        return sorted(
            (int(m.group(1)), int(m.group(2)))
            for p in self._dir.iterdir()
            if (m := _BATCH_RE.fullmatch(p.name))
        )

    def _segment_path(self, n: int) -> Path:
        return self._dir / f"seg-{n:012d}.log"

    def _batch_path(self, n: int, k: int) -> Path:
        return self._dir / f"batch-{n:012d}-{k:06d}.cbor"

    def _open_segment(self) -> None:
        path = self._segment_path(self._segment)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fsync_directory(self._dir)
        except OSError as e:
            raise StorageError(e.errno, f"cannot open {path}: {e}") from e
        self._segment_entries = 0

    def _batch_segment(self, n: int) -> None:
        """Turn closed segment ``n`` into batch files, then delete it (crash-safe, idempotent)."""
        path = self._segment_path(n)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        entries, valid = decode_segment(data)
        if valid != len(data):
            self.stats["torn_tails"] += 1
        batches = make_batches(
            entries,
            key=self._key,
            gateway=self._gateway,
            install_id=self._install_id,
            segment=n,
            max_records=self._max_records,
        )
        for k, (_, blob) in enumerate(batches):
            atomic_write(self._batch_path(n, k), blob)
        self.stats["batches_made"] += len(batches)
        try:
            path.unlink()
            fsync_directory(self._dir)
        except OSError as e:
            raise StorageError(e.errno, f"cannot remove {path}: {e}") from e

    async def cut(self) -> None:
        """Close the current segment (if it holds entries) and turn it into batches.

        Raises StorageError.
        """
        await self._quiesce()
        if self._segment_entries == 0 or self._fd is None:
            return
        old, fd = self._segment, self._fd
        self._segment += 1
        with self._cond:  # the commit thread is idle; it reads _fd under the lock
            self._open_segment()
        os.close(fd)
        # Off the event loop: a minute of calls at full speed is hundreds of
        # thousands of entries to decode, sign and write, which would stall
        # every call meanwhile.  Appends go on into the new segment.
        await asyncio.to_thread(self._batch_segment, old)

    def pending_batches(self) -> list[tuple[str, bytes, Path]]:
        """Return every batch awaiting central's ack, oldest first: (id, bytes, file)."""
        out = []
        for n, k in self._batches():
            path = self._batch_path(n, k)
            try:
                out.append((f"{self._install_id}-{n}-{k}", path.read_bytes(), path))
            except FileNotFoundError:
                continue
        return out

    def acknowledged(self, path: Path) -> None:
        """Delete an acknowledged batch file.  Raises StorageError."""
        try:
            path.unlink(missing_ok=True)
            fsync_directory(self._dir)
        except OSError as e:
            raise StorageError(e.errno, f"cannot remove {path}: {e}") from e

    def queued(self) -> dict[str, int]:
        """Return what waits: entries in the open segment and batch files."""
        return {"entries": self._segment_entries, "batches": len(self._batches())}
