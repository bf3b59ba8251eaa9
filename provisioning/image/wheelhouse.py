"""The application for the target: aarch64 wheels, cross-installed with pip's platform options.

``optogate image wheelhouse --python 3.11 --out DIR`` fills a wheelhouse with
every dependency as a binary wheel for ``manylinux*_aarch64`` and the image's
CPython (3.11 on Bookworm, 3.13 on Trixie), downloaded by pip.  The project's
own wheel is not kept there: :func:`install_app` builds it from the checkout
on every build (pure Python, seconds), so an image never carries code older
than the tree it was built from.  The default
location, ``.cache/wheelhouse/cp311-aarch64`` in the checkout, is ignored by
git.  RPi.GPIO is not in it: the OS's own package provides it (the virtual
environment sees the system site-packages).

:func:`install_app` runs ``pip install --target`` with the same platform
options and ``--no-index``, so the build needs no network once the
wheelhouse exists, then reads the installed tree into an
:class:`~provisioning.image.plan.AppTree`.  Console scripts pip would write
into ``bin/`` carry the host's interpreter path and are dropped; the plan
writes the module's own ``optogate`` script.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

from provisioning.image.errors import ImageInputError, ToolFailed
from provisioning.image.plan import AppTree

#: glibc 2.36 (Bookworm) and 2.41 (Trixie) run every manylinux tag up to
#: 2_34; pip does not infer older tags from a newer one, so each is listed.
PLATFORMS: Final = (
    "manylinux2014_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_34_aarch64",
)
#: A pip run downloads ~20 MB; past this it is stuck, not slow.
PIP_TIMEOUT_S: Final = 900.0
#: The checkout the project wheel is built from.
PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]


def default_wheelhouse(python: str) -> Path:
    """Return the cached wheelhouse directory for CPython ``python`` (e.g. "3.11")."""
    return PROJECT_ROOT / ".cache" / "wheelhouse" / f"cp{python.replace('.', '')}-aarch64"


def _platform_args(python: str) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def _pip(args: list[str]) -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
            capture_output=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ToolFailed(f"pip did not finish within {PIP_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise ToolFailed("pip failed: " + " | ".join(tail))


def _project_wheel(dest: Path) -> Path:
    """Build the project's wheel from the checkout into ``dest``; return it. Raise ToolFailed."""
    _pip(["wheel", "--no-deps", "-q", "-w", str(dest), str(PROJECT_ROOT)])
    built = sorted(dest.glob("optogate-*.whl"))
    if not built:
        raise ToolFailed("pip built no optogate wheel")
    return built[-1]


def make_wheelhouse(dest: Path, python: str) -> list[str]:
    """Fill ``dest`` with the project's aarch64 dependencies; return the file names.

    Raises ToolFailed when pip cannot build or download them (no network).
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="optogate-wheel-") as tmp:
        project = _project_wheel(Path(tmp))
        _pip(["download", "-q", "-d", str(dest), *_platform_args(python), str(project)])
    for own in dest.glob("optogate-*.whl"):
        own.unlink()
    return sorted(p.name for p in dest.glob("*.whl"))


def install_app(wheelhouse: Path, python: str) -> AppTree:
    """Return the application installed for CPython ``python`` on aarch64 from ``wheelhouse``.

    Raises ImageInputError when the wheelhouse is missing, ToolFailed when pip
    cannot install from it (a wheel for another Python, a missing dependency).
    """
    if not any(wheelhouse.glob("*.whl")):
        raise ImageInputError(
            f"no wheels in {wheelhouse}: run `optogate image wheelhouse --python {python}`"
        )
    with tempfile.TemporaryDirectory(prefix="optogate-app-") as tmp:
        target = Path(tmp) / "site-packages"
        project = _project_wheel(Path(tmp) / "wheel")
        _pip(
            [
                "install",
                "-q",
                "--no-index",
                "--find-links",
                str(wheelhouse),
                "--target",
                str(target),
                "--no-compile",
                "--no-warn-script-location",
                *_platform_args(python),
                str(project),
            ]
        )
        files: dict[str, tuple[bytes, int]] = {}
        for root, dirnames, filenames in os.walk(target):
            rel_root = Path(root).relative_to(target)
            if rel_root == Path("."):
                dirnames[:] = [d for d in dirnames if d != "bin"]
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = Path(root) / name
                mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
                files[(rel_root / name).as_posix()] = (path.read_bytes(), mode)
    return AppTree(python, files)
