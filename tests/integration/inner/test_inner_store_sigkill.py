"""The inner module's stores under SIGKILL: usage journal, service store, trusted time, versions.

A child process does, in a tight loop, the writes the inner daemon does: it
journals a usage entry before a call is answered, cuts the journal into
signed batches, ships a batch (central stores it, then the file goes),
installs a service version, persists the trusted-time mark and the version
registry.  It prints a line for each only once the call returned.  The
test kills it with SIGKILL at a random moment and opens everything as a
restarted daemon would:

* the journal opens (turning leftover segments into batches); every batch
  it still holds is byte for byte what central got under that id, if
  central got one; at the end every acknowledged usage entry has reached
  central exactly once;
* the service in force is complete and no older than the last install
  acknowledged;
* the trusted-time mark and the version registry load, and never go back.

The kill schedule comes from a seeded generator; a failing run names its
seed, and ``OPTOGATE_CRASH_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest
from crash_sweep import crash_seed, killed_writer, replaying

from firmware.common.crypto.freshness import load_registry
from firmware.common.crypto.keys import SigningKey
from firmware.common.uplink import verify_usage_batch
from firmware.inner.metering import UsageJournal
from firmware.inner.services import ServiceStore
from firmware.inner.trusted_time import TrustedTimeStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 8
#: The kill lands this long after the writer's first acknowledgement.
KILL_WINDOW_S = (0.0, 0.5)
#: Operations of each round are numbered from ``round * STRIDE``: they grow.
STRIDE = 1_000_000
GATEWAY = "gw1"
MAX_RECORDS = 4
OBJECT = "bundle/echo"

# argv: state directory, first operation number.  A usage entry's "at" is
# its operation number, so the test can follow each entry to central.
WRITER = r"""
import asyncio, sys
from pathlib import Path
from central_stub.testing import ECHO_DIR
from firmware.common.crypto.freshness import VersionRegistry, save_registry
from firmware.common.crypto.keys import SigningKey
from firmware.inner.metering import UsageEntry, UsageJournal
from firmware.inner.services import ServiceStore
from firmware.inner.trusted_time import TimeState, TrustedTimeStore
from provisioning.bundle import build_bundle

state, i = Path(sys.argv[1]), int(sys.argv[2])
key = SigningKey.load(state / "signing.key")
bundle = build_bundle(ECHO_DIR, key)
raw = bundle.to_bytes()
services = ServiceStore(state / "services")
clock = TrustedTimeStore(state / "time.json")

async def main():
    global i
    journal = UsageJournal(state / "usage", key=key, gateway="gw1", max_records=4)
    journal.open()
    print("ready", flush=True)
    while True:
        i += 1
        step = i % 8
        if step in (0, 1, 2):
            await journal.append(UsageEntry(i, "acme", "echo", "L-1", "00" * 32, 1, "ok", 1, 1))
            print("usage", i, flush=True)
        elif step == 3:
            await journal.cut()
            print("cut", flush=True)
        elif step == 4:
            for batch_id, data, path in journal.pending_batches()[:1]:
                print("central", batch_id, data.hex(), flush=True)
                journal.acknowledged(path)
                print("acked", batch_id, flush=True)
        elif step == 5:
            services.install(bundle, raw, i)
            print("install", i, flush=True)
        elif step == 6:
            clock.save(TimeState(high_water=i, boot_id="b", anchor_time=i, anchor_mono=1.0))
            print("time", i, flush=True)
        else:
            save_registry(state / "versions.json", VersionRegistry({"bundle/echo": (i, None)}))
            print("registry", i, flush=True)

