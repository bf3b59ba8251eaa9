"""The TinyDB repository: atomic transactions, read-only snapshots, revisions, blobs, the lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from central_stub.repository import (
    AuditEntry,
    BlobStore,
    Customer,
    Gateway,
    TinyRepository,
)
from firmware.common.errors import LocalProtocolError, StorageError
from firmware.common.store.lock import OwnerLock, StoreLocked

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.fixture
def repo(tmp_path: Path) -> TinyRepository:
    return TinyRepository(tmp_path, lock_timeout=0.3)


def _gateway(name: str) -> Gateway:
    return Gateway(name, "acme", "o", "i", "h", "X25519", 1)


def test_a_failed_transaction_writes_nothing(repo: TinyRepository) -> None:
    with repo.transaction() as tx:
        tx.add_customer(Customer("acme", "ACME", 1))
    before = repo.path.read_bytes()

    def half_done() -> None:
        with repo.transaction() as tx:
            tx.add_customer(Customer("beta", "Beta", 2))
            tx.put_gateway(_gateway("gw1"))
            raise RuntimeError("operator error halfway")

    with pytest.raises(RuntimeError):
        half_done()
    assert repo.path.read_bytes() == before
    assert [c.customer_id for c in repo.snapshot().list_customers()] == ["acme"]


def test_snapshot_is_read_only_and_revision_tracks_commits(repo: TinyRepository) -> None:
    assert repo.revision() is None
    with repo.transaction() as tx:
        tx.put_gateway(_gateway("gw1"))
    first = repo.revision()
    snap = repo.snapshot()
    with pytest.raises(LocalProtocolError):
        snap.put_gateway(_gateway("gw2"))
    with repo.transaction() as tx:
        tx.put_gateway(_gateway("gw2"))
    assert repo.revision() != first
    assert snap.get_gateway("gw2") is None  # a snapshot does not move
    assert repo.snapshot().get_gateway("gw2") is not None


def test_upsert_counters_and_audit_sequence(repo: TinyRepository) -> None:
    with repo.transaction() as tx:
        tx.put_gateway(_gateway("gw1"))
        tx.put_gateway(Gateway("gw1", "acme", "o", "i", "h", "X25519", 1, revoked=5))
        first = tx.append_audit(AuditEntry(1, "a", "x", "t", True, ""))
        second = tx.append_audit(AuditEntry(2, "a", "y", "t", False, "no"))
    assert (first.seq, second.seq) == (1, 2)
    snap = repo.snapshot()
    assert len(snap.list_gateways()) == 1
    gw = snap.get_gateway("gw1")
    assert gw is not None
    assert gw.revoked == 5
    assert [e.action for e in snap.list_audit(1)] == ["y"]
    assert repo.next_counter("n") == 1
    assert repo.next_counter("n") == 2


def test_a_held_lock_times_out_with_a_typed_error(repo: TinyRepository, tmp_path: Path) -> None:
    with OwnerLock(tmp_path / "central.json.lock"), pytest.raises(StoreLocked):
        repo.next_counter("n")
    assert repo.next_counter("n") == 1  # free again


def test_a_corrupt_database_is_refused_not_reset(repo: TinyRepository) -> None:
    repo.path.write_text("{truncated")
    with pytest.raises(StorageError):
        repo.snapshot()
    with pytest.raises(StorageError), repo.transaction():
        pass
    assert repo.path.read_text() == "{truncated"


def test_blobs_are_content_addressed_and_checked(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put(b"sealed bytes")
    assert blobs.put(b"sealed bytes") == digest
    assert blobs.get(digest) == b"sealed bytes"
    (tmp_path / "blobs" / digest[:2] / digest).write_bytes(b"tampered")
    with pytest.raises(StorageError, match="damaged"):
        blobs.get(digest)
    with pytest.raises(StorageError):
        blobs.get("0" * 64)
    with pytest.raises(LocalProtocolError):
        blobs.get("../etc/passwd")


def test_debris_of_dead_writers_is_removed_and_a_live_writers_kept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put(b"kept")
    shard = tmp_path / "blobs" / digest[:2]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    stale = shard / f".{'0' * 64}.{dead_pid}.tmp"
    live = shard / f".{'1' * 64}.{os.getpid()}.tmp"
    odd = shard / ".something.else.tmp"
    for path in (stale, live, odd):
        path.write_bytes(b"half a blob")
    assert blobs.remove_debris() == 1
    assert not stale.exists()
    assert live.exists() and odd.exists()
    assert blobs.get(digest) == b"kept"
