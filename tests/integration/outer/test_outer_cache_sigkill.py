"""The outer module's cache of sealed objects under SIGKILL, killed mid-write.

A child process records, in a tight loop, what the relay records after each
answer from central: a fetched service (its bundle and licence set) or a
sync reply.  It prints a line only once the call returned.  The test kills
it with SIGKILL at a random moment and opens the cache as a restarted outer
module would: the index must parse, every object it names must be there
with the right content, nothing acknowledged may be missing, and a
crash's temporary files and orphaned objects must go.

The kill schedule comes from a seeded generator; a failing run names its
seed, and ``OPTOGATE_CRASH_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from crash_sweep import crash_seed, killed_writer, replaying

from firmware.outer.cache import SealedCache, digest_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 8
#: The kill lands this long after the writer's first acknowledgement.
KILL_WINDOW_S = (0.0, 0.4)
SERVICES = ("dxf2svg", "doc-encrypt", "echo")
#: Operations per round are numbered from ``round * STRIDE`` so that versions grow.
STRIDE = 1_000_000

# argv: cache directory, first operation number.  Objects vary in size (a
# torn one could not pass its digest check); ``stored_at`` is the operation
# number, so the test can tell which operation an entry came from.
WRITER = r"""
import os, sys
from firmware.outer.cache import SealedCache, digest_of

cache = SealedCache(sys.argv[1])
cache.load()
i = int(sys.argv[2])
services = ("dxf2svg", "doc-encrypt", "echo")
print("ready", flush=True)
while True:
    i += 1
    blob = os.urandom(200 + (i * 7919) % 60000)
    lic = os.urandom(100 + i % 500)
    if i % 3:
        name = services[i % len(services)]
        cache.store_service(name, i, blob, (i, lic), float(i))
        print("service", name, i, digest_of(blob), flush=True)
    else:
        cache.store_sync(blob, (i, lic), float(i))
        print("sync", i, digest_of(blob), flush=True)
"""


@pytest.mark.timeout(120)
def test_cache_killed_mid_write_keeps_a_whole_index_and_every_acknowledged_object(
    tmp_path: Path,
) -> None:
    seed = crash_seed()
    why = f"crash seed {seed} (replay: OPTOGATE_CRASH_SEED={seed})"
    rng = random.Random(seed)
    directory = tmp_path / "cache"
    acked_service: dict[str, int] = {}
    acked_sync = 0
    acked_any = 0
    kinds: set[str] = set()
    for rnd in range(ROUNDS):
        first = rnd * STRIDE
        lines = killed_writer(
            [WRITER, *(str(a) for a in (directory, first))],
            tmp_path / "acks.log",
            rng.uniform(*KILL_WINDOW_S),
            why,
        )
        for line in lines:
            kind, *rest = line.split()
            kinds.add(kind)
            if kind == "service":
                acked_service[rest[0]] = int(rest[1])
                acked_any = int(rest[1])
            else:
                acked_sync = acked_any = int(rest[0])
        # The one operation that may have committed without being acknowledged.
        in_flight = (acked_any if acked_any > first else first) + 1
        with replaying(why):
            _check(directory, acked_service, acked_sync, in_flight, why)
    assert kinds == {"service", "sync"}, why


def _check(
    directory: Path, acked_service: dict[str, int], acked_sync: int, in_flight: int, why: str
) -> None:
    cache = SealedCache(directory)
    cache.load()
    assert cache.counters["index_invalid"] == 0, why
    assert not list(directory.glob(".*.tmp")), why
    assert not list((directory / "objects").glob(".*.tmp")), why
    # Nothing acknowledged is lost, and nothing newer than the operation in flight appears.
    for name, version in acked_service.items():
        entry = cache.services.get(name)
        assert entry is not None, why
        assert entry.version in (version, in_flight), why
    if acked_sync:
        assert cache.sync is not None, why
        assert int(cache.sync.stored_at) in (acked_sync, in_flight), why
    # Every object the index names is whole.
    named = [e.bundle for e in cache.services.values() if e.bundle is not None]
    if cache.licence is not None:
        named.append(cache.licence.digest)
    if cache.sync is not None:
        named.append(cache.sync.sealed)
        if cache.sync.licences is not None:
            named.append(cache.sync.licences)
    for digest in named:
        data = cache.read(digest)
        assert data is not None and digest_of(data) == digest, why
    assert cache.counters["corrupt"] == 0, why
    # The next commit (here one that changes nothing: central said "unchanged")
    # sweeps any object the kill orphaned - written, never indexed.
    if cache.services:
        name, entry = next(iter(cache.services.items()))
        cache.store_service(name, entry.version, None, None, entry.stored_at)
        assert cache.services[name] == entry, why
        on_disk = {p.name for p in (directory / "objects").iterdir()}
        assert on_disk == set(named), why
