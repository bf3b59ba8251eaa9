"""Algorithm runtimes of the inner module.

``base`` holds the contract every runtime fulfils (limits, invocation,
outcome, failures, the ``Runtime`` protocol); ``python`` runs Python bundles in
sandboxed worker processes, ``wasm`` runs WebAssembly modules.
:func:`load_runtime` picks one by the manifest's ``runtime`` field.  The
runtime modules are imported on demand, so naming this package costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from firmware.common.errors import ConfigError
from firmware.inner.runtimes.base import Limits, Runtime, RuntimeUnavailable

if TYPE_CHECKING:
    from firmware.inner.runtimes.python import PythonRuntimeConfig

RUNTIMES = ("python", "wasm")


def load_runtime(
    manifest_runtime: str,
    service_dir: str | os.PathLike[str],
    entry: str,
    limits: Limits,
    *,
    python_config: PythonRuntimeConfig | None = None,
) -> Runtime:
    """Return an unstarted runtime for a service (call ``start()``, then ``invoke()``).

    ``manifest_runtime`` is ``"python"`` (``entry`` = ``"module:function"``) or
    ``"wasm"`` (``entry`` = the module's file name in ``service_dir``);
    ``python_config`` tunes the Python runtime (pool size, worker user...).
    Raises ConfigError for an unknown runtime name or a bad entry/directory,
    RuntimeUnavailable when the WebAssembly runtime cannot be imported on this
    installation.
    """
    if manifest_runtime == "python":
        from firmware.inner.runtimes.python import PythonRuntime

        return PythonRuntime(service_dir, entry, limits, python_config)
    if manifest_runtime == "wasm":
        try:
            from firmware.inner.runtimes.wasm import WasmRuntime
        except ImportError as e:
            raise RuntimeUnavailable(
                f"the WebAssembly runtime is not available on this installation: {e}"
            ) from e
        return WasmRuntime(_read_module(service_dir, entry), limits, name=Path(service_dir).name)
    raise ConfigError(
        f"unknown runtime {manifest_runtime!r}; expected one of {', '.join(RUNTIMES)}"
    )


def _read_module(service_dir: str | os.PathLike[str], entry: str) -> bytes:
    """Return the bytes of the file ``entry`` inside ``service_dir``; ConfigError if absent."""
    root = Path(service_dir).resolve()
    path = (root / entry).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ConfigError(f"entry {entry!r} is not a file in the service directory")
    return path.read_bytes()