asyncio.run(main())
"""


class Central:
    """What central stored: batch id -> bytes; a batch id is stored once."""

    def __init__(self, key: SigningKey, why: str) -> None:
        self.key = key
        self.why = why
        self.batches: dict[str, bytes] = {}

    def store(self, batch_id: str, data: bytes) -> None:
        known = self.batches.setdefault(batch_id, data)
        # Central refuses other bytes under a stored id (usage_conflict):
        # whatever such a batch carried would never be billed.
        assert known == data, f"batch {batch_id} sent again with other content; {self.why}"

    def entries(self) -> Counter[int]:
        """How many times each usage entry (by its "at") reached central."""
        seen: Counter[int] = Counter()
        for data in self.batches.values():
            for record in verify_usage_batch(data, self.key.public).records:
                seen[record.at] += 1
        return seen


@pytest.mark.timeout(120)
def test_inner_stores_killed_mid_write_keep_what_was_acknowledged(tmp_path: Path) -> None:
    seed = crash_seed()
    why = f"crash seed {seed} (replay: OPTOGATE_CRASH_SEED={seed})"
    rng = random.Random(seed)
    state = tmp_path / "inner"
    state.mkdir()
    key = SigningKey.generate()
    key.save(state / "signing.key")
    central = Central(key, why)
    usage: set[int] = set()
    acked: dict[str, int] = {}
    kinds: set[str] = set()
    for rnd in range(ROUNDS):
        first = rnd * STRIDE
        lines = killed_writer(
            [WRITER, *(str(a) for a in (state, first))],
            tmp_path / "acks.log",
            rng.uniform(*KILL_WINDOW_S),
            why,
        )
        last = first
        for line in lines:
            kind, *rest = line.split()
            kinds.add(kind)
            if kind == "usage":
                usage.add(int(rest[0]))
            elif kind == "central":
                central.store(rest[0], bytes.fromhex(rest[1]))
            elif kind in ("install", "time", "registry"):
                acked[kind] = int(rest[0])
            if rest and rest[0].isdigit():
                last = int(rest[0])
        # The write in flight may have committed without its acknowledgement;
        # it is at most a few operations after the last one printed.
        in_flight = range(last + 1, last + 8)
        with replaying(why):
            _check_round(state, acked, in_flight, why)
            asyncio.run(_ship_leftovers(state, key, central, ship=False))
    assert kinds >= {"usage", "cut", "central", "acked", "install", "time", "registry"}, why
    with replaying(why):
        asyncio.run(_ship_leftovers(state, key, central, ship=True))
        seen = central.entries()
        # Every acknowledged entry reached central exactly once; no entry twice.
        assert all(seen[at] == 1 for at in usage), (
            sorted(at for at in usage if seen[at] != 1),
            why,
        )
        assert max(seen.values()) == 1, why


def _check_round(state: Path, acked: dict[str, int], in_flight: range, why: str) -> None:
    found = ServiceStore(state / "services").installed()  # complete: each digest re-checked
    assert len(found) <= 1, why
    if "install" in acked:
        (installed,) = found
        assert installed.version == acked["install"] or installed.version in in_flight, why
    loaded = TrustedTimeStore(state / "time.json").load()
    if "time" in acked:
        assert loaded is not None, why
        assert loaded.high_water == acked["time"] or loaded.high_water in in_flight, why
    registry = load_registry(state / "versions.json")
    if "registry" in acked:
        version = registry.highest(OBJECT)
        assert version == acked["registry"] or version in in_flight, why


async def _ship_leftovers(state: Path, key: SigningKey, central: Central, *, ship: bool) -> None:
    """Open the journal as a restarted daemon does; check (and, if ``ship``, send) its batches."""
    journal = UsageJournal(state / "usage", key=key, gateway=GATEWAY, max_records=MAX_RECORDS)
    journal.open()
    try:
        for batch_id, data, path in journal.pending_batches():
            known = central.batches.get(batch_id)
            assert known is None or known == data, f"batch {batch_id} changed; {central.why}"
            if ship:
                central.store(batch_id, data)
                journal.acknowledged(path)
        if ship:
            await journal.cut()
            for batch_id, data, path in journal.pending_batches():
                central.store(batch_id, data)
                journal.acknowledged(path)
            assert journal.pending_batches() == []
    finally:
        await journal.aclose()
