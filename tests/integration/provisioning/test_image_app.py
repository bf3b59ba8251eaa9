"""The application installed into an image from a real aarch64 wheelhouse.

The wheelhouse is the cached one (``optogate image wheelhouse --python 3.11``,
kept under the checkout's ignored ``.cache/``).  When it is not cached yet,
the test makes it, which needs the package index; without one the test is
skipped and says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pi_image_factory import BOOKWORM, TRIXIE, make_image
from test_image_build import layout, root_file, root_listing, sh

from provisioning.image.errors import ToolFailed
from provisioning.image.wheelhouse import PROJECT_ROOT, default_wheelhouse, make_wheelhouse
from provisioning.image_cli import main as image_main
from provisioning.keys_cli import main as keys_main

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

#: ELF e_machine of AArch64: the wheels must be for the Pi, not for this host.
EM_AARCH64 = 183


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    cache = default_wheelhouse("3.11")
    if not any(cache.glob("*.whl")):
        try:
            make_wheelhouse(cache, "3.11")
        except ToolFailed as e:
            pytest.skip(f"no cached aarch64 wheelhouse and it cannot be downloaded: {e}")
    return cache


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app")
    assert keys_main(["init-central", str(root / "c")], "k") == 0
    assert (
        keys_main(
            [
                "gateway",
                "gw-app",
                "--out",
                str(root / "gw"),
                "--central-pub",
                str(root / "c" / "central.pub"),
            ],
            "k",
        )
        == 0
    )
    return root / "gw"


def test_application_installed_for_aarch64(wheelhouse: Path, gateway: Path, tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.img", BOOKWORM, work=tmp_path / "w")
    out = tmp_path / "inner.img"
    args = [
        "build",
        "--base",
        str(base),
        "--role",
        "inner",
        "--gateway",
        str(gateway),
        "--out",
        str(out),
        "--wheelhouse",
        str(wheelhouse),
        "--grow",
    ]
    assert image_main(args, "optogate image") == 0
    site = "/opt/optogate/.venv/lib/python3.11/site-packages"
    assert (
        root_file(out, f"{site}/host_tools/cli.py")
        == (PROJECT_ROOT / "host_tools" / "cli.py").read_bytes()
    )
    assert (
        root_file(out, f"{site}/firmware/inner/config.py")
        == (PROJECT_ROOT / "firmware" / "inner" / "config.py").read_bytes()
    )
    rust = [
        n for n in root_listing(out, f"{site}/cryptography/hazmat/bindings") if n.endswith(".so")
    ]
    assert rust, "cryptography's compiled module is missing"
    elf = root_file(out, f"{site}/cryptography/hazmat/bindings/{rust[0]}")
    assert elf[:4] == b"\x7fELF"
    assert int.from_bytes(elf[18:20], "little") == EM_AARCH64
    assert "RPi" not in root_listing(out, site)  # the OS's package provides it
    venv = root_listing(out, "/opt/optogate/.venv/bin")
    assert venv["python3"][0] == 0o120777
    assert venv["optogate"][0] == 0o100755
    assert b"include-system-site-packages = true" in root_file(
        out, "/opt/optogate/.venv/pyvenv.cfg"
    )
    fsck = sh("e2fsck", "-fn", f"{out}?offset={layout(out)['root']}")
    assert fsck.returncode == 0, fsck.stdout


def test_wheelhouse_for_another_python_refused(
    wheelhouse: Path, gateway: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_image(tmp_path / "trixie.img", TRIXIE, work=tmp_path / "w")
    out = tmp_path / "inner.img"
    args = [
        "build",
        "--base",
        str(base),
        "--role",
        "inner",
        "--gateway",
        str(gateway),
        "--out",
        str(out),
        "--wheelhouse",
        str(wheelhouse),
        "--grow",
    ]
    assert image_main(args, "optogate image") == 1
    assert "pip failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trixie.img", "w"]
