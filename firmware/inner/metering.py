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
   commit), so the cost per call falls as load rises.
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
import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
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
    body = json.dumps(
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
        separators=(",", ":"),
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
        self._pending: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
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
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._commit_loop(), name="usage")

    async def aclose(self) -> None:
        """Commit what is pending, stop the commit task, close the segment (idempotent)."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ appending

    async def append(self, entry: UsageEntry) -> None:
        """Return once ``entry`` is durably journaled.  Raises StorageError, MeteringError."""
        if self._closed or self._wake is None:
            raise MeteringError("the usage journal is closed")
        if self.failed is not None:
            # After a failed fdatasync the kernel may have dropped the dirty
            # pages: nothing written since can be trusted until a restart
            # re-reads the segment (and cuts any torn tail).
            raise self.failed
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(encode_entry(entry), fut))
        self._wake.set()
        await fut

    async def flush(self) -> None:
        """Return once everything appended so far is durable."""
        if self._idle is None or self._wake is None:
            return
        while self._pending or not self._idle.is_set():
            self._wake.set()
            await asyncio.sleep(0.001)

    async def _commit_loop(self) -> None:
        assert self._wake is not None
        assert self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            group, self._pending = self._pending, []
            self._idle.clear()
            data = b"".join(p.data for p in group)
            fd = self._fd
            try:
                assert fd is not None
                await loop.run_in_executor(None, self._write_sync, fd, data)
            except OSError as e:
                err = StorageError(getattr(e, "errno", None) or 5, f"usage journal: {e}")
                self.failed = err
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(err)
            else:
                self._segment_entries += len(group)
                self.stats["appended"] += len(group)
                self.stats["commits"] += 1
                for p in group:
                    if not p.future.done():
                        p.future.set_result(None)
            finally:
                self._idle.set()

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
        await self.flush()
        if self._segment_entries == 0 or self._fd is None:
            return
        old, fd = self._segment, self._fd
        self._segment += 1
        self._open_segment()
        os.close(fd)
        self._batch_segment(old)

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
