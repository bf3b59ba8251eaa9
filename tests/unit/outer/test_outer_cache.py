"""The relay's sealed-object cache: the fetch plan, atomic storage, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmware.outer.cache import (
    FetchPlan,
    LicenceEntry,
    SealedCache,
    ServiceEntry,
    digest_of,
    plan_fetch,
)
from firmware.outer.errors import CacheError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(5)]

DAY = 86400.0
LIC = LicenceEntry(7, "a" * 64)


def entry(version: int = 3, bundle: str | None = "b" * 64, at: float = 1000.0) -> ServiceEntry:
    return ServiceEntry(version, bundle, at)


@pytest.mark.parametrize(
    ("cached", "have", "now", "expected"),
    [
        (None, None, 0.0, FetchPlan(answer=False, ask_have_version=None)),
        (None, 2, 0.0, FetchPlan(answer=False, ask_have_version=2)),
        (entry(), None, 1000.0, FetchPlan(answer=True, send_bundle=True)),
        (entry(), 2, 1000.0, FetchPlan(answer=True, send_bundle=True)),
        (entry(), 3, 1000.0, FetchPlan(answer=True, send_bundle=False)),
        # the inner module holds something newer than the cache: ask central
        (entry(), 4, 1000.0, FetchPlan(answer=False, ask_have_version=4)),
        # stale: refresh, naming the cached version so central may say "unchanged"
        (entry(), None, 1000.0 + DAY + 1, FetchPlan(answer=False, ask_have_version=3)),
        # a clock that went back makes the entry stale, never fresh forever
        (entry(), None, 999.0, FetchPlan(answer=False, ask_have_version=3)),
        # only "unchanged for version 3" known: answers a holder of 3 only
        (entry(bundle=None), 3, 1000.0, FetchPlan(answer=True, send_bundle=False)),
        (entry(bundle=None), None, 1000.0, FetchPlan(answer=False, ask_have_version=None)),
    ],
)
def test_plan_fetch(
    cached: ServiceEntry | None, have: int | None, now: float, expected: FetchPlan
) -> None:
    assert plan_fetch(cached, LIC, have, now, DAY) == expected


def test_plan_fetch_without_a_licence_set_asks_central() -> None:
    assert not plan_fetch(entry(), None, None, 1000.0, DAY).answer


def test_store_and_reload(tmp_path: Path) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_service("dxf", 3, b"bundle", (7, b"licences"), 1000.0)
    cache.store_sync(b"meta", (8, b"licences v8"), 1001.0)
    again = SealedCache(tmp_path)
    again.load()
    got = again.services["dxf"]
    assert got == ServiceEntry(3, digest_of(b"bundle"), 1000.0)
    assert again.licence == LicenceEntry(8, digest_of(b"licences v8"))
    assert again.sync is not None and again.read(again.sync.sealed) == b"meta"
    assert again.read(digest_of(b"bundle")) == b"bundle"
    # the superseded licence set is collected
    assert not (tmp_path / "objects" / digest_of(b"licences")).exists()


def test_older_licence_set_never_replaces_a_newer_one(tmp_path: Path) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_service("dxf", 3, b"bundle", (9, b"new"), 1.0)
    cache.store_service("dxf", 3, None, (8, b"old"), 2.0)
    assert cache.licence == LicenceEntry(9, digest_of(b"new"))


def test_unchanged_reply_keeps_the_bundle_held(tmp_path: Path) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_service("dxf", 3, b"bundle", (7, b"lic"), 1.0)
    cache.store_service("dxf", 3, None, (7, b"lic"), 2.0)
    assert cache.services["dxf"] == ServiceEntry(3, digest_of(b"bundle"), 2.0)


def test_corrupt_object_is_dropped_and_counted(tmp_path: Path) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_service("dxf", 3, b"bundle", (7, b"lic"), 1.0)
    path = tmp_path / "objects" / digest_of(b"bundle")
    path.write_bytes(b"bundlE")
    assert cache.read(digest_of(b"bundle")) is None
    assert cache.counters["corrupt"] == 1
    assert "dxf" not in cache.services
    reloaded = SealedCache(tmp_path)
    reloaded.load()
    assert "dxf" not in reloaded.services
    assert reloaded.licence is not None  # the rest of the cache is intact


@pytest.mark.parametrize(
    "text",
    [
        b"not json",
        b"[]",
        json.dumps({"format": 2, "services": {}, "licence_set": None, "sync": None}).encode(),
        json.dumps(
            {
                "format": 1,
                "services": {"dxf": {"version": -1, "bundle": None, "stored_at": 0}},
                "licence_set": None,
                "sync": None,
            }
        ).encode(),
        json.dumps(
            {
                "format": 1,
                "services": {"dxf": {"version": 1, "bundle": "../../etc", "stored_at": 0}},
                "licence_set": None,
                "sync": None,
            }
        ).encode(),
        json.dumps({"format": 1, "services": {}, "licence_set": None}).encode(),
    ],
)
def test_bad_index_means_an_empty_cache(tmp_path: Path, text: bytes) -> None:
    (tmp_path / "index.json").write_bytes(text)
    cache = SealedCache(tmp_path)
    cache.load()
    assert cache.services == {} and cache.licence is None and cache.sync is None
    assert cache.counters["index_invalid"] == 1


def test_failed_object_write_keeps_the_previous_state(tmp_path: Path) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_service("dxf", 3, b"bundle", (7, b"lic"), 1.0)
    cache.objects = tmp_path / "not-a-directory"  # every object write fails, as on a full disk
    cache.objects.write_bytes(b"")
    with pytest.raises(CacheError):
        cache.store_service("dxf", 4, b"bundle v4", (8, b"lic v8"), 2.0)
    assert cache.services["dxf"].version == 3
    assert cache.licence == LicenceEntry(7, digest_of(b"lic"))


def test_failed_index_write_keeps_the_previous_state(tmp_path: Path) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_service("dxf", 3, b"bundle", (7, b"lic"), 1.0)
    # a directory where the index file goes: the rename over it fails, as on a broken disk
    cache.index_path = tmp_path / "blocked"
    cache.index_path.mkdir()
    (cache.index_path / "x").write_bytes(b"")
    with pytest.raises(CacheError):
        cache.store_service("dxf", 4, b"bundle v4", (8, b"lic v8"), 2.0)
    assert cache.services["dxf"].version == 3
    reloaded = SealedCache(tmp_path)
    reloaded.load()
    assert reloaded.services["dxf"].version == 3
    assert reloaded.read(digest_of(b"bundle")) == b"bundle"


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir(parents=True)
    (tmp_path / ".index.json.123.tmp").write_bytes(b"half")
    (tmp_path / "objects" / ".x.123.tmp").write_bytes(b"half")
    SealedCache(tmp_path).load()
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_sync_without_the_set_keeps_the_cached_set_only_if_it_is_the_one_named(
    tmp_path: Path,
) -> None:
    cache = SealedCache(tmp_path)
    cache.load()
    cache.store_sync(b"meta 1", (8, b"licences v8"), 1.0)
    # central sent no set: the request named v8 as held, so the sync lists v8
    cache.store_sync(b"meta 2", None, 2.0, 8)
    assert cache.sync is not None and cache.sync.licences == digest_of(b"licences v8")
    # named a set the cache does not hold: the entry cannot answer with a set
    cache.store_sync(b"meta 3", None, 3.0, 7)
    assert cache.sync is not None and cache.sync.licences is None
    again = SealedCache(tmp_path)
    again.load()
    assert again.sync == cache.sync
    assert again.licence == LicenceEntry(8, digest_of(b"licences v8"))  # still cached
