"""The wasm runtime: a real call, an endless loop stopped, a memory bomb, and recovery."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.inner.runtimes.base import (
    AlgorithmCrashed,
    AlgorithmError,
    AlgorithmTimeout,
    Invocation,
    Limits,
    MemoryLimitExceeded,
    ResultTooLarge,
    RuntimeUnavailable,
)
from firmware.inner.runtimes.wasm import WasmRuntime
from provisioning.bundle import build_bundle, load_bundle

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SOURCE = Path(__file__).resolve().parents[3] / "provisioning" / "reference" / "polyline-simplify"
LIMITS = Limits(timeout_s=1.0, memory_mb=16, max_result_bytes=1 << 20)

#: A test module speaking the ABI by hand: og_run's behaviour is chosen by
#: the first byte of the data: 'L' loops forever, 'M' grows memory until
#: refused and then traps, 'U' traps at once, 'R' refuses with a message,
#: 'B' claims a result outside memory; anything else echoes the params.
ABI_WAT = r"""
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (global $rptr (mut i32) (i32.const 0))
  (global $rlen (mut i32) (i32.const 0))
  (data (i32.const 16) "no thanks")
  (func (export "og_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (if (i32.eq (memory.grow (i32.add (i32.shr_u (local.get $n) (i32.const 16))
                                              (i32.const 1)))
                        (i32.const -1))
              (then (return (i32.const 0))))))
    (local.get $p))
  (func (export "og_run") (param $pp i32) (param $pl i32) (param $dp i32) (param $dl i32)
        (result i32)
    (local $c i32)
    (if (i32.eqz (local.get $dl)) (then (local.set $c (i32.const 0)))
      (else (local.set $c (i32.load8_u (local.get $dp)))))
    (if (i32.eq (local.get $c) (i32.const 76))             ;; 'L'
      (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $c) (i32.const 77))             ;; 'M'
      (then (loop $grow
              (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
            unreachable))
    (if (i32.eq (local.get $c) (i32.const 85)) (then unreachable))  ;; 'U'
    (if (i32.eq (local.get $c) (i32.const 82))             ;; 'R'
      (then (global.set $rptr (i32.const 16)) (global.set $rlen (i32.const 9))
            (return (i32.const 1))))
    (if (i32.eq (local.get $c) (i32.const 66))             ;; 'B'
      (then (global.set $rptr (i32.const 65000)) (global.set $rlen (i32.const 100000))
            (return (i32.const 0))))
    (global.set $rptr (local.get $pp))
    (global.set $rlen (local.get $pl))
    (i32.const 0))
  (func (export "og_result_ptr") (result i32) (global.get $rptr))
  (func (export "og_result_len") (result i32) (global.get $rlen))
)
"""


@functools.cache
def _simplify_wasm() -> bytes:
    """Build the C reference module with its Makefile (clang + lld) and return it."""
    if shutil.which("clang") is None or shutil.which("wasm-ld") is None:
        pytest.skip("the Debian packages clang and lld are needed (make sysdeps)")
    subprocess.run(["make", "-s", "-C", str(SOURCE)], check=True, timeout=120)
    return (SOURCE / "polyline_simplify.wasm").read_bytes()


@pytest.fixture
async def abi_runtime() -> AsyncIterator[WasmRuntime]:
    runtime = WasmRuntime(wasmtime.wat2wasm(ABI_WAT), LIMITS, name="abi-test")
    await runtime.start()
    yield runtime
    await runtime.aclose()


def _points(pts: list[tuple[float, float]]) -> bytes:
    return b"".join(struct.pack("<dd", x, y) for x, y in pts)


def _unpack(data: bytes) -> list[tuple[float, float]]:
    return [struct.unpack_from("<dd", data, i) for i in range(0, len(data), 16)]


def _douglas_peucker(pts: list[tuple[float, float]], eps: float) -> list[tuple[float, float]]:
    """Textbook recursive reference to check the C module against."""
    if len(pts) < 3:
        return pts
    (ax, ay), (bx, by) = pts[0], pts[-1]
    best, index = -1.0, 0
    for i in range(1, len(pts) - 1):
        px, py = pts[i]
        dx, dy = bx - ax, by - ay
        n2 = dx * dx + dy * dy
        t = 0.0 if n2 == 0 else max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / n2))
        d = (ax + t * dx - px) ** 2 + (ay + t * dy - py) ** 2
        if d > best:
            best, index = d, i
    if best <= eps * eps:
        return [pts[0], pts[-1]]
    return _douglas_peucker(pts[: index + 1], eps)[:-1] + _douglas_peucker(pts[index:], eps)


async def test_polyline_simplify_from_its_bundle() -> None:
    _simplify_wasm()
    bundle = load_bundle(build_bundle(SOURCE).to_bytes())
    assert list(bundle.files) == ["polyline_simplify.wasm"]
    runtime = WasmRuntime.from_bundle(bundle)
    await runtime.start()
    try:
        # A noisy sine: enough structure that the result is not trivial.
        pts = [(i * 0.1, ((i * 7919) % 13) * 0.01 + (i % 40 < 20) * 3.0) for i in range(500)]
        for eps in (0.0, 0.05, 0.5, 5.0):
            out = await runtime.invoke(Invocation({"epsilon": eps}, _points(pts)))
            expected = _douglas_peucker(pts, eps)
            assert _unpack(out.data) == expected
            assert out.result == {"points_in": 500, "points_out": len(expected)}
        empty = await runtime.invoke(Invocation({"epsilon": 1}, b""))
        assert empty.result == {"points_in": 0, "points_out": 0}
        with pytest.raises(AlgorithmError, match="pairs of little-endian float64"):
            await runtime.invoke(Invocation({"epsilon": 1}, b"123"))
        with pytest.raises(AlgorithmError, match="epsilon must be a number"):
            await runtime.invoke(Invocation({"tolerance": 1}, b""))
    finally:
        await runtime.aclose()


def test_wasm_build_is_reproducible(tmp_path: Path) -> None:
    first = _simplify_wasm()
    shutil.copy(SOURCE / "polyline_simplify.c", tmp_path)
    shutil.copy(SOURCE / "Makefile", tmp_path)
    subprocess.run(["make", "-s", "-C", str(tmp_path)], check=True, timeout=120)
    assert (tmp_path / "polyline_simplify.wasm").read_bytes() == first


async def test_normal_call_echoes_params(abi_runtime: WasmRuntime) -> None:
    out = await abi_runtime.invoke(Invocation({"x": [1, 2.5, "ü"]}, b"hello"))
    assert out.result == {"x": [1, 2.5, "ü"]}
    assert out.data == b""


async def test_endless_loop_is_stopped_and_runtime_recovers(abi_runtime: WasmRuntime) -> None:
    with pytest.raises(AlgorithmTimeout, match="1 s limit"):
        await abi_runtime.invoke(Invocation({}, b"L"))
    out = await abi_runtime.invoke(Invocation({"after": "timeout"}, b""))
    assert out.result == {"after": "timeout"}


async def test_memory_bomb_fails_cleanly_and_runtime_recovers(abi_runtime: WasmRuntime) -> None:
    with pytest.raises(MemoryLimitExceeded, match="16 MiB"):
        await abi_runtime.invoke(Invocation({}, b"M"))
    out = await abi_runtime.invoke(Invocation({"after": "bomb"}, b""))
    assert out.result == {"after": "bomb"}


async def test_input_larger_than_memory_limit(abi_runtime: WasmRuntime) -> None:
    with pytest.raises(MemoryLimitExceeded, match="does not fit"):
        await abi_runtime.invoke(Invocation({}, bytes(17 * 1024 * 1024)))


async def test_trap_refusal_and_bad_buffers(abi_runtime: WasmRuntime) -> None:
    with pytest.raises(AlgorithmCrashed, match="trapped") as crash:
        await abi_runtime.invoke(Invocation({}, b"U"))
    assert not isinstance(crash.value, MemoryLimitExceeded)
    with pytest.raises(AlgorithmError) as refused:
        await abi_runtime.invoke(Invocation({}, b"R"))
    assert refused.value.message == "no thanks"
    with pytest.raises(AlgorithmCrashed, match="outside its memory"):
        await abi_runtime.invoke(Invocation({}, b"B"))


async def test_result_too_large() -> None:
    runtime = WasmRuntime(
        wasmtime.wat2wasm(ABI_WAT), Limits(1.0, 16, max_result_bytes=10), name="small"
    )
    await runtime.start()
    try:
        with pytest.raises(ResultTooLarge):
            await runtime.invoke(Invocation({"long": "x" * 20}, b""))
        assert (await runtime.invoke(Invocation({}, b""))).result == {}
    finally:
        await runtime.aclose()


async def test_concurrent_calls_are_serialised(abi_runtime: WasmRuntime) -> None:
    outs = await asyncio.gather(*(abi_runtime.invoke(Invocation({"i": i})) for i in range(8)))
    assert [o.result for o in outs] == [{"i": i} for i in range(8)]


@pytest.mark.parametrize(
    ("wat", "message"),
    [
        ('(module (import "wasi_snapshot_preview1" "fd_write" (func)))', "provides no imports"),
        ("(module)", "does not export its memory"),
        ('(module (memory (export "memory") 1))', "does not export function og_alloc"),
    ],
)
async def test_modules_breaking_the_abi_are_refused(wat: str, message: str) -> None:
    runtime = WasmRuntime(wasmtime.wat2wasm(wat), LIMITS)
    try:
        with pytest.raises(RuntimeUnavailable, match=message):
            await runtime.start()
    finally:
        await runtime.aclose()


async def test_closed_runtime_is_unavailable(abi_runtime: WasmRuntime) -> None:
    await abi_runtime.aclose()
    with pytest.raises(RuntimeUnavailable):
        await abi_runtime.invoke(Invocation({}))
    await abi_runtime.aclose()  # idempotent


def test_result_must_be_json_object_text() -> None:
    # The echo path returns the params bytes; a JSON list is refused.
    async def scenario() -> None:
        runtime = WasmRuntime(wasmtime.wat2wasm(ABI_WAT), LIMITS)
        await runtime.start()
        try:
            out = await runtime.invoke(Invocation({"k": 1}))
            assert json.dumps(out.result) == '{"k": 1}'
        finally:
            await runtime.aclose()

    asyncio.run(scenario())


async def test_cancelled_call_is_stopped_and_runtime_recovers() -> None:
    runtime = WasmRuntime(wasmtime.wat2wasm(ABI_WAT), Limits(30.0, 16, 1 << 20))
    await runtime.start()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(runtime.invoke(Invocation({}, b"L")), timeout=0.2)
        out = await asyncio.wait_for(runtime.invoke(Invocation({"ok": True})), timeout=10)
        assert out.result == {"ok": True}
    finally:
        await runtime.aclose()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.floats(-1e6, 1e6, allow_nan=False)),
        max_size=60,
    ),
    # Tolerances as a person writes them ("12.345"): the module parses those
    # exactly, so its choices at the boundary match Python's.
    st.integers(0, 10**8).map(lambda k: k / 1000),
)
def test_polyline_simplify_agrees_with_the_textbook_algorithm(
    points: list[tuple[float, float]], epsilon: float
) -> None:
    wasm = _simplify_wasm()

    async def scenario() -> None:
        runtime = WasmRuntime(wasm, LIMITS, name="polyline-simplify")
        await runtime.start()
        try:
            out = await runtime.invoke(Invocation({"epsilon": epsilon}, _points(points)))
        finally:
            await runtime.aclose()
        assert _unpack(out.data) == _douglas_peucker(points, epsilon)

    asyncio.run(scenario())
