"""The service store on disk: atomic installs, versions replaced, damaged files ignored."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from inner_testbed import algo_bundle

from firmware.inner.services import ServiceStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="og-store-"))
    yield d / "services"
    shutil.rmtree(d)


def test_install_replace_remove(root: Path) -> None:
    store = ServiceStore(root)
    assert store.installed() == []
    b1 = algo_bundle("algo", 1)
    inst = store.install(b1, b1.to_bytes(), 1)
    assert (inst.files_dir / "algo.py").read_bytes() == b1.files["algo.py"]
    b2 = algo_bundle("algo", 2)
    store.install(b2, b2.to_bytes(), 2)
    (only,) = store.installed()
    assert (only.name, only.version) == ("algo", 2)
    assert sorted(p.name for p in (root / "algo").iterdir()) == ["current.json", "v2"]
    store.remove("algo")
    assert store.installed() == []
    assert not (root / "algo").exists()


def test_damaged_or_half_installed_versions_are_not_loaded(root: Path) -> None:
    store = ServiceStore(root)
    b1 = algo_bundle("algo", 1)
    store.install(b1, b1.to_bytes(), 1)
    b2 = algo_bundle("other", 1)
    store.install(b2, b2.to_bytes(), 1)
    # a crash before current.json names a new version: the old one stays in force
    (root / "algo" / ".v2.tmp").mkdir()
    # a bundle file damaged on the SD card: the service is fetched again
    bundle_file = root / "other" / "v1" / "bundle.cbor"
    data = bytearray(bundle_file.read_bytes())
    data[-5] ^= 1
    bundle_file.write_bytes(bytes(data))
    assert [(i.name, i.version) for i in store.installed()] == [("algo", 1)]
    # a current.json that does not name a version
    (root / "algo" / "current.json").write_text(json.dumps({"version": "x"}))
    assert store.installed() == []
    # installing again over the leftovers works
    store.install(b1, b1.to_bytes(), 1)
    assert [(i.name, i.version) for i in store.installed()] == [("algo", 1)]
