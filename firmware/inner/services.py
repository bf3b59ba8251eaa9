"""The service store: built services on disk, and the loaded ones in memory.

On disk, under ``state_dir/services/<name>/``::

    v<version>/bundle.cbor     the opened bundle, exactly as central sealed it
    v<version>/files/...       its files, where the runtime imports them from
    current.json               {"version": N}: the version in force

:meth:`ServiceStore.install` writes a version into a temporary directory,
fsyncs every file, renames the directory into place, fsyncs the parent and
only then replaces ``current.json`` atomically: a power cut at any instant
leaves the old version in force or the new one complete, never a half
installed one.  Older version directories are removed after the switch.
On start :meth:`ServiceStore.installed` re-parses each ``bundle.cbor``
(``provisioning.bundle.load_bundle`` checks its digest), so a damaged file
is dropped and fetched again rather than run.  It first clears what an
interrupted install or removal left: temporary directories and files,
version directories not in force, and a service directory with no
``current.json`` at all (nothing in it was ever in force), so the leftovers
of a power cut do not pile up on the SD card.

In memory a :class:`LoadedService` is one version with its warm runtime and
its compiled parameter schema.  Calls hold a reference while they run
(``with svc as runtime:`` around the call); a newer version
replaces the entry in the table at once, and the old runtime is closed when
its last call has left, so a swap never fails a call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jsonschema
import jsonschema.validators

from firmware.common.errors import StorageError
from firmware.common.store.atomic import atomic_write, fsync_directory
from firmware.inner.runtimes.base import Runtime
from provisioning.bundle import Bundle, BundleError, Manifest, load_bundle, params_schema

CURRENT_FILE: Final = "current.json"
BUNDLE_FILE: Final = "bundle.cbor"
FILES_DIR: Final = "files"


@dataclass(frozen=True)
class Installed:
    """A version on disk: its bundle (manifest and files) and where its files are."""

    name: str
    version: int
    bundle: Bundle
    files_dir: Path


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class ServiceStore:
    """Built services under ``root`` (one directory per service)."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _dir(self, name: str) -> Path:
        return self._root / name

    def installed(self) -> list[Installed]:
        """Return every service in force on disk; damaged ones are skipped (never raises).

        Call it only while no install runs (the daemon's start): it clears the
        leftovers of interrupted installs (see the module docstring).
        """
        out: list[Installed] = []
        if not self._root.is_dir():
            return out
        for sdir in sorted(self._root.iterdir()):
            with contextlib.suppress(OSError):
                self._clear_leftovers(sdir)
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, BundleError):
                version = json.loads((sdir / CURRENT_FILE).read_bytes())["version"]
                vdir = sdir / f"v{int(version)}"
                bundle = load_bundle((vdir / BUNDLE_FILE).read_bytes())
                if bundle.manifest.name == sdir.name:
                    out.append(Installed(sdir.name, int(version), bundle, vdir / FILES_DIR))
        return out

    def _clear_leftovers(self, sdir: Path) -> None:
        """Remove from ``sdir`` whatever is not the version in force.  Raises OSError."""
        if not sdir.is_dir():
            return
        current = sdir / CURRENT_FILE
        if not current.exists():
            # An interrupted first install, or an interrupted remove: nothing here is in force.
            shutil.rmtree(sdir)
            return
        try:
            keep = f"v{int(json.loads(current.read_bytes())['version'])}"
        except (ValueError, KeyError, TypeError):
            return  # unreadable: leave everything as it is (load skips the service)
        for child in sdir.iterdir():
            if child.name in (CURRENT_FILE, keep):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def install(self, bundle: Bundle, raw: bytes, version: int) -> Installed:
        """Install ``bundle`` (``raw`` its encoded bytes) as ``version`` and put it in force.

        Blocking (call it in a thread).  Raises StorageError; the version in
        force before is then untouched.
        """
        name = bundle.manifest.name
        sdir = self._dir(name)
        final = sdir / f"v{version}"
        tmp = sdir / f".v{version}.tmp"
        try:
            sdir.mkdir(mode=0o755, parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists():  # a crash after the rename: the content is re-checked anyway
                shutil.rmtree(final)
            tmp.mkdir(mode=0o755)
            _write_synced(tmp / BUNDLE_FILE, raw)
            for rel, data in bundle.files.items():
                _write_synced(tmp / FILES_DIR / rel, data)
            for d in sorted({(tmp / FILES_DIR / r).parent for r in bundle.files} | {tmp}):
                fsync_directory(d)
            os.replace(tmp, final)
            fsync_directory(sdir)
            atomic_write(sdir / CURRENT_FILE, json.dumps({"version": version}).encode(), 0o644)
        except OSError as e:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            raise StorageError(e.errno or 5, f"cannot install {name} v{version}: {e}") from e
        self.prune(name, keep=version)
        return Installed(name, version, bundle, final / FILES_DIR)

    def prune(self, name: str, keep: int) -> None:
        """Remove every version directory of ``name`` but ``keep`` (best effort)."""
        sdir = self._dir(name)
        for child in sdir.iterdir() if sdir.is_dir() else ():
            if child.is_dir() and child.name != f"v{keep}":
                shutil.rmtree(child, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Take ``name`` out of force, then delete its files.  Raises StorageError."""
        sdir = self._dir(name)
        try:
            (sdir / CURRENT_FILE).unlink(missing_ok=True)
            if self._root.is_dir():
                fsync_directory(self._root)
        except OSError as e:
            raise StorageError(e.errno or 5, f"cannot remove {name}: {e}") from e
        shutil.rmtree(sdir, ignore_errors=True)


class LoadedService:
    """One version of a service, warm and callable (see the module docstring)."""

    def __init__(self, installed: Installed, runtime: Runtime) -> None:
        self.name = installed.name
        self.version = installed.version
        self.manifest: Manifest = installed.bundle.manifest
        schema = params_schema(self.manifest)
        cls = jsonschema.validators.validator_for(schema)
        self._validator = cls(schema)
        self.runtime = runtime
        self._in_flight = 0
        self._retired = False
        self._closing: asyncio.Task[None] | None = None

    def param_errors(self, params: dict[str, Any]) -> str | None:
        """Return why ``params`` fail the manifest's schema (the first error), or None."""
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(params))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{where}: {error.message}" if where else error.message

    def __enter__(self) -> Runtime:
        """Hold this version for a call: its runtime stays open until :meth:`__exit__`.

        ``with svc as runtime: await runtime.invoke(...)``.  A context manager
        rather than a coroutine around the call: a call resumes through every
        coroutine level above it, twice, on the API's hot path.
        """
        self._in_flight += 1
        return self.runtime

    def __exit__(self, *exc: object) -> None:
        self._in_flight -= 1
        if self._retired and self._in_flight == 0:
            self._close_soon()

    def retire(self) -> None:
        """Close the runtime once no call is using it any more."""
        self._retired = True
        if self._in_flight == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.runtime.aclose())

    async def aclose(self) -> None:
        """Close the runtime now (daemon shutdown)."""
        self._retired = True
        self._close_soon()
        assert self._closing is not None
        await asyncio.shield(self._closing)

    @property
    def in_flight(self) -> int:
        """Calls running on this version now."""
        return self._in_flight
