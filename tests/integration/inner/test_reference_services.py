"""The reference bundles, packed by the bundle packer, run on the real runtimes.

Each bundle is built from provisioning/reference/, parsed back, installed in a
fresh directory as the service builder would, and run through
``load_runtime``: the sandboxed Python workers for echo, doc-encrypt and
dxf2svg, wasmtime for polyline-simplify.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import ezdxf
import pytest

from firmware.inner.runtimes import load_runtime
from firmware.inner.runtimes.base import AlgorithmError, Invocation, Limits, Runtime
from firmware.inner.runtimes.python import PythonRuntimeConfig
from provisioning.bundle import Bundle, build_bundle, load_bundle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REFERENCE = Path(__file__).resolve().parents[3] / "provisioning" / "reference"


#: Workers run as ``nobody`` when the tests run as root, and ``nobody`` must be
#: able to read the interpreter's standard library: the system one can.
SYSTEM_PYTHON = "/usr/bin/python3"


def _python_config(needs: str | None = None) -> PythonRuntimeConfig | None:
    if os.geteuid() != 0:
        return None
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip("workers dropped to nobody need a system python3 (Debian package python3)")
    if needs is not None:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", f"import {needs}"], check=False, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"the system python3 lacks {needs} (Debian package python3-cryptography)")
    return PythonRuntimeConfig(python=SYSTEM_PYTHON)


def _install(bundle: Bundle) -> Path:
    root = Path(tempfile.mkdtemp(prefix="optogate-ref-"))
    root.chmod(0o755)
    for rel, content in bundle.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_bytes(content)
        path.chmod(0o644)
    return root


@pytest.fixture
async def service() -> AsyncIterator[Callable[[str], Runtime]]:
    made: list[tuple[Runtime, Path]] = []

    def make(name: str) -> Runtime:
        if name == "polyline-simplify":
            if shutil.which("clang") is None or shutil.which("wasm-ld") is None:
                pytest.skip("the Debian packages clang and lld are needed (make sysdeps)")
            subprocess.run(["make", "-s", "-C", str(REFERENCE / name)], check=True, timeout=120)
        bundle = load_bundle(build_bundle(REFERENCE / name).to_bytes())
        m = bundle.manifest
        needs = "cryptography.hazmat.primitives.ciphers.aead" if name == "doc-encrypt" else None
        config = _python_config(needs) if m.runtime == "python" else None
        root = _install(bundle)
        limits = Limits(m.limits.timeout_s, m.limits.memory_mb, m.limits.max_result_bytes)
        runtime = load_runtime(m.runtime, root, m.entry, limits, python_config=config)
        made.append((runtime, root))
        return runtime

    yield make
    for runtime, root in made:
        await runtime.aclose()
        shutil.rmtree(root)


@pytest.fixture
def big_document() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 17)


async def test_echo(service: Callable[[str], Runtime]) -> None:
    runtime = service("echo")
    await runtime.start()
    out = await runtime.invoke(Invocation({"a": [1, "b"]}, b"\x00\x01"))
    assert out.result == {"params": {"a": [1, "b"]}}
    assert out.data == b"\x00\x01"


async def test_doc_encrypt_round_trip_and_wrong_password(
    service: Callable[[str], Runtime], big_document: bytes
) -> None:
    runtime = service("doc-encrypt")
    await runtime.start()
    sealed = await runtime.invoke(Invocation({"op": "encrypt", "password": "pw"}, big_document))
    assert sealed.data[:4] == b"OGDE"
    opened = await runtime.invoke(Invocation({"op": "decrypt", "password": "pw"}, sealed.data))
    assert opened.data == big_document
    with pytest.raises(AlgorithmError) as wrong:
        await runtime.invoke(Invocation({"op": "decrypt", "password": "nope"}, sealed.data))
    assert wrong.value.message == "wrong password"


async def test_dxf2svg(service: Callable[[str], Runtime]) -> None:
    doc = ezdxf.new("R2018")
    doc.modelspace().add_circle((1, 2), 3)
    stream = io.StringIO()
    doc.write(stream)
    runtime = service("dxf2svg")
    await runtime.start()
    out = await runtime.invoke(Invocation({}, stream.getvalue().encode()))
    assert out.result["entities"] == {"CIRCLE": 1}
    assert b'<circle cx="1" cy="-2" r="3"' in out.data
    with pytest.raises(AlgorithmError, match=r"^line 1: "):
        await runtime.invoke(Invocation({}, b"zero\nSECTION\n"))


async def test_polyline_simplify(service: Callable[[str], Runtime]) -> None:
    runtime = service("polyline-simplify")
    await runtime.start()
    points = [(0.0, 0.0), (1.0, 0.01), (2.0, -0.01), (3.0, 5.0), (4.0, 6.0), (5.0, 7.0)]
    data = b"".join(struct.pack("<dd", *p) for p in points)
    out = await runtime.invoke(Invocation({"epsilon": 0.1}, data))
    kept = [struct.unpack_from("<dd", out.data, i) for i in range(0, len(out.data), 16)]
    assert kept == [(0.0, 0.0), (2.0, -0.01), (3.0, 5.0), (5.0, 7.0)]
    assert out.result == {"points_in": 6, "points_out": 4}
