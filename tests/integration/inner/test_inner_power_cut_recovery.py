"""A power cut after any durable step of the journal's boot or of an install, then a boot.

The cut is simulated by raising :class:`PowerCut` (not an error anything
handles) just after the N-th fsync, for N = 1, 2, ... until the operation
completes: what was made durable stays on disk, nothing after it runs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inner_testbed import algo_bundle

from firmware.common.crypto.keys import SigningKey
from firmware.common.store.atomic import fsync_directory
from firmware.inner.metering import UsageEntry, UsageJournal
from firmware.inner.services import ServiceStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEY = SigningKey.generate()
#: The journal's own durable steps: every directory fsync it makes.
JOURNAL_FSYNC = "firmware.inner.metering.fsync_directory"


class PowerCut(BaseException):
    """The supply went at this instant: nothing after it runs."""


def cut_after(n: int, fsync: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``fsync`` that cuts the power just after its ``n``-th call completes."""
    calls = 0

    def synced_then_cut(*args: Any) -> Any:
        nonlocal calls
        result = fsync(*args)
        calls += 1
        if calls == n:
            raise PowerCut
        return result

    return synced_then_cut


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="og-power-cut-"))
    yield d
    shutil.rmtree(d)


def entry(i: int) -> UsageEntry:
    return UsageEntry(1_767_225_600 + i, "acme", "echo", "L-1", "ab" * 32, 1, "ok", 3, 4)


async def test_a_boot_cut_short_never_numbers_a_batch_again(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Central stores a batch id once and refuses it with other records; a
    # journal that numbered a segment again would have its batches refused
    # for ever (and every later one queued behind them).
    directory = tmp / "usage"
    shipped: set[str] = set()

    async def ship_one(i: int) -> None:
        j = UsageJournal(directory, key=KEY, gateway="gw", max_records=100)
        j.open()
        await j.append(entry(i))
        await j.cut()
        ((batch_id, _, path),) = j.pending_batches()
        assert batch_id not in shipped, f"batch id {batch_id} made twice (cut after step {i})"
        shipped.add(batch_id)
        j.acknowledged(path)  # central acked it: the file goes
        await j.aclose()  # the new, empty segment stays, as after any stop

    await ship_one(0)
    for step in itertools.count(1):
        booting = UsageJournal(directory, key=KEY, gateway="gw", max_records=100)
        monkeypatch.setattr(JOURNAL_FSYNC, cut_after(step, fsync_directory))
        try:
            booting.open()
        except PowerCut:
            pass
        else:
            break  # the boot has fewer durable steps than this
        finally:
            monkeypatch.setattr(JOURNAL_FSYNC, fsync_directory)
            await booting.aclose()
        await ship_one(step)
    assert step > 2  # the boot was cut after each of its steps


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("first", [True, False], ids=["first install", "upgrade"])
def test_an_install_cut_short_leaves_a_whole_version_and_nothing_else(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    b1, b2 = algo_bundle("algo", 1), algo_bundle("algo", 2)
    real = os.fsync
    for step in itertools.count(1):
        root = tmp / f"cut-{step}" / "services"
        if not first:
            ServiceStore(root).install(b1, b1.to_bytes(), 1)
        monkeypatch.setattr(os, "fsync", cut_after(step, real))
        try:
            ServiceStore(root).install(b2, b2.to_bytes(), 2)
            done = True
        except PowerCut:
            done = False
        finally:
            monkeypatch.setattr(os, "fsync", real)
        # The next boot: the old version or the new one, whole, and no leftovers.
        found = ServiceStore(root).installed()
        sdir = root / "algo"
        if not found:
            assert first and not done, f"cut after fsync {step}: nothing in force"
            assert not sdir.exists(), f"cut after fsync {step}: left {sorted(tree(sdir))}"
            continue
        (inst,) = found
        expected = b2 if inst.version == 2 else b1
        assert inst.version == 2 or not done
        assert tree(inst.files_dir) == dict(expected.files), f"cut after fsync {step}"
        assert sorted(p.name for p in sdir.iterdir()) == ["current.json", f"v{inst.version}"], (
            f"cut after fsync {step}: leftovers"
        )
        if done:
            break
    assert step > 3  # files, directories, the rename and current.json were each cut after


def test_an_interrupted_remove_is_finished_on_the_next_boot(tmp: Path) -> None:
    root = tmp / "services"
    store = ServiceStore(root)
    b1 = algo_bundle("algo", 1)
    store.install(b1, b1.to_bytes(), 1)
    (root / "algo" / "current.json").unlink()  # remove() cut short after its first step
    assert ServiceStore(root).installed() == []
    assert list(root.iterdir()) == []


def test_an_unreadable_current_json_is_left_for_the_operator(tmp: Path) -> None:
    root = tmp / "services"
    store = ServiceStore(root)
    b1 = algo_bundle("algo", 1)
    store.install(b1, b1.to_bytes(), 1)
    (root / "algo" / "current.json").write_text("{not json")
    assert ServiceStore(root).installed() == []
    assert sorted(p.name for p in (root / "algo").iterdir()) == ["current.json", "v1"]
