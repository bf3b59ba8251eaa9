"""The usage journal on real files: recovery after a crash, torn tails, idempotent batching."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.common.crypto.keys import SigningKey
from firmware.common.errors import StorageError
from firmware.common.uplink import verify_usage_batch
from firmware.inner.metering import UsageEntry, UsageJournal, encode_entry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

KEY = SigningKey.generate()


def entry(i: int) -> UsageEntry:
    return UsageEntry(1_767_225_600 + i, "acme", "echo", "L-1", "ab" * 32, 1, "ok", 3, 4)


@pytest.fixture
def directory() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="og-journal-"))
    yield d / "usage"
    shutil.rmtree(d)


def journal(d: Path, **kw: object) -> UsageJournal:
    return UsageJournal(d, key=KEY, gateway="gw", max_records=kw.pop("max_records", 100), **kw)  # type: ignore[arg-type]


def tear_last_segment(directory: Path) -> Path:
    """Append a torn entry to the (only) segment, as a power cut mid-append leaves it."""
    seg = next(directory.glob("seg-*.log"))
    with seg.open("ab") as f:
        f.write(encode_entry(entry(99))[:-3])
    return seg


async def test_append_cut_ack(directory: Path) -> None:
    j = journal(directory, max_records=3)
    j.open()
    await asyncio.gather(*(j.append(entry(i)) for i in range(7)))
    assert j.stats["appended"] == 7
    assert j.stats["commits"] < 7  # concurrent appends shared fdatasyncs
    await j.cut()
    pending = j.pending_batches()
    assert [len(verify_usage_batch(b, KEY.public).records) for _, b, _ in pending] == [3, 3, 1]
    j.acknowledged(pending[0][2])
    assert len(j.pending_batches()) == 2
    await j.cut()  # nothing new: no empty batch
    assert len(j.pending_batches()) == 2
    await j.aclose()


async def test_appends_go_on_while_a_cut_batches_the_old_segment(directory: Path) -> None:
    # Batching a long segment (decode, sign, write) must not hold up the calls
    # whose records go into the new one: it runs on another thread.
    j = journal(directory, max_records=2)
    j.open()
    for i in range(4):
        await j.append(entry(i))
    batching = threading.Event()
    release = threading.Event()
    real = j._batch_segment

    def slow_batch(n: int) -> None:
        batching.set()
        assert release.wait(10)
        real(n)

    j._batch_segment = slow_batch  # type: ignore[method-assign]
    cut = asyncio.ensure_future(j.cut())
    assert await asyncio.to_thread(batching.wait, 10)
    await asyncio.wait_for(j.append(entry(4)), 5)  # durable while the cut is still batching
    assert not cut.done()
    release.set()
    await cut
    assert [len(verify_usage_batch(b, KEY.public).records) for _, b, _ in j.pending_batches()] == [
        2,
        2,
    ]
    await j.cut()  # the record appended during the cut is in the next segment
    assert len(j.pending_batches()) == 3
    await j.aclose()


async def test_restart_batches_a_leftover_segment_with_a_torn_tail(directory: Path) -> None:
    j = journal(directory)
    j.open()
    for i in range(4):
        await j.append(entry(i))
    ids_before = j.pending_batches()
    await j.aclose()  # like a crash: the segment stays, not batched
    seg = tear_last_segment(directory)
    again = journal(directory)
    again.open()
    ((batch_id, blob, _),) = again.pending_batches()
    assert ids_before == []
    records = verify_usage_batch(blob, KEY.public).records
    assert [r.at for r in records] == [1_767_225_600 + i for i in range(4)]
    assert again.stats["torn_tails"] == 1
    assert not seg.exists()
    await again.aclose()
    # the install id, hence every batch id, survives restarts
    third = journal(directory)
    third.open()
    assert third.pending_batches()[0][0] == batch_id
    await third.aclose()


async def test_no_append_returns_before_an_fdatasync_covering_its_entry(directory: Path) -> None:
    # Group commit: entries appended while an fdatasync runs wait for the next
    # one, which they share; none is answered before its bytes are synced.
    entered, gate = threading.Event(), threading.Event()
    synced: list[int] = []  # file size each fdatasync covered

    def slow_fsync(fd: int) -> None:
        entered.set()
        assert gate.wait(10)
        os.fdatasync(fd)
        synced.append(os.fstat(fd).st_size)

    j = journal(directory, fsync=slow_fsync)
    j.open()
    first = asyncio.ensure_future(j.append(entry(0)))
    assert await asyncio.to_thread(entered.wait, 10)  # entry 0 is being synced
    later = [asyncio.ensure_future(j.append(entry(i))) for i in range(1, 6)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not first.done()
    assert not any(t.done() for t in later)
    gate.set()
    await first
    assert synced == [len(encode_entry(entry(0)))]
    await asyncio.gather(*later)
    size = sum(len(encode_entry(entry(i))) for i in range(6))
    assert synced == [len(encode_entry(entry(0))), size]  # the five shared one fdatasync
    assert j.stats == {**j.stats, "appended": 6, "commits": 2}
    await j.aclose()


async def test_a_cancelled_append_still_lands_and_cut_waits_for_it(directory: Path) -> None:
    j = journal(directory)
    j.open()
    gone = asyncio.ensure_future(j.append(entry(0)))
    await asyncio.sleep(0)
    gone.cancel()
    await j.append(entry(1))
    await j.cut()
    ((_, blob, _),) = j.pending_batches()
    assert len(verify_usage_batch(blob, KEY.public).records) == 2
    await j.aclose()


async def test_a_failing_disk_fails_the_append(directory: Path) -> None:
    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    j = journal(directory, fsync=broken)
    j.open()
    with pytest.raises(StorageError):
        await j.append(entry(0))
    assert j.failed is not None
    with pytest.raises(StorageError):  # nothing more is trusted until a restart
        await j.append(entry(1))
    await j.aclose()


async def test_an_unexpected_error_in_the_commit_thread_fails_the_append(
    directory: Path,
) -> None:
    def odd(fd: int) -> None:
        raise RuntimeError("not an OSError")

    j = journal(directory, fsync=odd)
    j.open()
    with pytest.raises(StorageError):
        await j.append(entry(0))
    with pytest.raises(StorageError):
        await j.append(entry(1))
    await j.aclose()


async def test_closed_journal_refuses(directory: Path) -> None:
    j = journal(directory)
    j.open()
    await j.aclose()
    await j.aclose()
    from firmware.inner.metering import MeteringError

    with pytest.raises(MeteringError):
        await j.append(entry(0))
