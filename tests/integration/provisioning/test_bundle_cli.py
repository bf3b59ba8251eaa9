"""``optogate bundle`` as a vendor runs it: the installed console script, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from firmware.common.crypto.keys import SigningKey
from provisioning.bundle import load_bundle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REFERENCE = Path(__file__).resolve().parents[3] / "provisioning" / "reference"


def _optogate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_build_sign_inspect_verify(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "vendor.key")
    key.public.save(tmp_path / "vendor.pub")
    out = tmp_path / "dxf2svg.ogb"
    built = _optogate(
        "bundle", "build", str(REFERENCE / "dxf2svg"), "--out", str(out),
        "--sign-key", str(tmp_path / "vendor.key"),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    bundle = load_bundle(out.read_bytes())
    assert bundle.hexdigest in built.stdout
    bundle.verify(key.public)

    shown = _optogate(
        "bundle", "inspect", str(out), "--json", "--verify-key", str(tmp_path / "vendor.pub")
    )
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["manifest"]["name"] == "dxf2svg"
    assert doc["files"] == {"dxf2svg.py": len(bundle.files["dxf2svg.py"])}
    assert doc["key_id"] == key.key_id

    other = SigningKey.generate()
    other.public.save(tmp_path / "other.pub")
    refused = _optogate("bundle", "inspect", str(out), "--verify-key", str(tmp_path / "other.pub"))
    assert refused.returncode == 1
    assert "does not verify" in refused.stderr

    damaged = bytearray(out.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "damaged.ogb").write_bytes(bytes(damaged))
    broken = _optogate("bundle", "inspect", str(tmp_path / "damaged.ogb"))
    assert broken.returncode == 1
    assert broken.stderr.startswith("optogate bundle: ")


def test_missing_manifest_and_directory(tmp_path: Path) -> None:
    result = _optogate("bundle", "build", str(tmp_path))
    assert result.returncode == 1
    assert "no manifest.toml" in result.stderr
