"""AtomicJSONStorage and Store: reads, corruption, batches, failing disks, locking."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinydb import Query

from firmware.common.errors import LocalProtocolError, StorageError
from firmware.common.store.atomic import atomic_write
from firmware.common.store.lock import OwnerLock, StoreLocked
from firmware.common.store.tinystore import (
    AtomicJSONStorage,
    CorruptDatabase,
    Store,
    UnencodableValue,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class FullDisk:
    """A writer that behaves like ``atomic_write`` on a disk with ``room`` bytes.

    It really writes (through ``atomic_write``) while the data fits, and fails
    with ENOSPC - leaving the target untouched, as the real one does - once it
    does not.  It does not model a disk that fills part-way through a write,
    the old file's space counting against the new one, or fsync failures;
    the tmpfs test in tests/integration/store covers a really full disk.
    """

    def __init__(self, room: int) -> None:
        self.room = room
        self.failures = 0

    def __call__(self, path: Path, data: bytes, mode: int) -> None:
        if len(data) > self.room:
            self.failures += 1
            raise StorageError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        atomic_write(path, data, mode)


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    storage = AtomicJSONStorage(tmp_path / "db.json")
    assert storage.read() is None
    with Store(tmp_path / "db.json") as store:
        assert store.db.all() == []
        assert store.snapshot() == {}
    assert not (tmp_path / "db.json").exists()  # reading created nothing


def test_insert_persists_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    with Store(path) as store:
        store.table("licences").insert({"service": "dxf", "version": 3})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"licences": {"1": {"service": "dxf", "version": 3}}}
    with Store(path) as store:
        assert store.table("licences").all() == [{"service": "dxf", "version": 3}]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"t": {"1": {"a": 1}}',
        b"\xff\xfe",
        b"[]",
        b'{"t": []}',
        b'{"t": {"x": {}}}',
        b'{"t": {"1": 5}}',
    ],
)
def test_corrupt_file_is_a_typed_error_and_is_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "db.json"
    path.write_bytes(content)
    with pytest.raises(CorruptDatabase):
        AtomicJSONStorage(path).read()
    with pytest.raises(CorruptDatabase):
        Store(path)
    assert path.read_bytes() == content  # never silently emptied
    # The failed open released its lock.
    with OwnerLock(tmp_path / "db.json.lock"):
        pass


def test_unencodable_value_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    with Store(path) as store:
        store.db.insert({"a": 1})
        before = path.read_bytes()
        for bad in (
            {"s": {1, 2}},
            {"b": b"x"},
            {"n": float("nan")},
            {"u": "\ud800"},
            {"k": {1: "int key"}},
            {"t": (1, 2)},
        ):
            with pytest.raises(UnencodableValue):
                store.db.insert(bad)
            assert isinstance(UnencodableValue(), TypeError)
        assert path.read_bytes() == before
        assert store.db.all() == [{"a": 1}]


def test_batch_commits_once(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    writes: list[bytes] = []

    def counting(p: Path, data: bytes, mode: int) -> None:
        writes.append(data)
        atomic_write(p, data, mode)

    with Store(path, writer=counting) as store:
        with store.batch() as db:
            db.table("a").insert({"n": 1})
            db.table("b").insert({"n": 1})
            db.table("a").update({"n": 2})
            # Reads inside the batch see the batch's changes.
            assert db.table("a").all() == [{"n": 2}]
            assert store.snapshot() == {}  # nothing on disk yet
        assert len(writes) == 1
        assert store.snapshot() == {"a": {"1": {"n": 2}}, "b": {"1": {"n": 1}}}


def test_batch_aborted_by_exception_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    with Store(path) as store:
        store.table("a").insert({"n": 0})
        before = path.read_bytes()

        def change_then_fail() -> None:
            with store.batch() as db:
                db.table("a").update({"n": 1})
                db.table("new").insert({"x": 1})
                # Fill the query caches with uncommitted results.
                assert db.table("a").search(Query().n == 1) == [{"n": 1}]
                assert db.table("new").search(Query().x == 1) == [{"x": 1}]
                raise RuntimeError("caller changed its mind")

        with pytest.raises(RuntimeError):
            change_then_fail()
        assert path.read_bytes() == before
        assert store.table("a").search(Query().n == 1) == []
        assert store.table("new").search(Query().x == 1) == []
        assert store.db.tables() == {"a"}


def test_nested_batch_is_api_misuse(tmp_path: Path) -> None:
    with Store(tmp_path / "db.json") as store:

        def nest() -> None:
            with store.batch() as db:
                db.insert({"a": 1})
                with store.batch():
                    pass

        with pytest.raises(LocalProtocolError):
            nest()
        assert store.snapshot() == {}
        # The store is usable afterwards.
        with store.batch() as db:
            db.insert({"a": 2})
        assert store.db.all() == [{"a": 2}]


def test_full_disk_keeps_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    disk = FullDisk(room=200)
    with Store(path, writer=disk) as store:
        store.db.insert({"k": "small"})
        before = path.read_bytes()
        with pytest.raises(StorageError) as info:
            store.db.insert({"k": "x" * 500})
        assert info.value.errno == errno.ENOSPC

        def replace_all() -> None:
            with store.batch() as db:
                db.insert({"k": "y" * 300})
                db.truncate()
                db.insert({"k": "z" * 300})

        with pytest.raises(StorageError):
            replace_all()
        assert disk.failures == 2
        assert path.read_bytes() == before
        assert store.db.all() == [{"k": "small"}]
        # Room again: the store carries on.
        disk.room = 10_000
        store.db.insert({"k": "later"})
    with Store(path) as store:
        assert [d["k"] for d in store.db.all()] == ["small", "later"]


def test_closed_store_refuses_use_and_releases_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.json")
    store.close()
    store.close()
    with pytest.raises(LocalProtocolError):
        store.table("a")
    with Store(tmp_path / "db.json"):
        pass


def test_second_owner_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "db.json") as store:
        store.db.insert({"a": 1})
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            Store(tmp_path / "db.json")
        assert store.db.all() == [{"a": 1}]


def test_stale_temporaries_are_removed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    debris = tmp_path / ".db.json.4242.tmp"
    debris.write_bytes(b'{"half')
    unrelated = tmp_path / ".other.json.4242.tmp"
    unrelated.write_bytes(b"keep")
    with Store(path):
        pass
    assert not debris.exists()
    assert unrelated.exists()


# -- model-based: a sequence of operations against a dict model ------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
TABLES = st.sampled_from(["t1", "t2"])
VALUES = st.integers(-5, 5) | st.text(max_size=3)
OPS = st.one_of(
    st.tuples(st.just("put"), TABLES, KEYS, VALUES),
    st.tuples(st.just("delete"), TABLES, KEYS),
    st.tuples(st.just("drop"), TABLES),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("fail_next")),
    st.tuples(
        st.just("batch"),
        st.lists(st.tuples(TABLES, KEYS, VALUES), max_size=4),
        st.booleans(),
    ),
)

Model = dict[str, dict[str, object]]


def _apply_put(db_table: object, key: str, value: object) -> None:
    from tinydb.table import Table

    assert isinstance(db_table, Table)
    db_table.upsert({"key": key, "value": value}, Query().key == key)


def _view(store: Store) -> Model:
    out: Model = {}
    for name in store.db.tables():
        rows = {d["key"]: d["value"] for d in store.table(name).all()}
        if rows:
            out[name] = rows
    return out


def _clean(model: Model) -> Model:
    return {t: dict(rows) for t, rows in model.items() if rows}


@settings(max_examples=60)
@given(ops=st.lists(OPS, max_size=25))
def test_operations_match_a_dict_model(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    path = tmp_path_factory.mktemp("model") / "db.json"
    disk = FullDisk(room=1 << 20)
    model: Model = {}
    store = Store(path, writer=disk)
    try:
        for op in ops:
            kind = op[0]
            if kind == "fail_next":
                disk.room = 0
                continue
            failing = disk.room == 0
            try:
                if kind == "put":
                    _, table, key, value = op
                    _apply_put(store.table(table), key, value)
                    if not failing:
                        model.setdefault(table, {})[key] = value
                elif kind == "delete":
                    _, table, key = op
                    removed = store.table(table).remove(Query().key == key)
                    if removed and not failing:
                        model[table].pop(key)
                elif kind == "drop":
                    store.db.drop_table(op[1])
                    if not failing:
                        model.pop(op[1], None)
                elif kind == "reopen":
                    store.close()
                    store = Store(path, writer=disk)
                elif kind == "batch":
                    _, puts, abort = op
                    staged = {t: dict(rows) for t, rows in model.items()}
                    try:
                        with store.batch() as db:
                            for table, key, value in puts:
                                _apply_put(db.table(table), key, value)
                                staged.setdefault(table, {})[key] = value
                            if abort:
                                raise KeyboardInterrupt
                    except KeyboardInterrupt:
                        pass
                    else:
                        if not failing:
                            model = staged
            except StorageError:
                assert failing
            disk.room = 1 << 20
            assert _view(store) == _clean(model)
    finally:
        store.close()
    with Store(path) as reopened:
        assert _view(reopened) == _clean(model)
