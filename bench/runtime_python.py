"""Per-call overhead of the sandboxed Python runtime on warm workers.

The algorithm is a trivial echo, so every figure is the runtime's own cost:
framing, the socket round trip, two context switches, JSON of the parameters
and the result, and the pool's bookkeeping.  Rows:

* **start**: ``start()`` of a one-worker pool (interpreter start-up,
  confinement, import of the bundle), median of a few runs.
* **echo, sequential**: one caller, one warm worker, calls back to back.
* **echo + N bytes**: the same with binary data sent and returned (the data
  crosses the socket twice).
* **echo, 8 callers / 2 workers**: throughput with a queue in front of the pool.

Latency percentiles are over individual calls after a warm-up; nothing here is
a pass/fail threshold.  Run as root to measure the full sandbox (user switch,
network namespace); as another user the workers skip those steps.

Usage::

    .venv/bin/python bench/runtime_python.py            # 2000 calls per row
    .venv/bin/python bench/runtime_python.py --calls 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from firmware.inner.runtimes.base import Invocation, Limits
from firmware.inner.runtimes.python import PythonRuntime, PythonRuntimeConfig

ECHO = """
def run(params, data):
    return {"echo": params}, data
"""

LIMITS = Limits(timeout_s=10.0, memory_mb=512, max_result_bytes=64 * 1024 * 1024)
#: Calls made and thrown away before measuring: the first calls pay for lazy
#: imports and allocator growth in both processes.
WARMUP_CALLS = 50
START_RUNS = 5


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _sequential(runtime: PythonRuntime, calls: int, data: bytes) -> tuple[float, list[float]]:
    inv = Invocation({"k": "v"}, data)
    for _ in range(WARMUP_CALLS):
        await runtime.invoke(inv)
    latencies = []
    began = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        outcome = await runtime.invoke(inv)
        latencies.append(time.perf_counter() - t0)
        assert len(outcome.data) == len(data)
    return calls / (time.perf_counter() - began), latencies


async def _concurrent(runtime: PythonRuntime, calls: int, callers: int) -> float:
    inv = Invocation({"k": "v"}, b"")
    per_caller = calls // callers

    async def caller() -> None:
        for _ in range(per_caller):
            await runtime.invoke(inv)

    await asyncio.gather(*(caller() for _ in range(callers)))
    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return per_caller * callers / (time.perf_counter() - began)


def _make_service() -> Path:
    """Return a world-readable service directory holding the echo algorithm."""
    root = Path(tempfile.mkdtemp(prefix="optogate-bench-"))
    root.chmod(0o755)
    (root / "echo.py").write_text(ECHO)
    (root / "echo.py").chmod(0o644)
    return root


async def main(calls: int) -> None:
    root = _make_service()
    rows: list[tuple[str, str, str, str]] = []
    try:
        starts = []
        for _ in range(START_RUNS):
            runtime = PythonRuntime(root, "echo:run", LIMITS, PythonRuntimeConfig(pool_size=1))
            t0 = time.perf_counter()
            await runtime.start()
            starts.append(time.perf_counter() - t0)
            facts = runtime.workers()[0]
            await runtime.aclose()
        rows.append(("start (1 worker)", "-", f"{statistics.median(starts) * 1e3:.1f}", "-"))

        runtime = PythonRuntime(root, "echo:run", LIMITS, PythonRuntimeConfig(pool_size=1))
        try:
            for label, size in (
                ("echo, sequential", 0),
                ("echo + 64 KiB", 64 * 1024),
                ("echo + 1 MiB", 1024 * 1024),
            ):
                n = calls if size <= 64 * 1024 else max(50, calls // 10)
                rate, lat = await _sequential(runtime, n, os.urandom(size))
                rows.append(
                    (
                        label,
                        f"{rate:,.0f}",
                        f"{_percentile(lat, 0.5) * 1e3:.3f}",
                        f"{_percentile(lat, 0.99) * 1e3:.3f}",
                    )
                )
        finally:
            await runtime.aclose()

        runtime = PythonRuntime(root, "echo:run", LIMITS, PythonRuntimeConfig(pool_size=2))
        try:
            rate = await _concurrent(runtime, calls, callers=8)
            rows.append(("echo, 8 callers / 2 workers", f"{rate:,.0f}", "-", "-"))
        finally:
            await runtime.aclose()
    finally:
        shutil.rmtree(root)

    print(
        f"Python runtime, warm workers (uid={facts.uid}, netns={facts.netns}, "
        f"cpus={os.cpu_count()})"
    )
    print(f"{'row':<30} {'calls/s':>10} {'p50 ms':>10} {'p99 ms':>10}")
    for label, rate_text, p50, p99 in rows:
        print(f"{label:<30} {rate_text:>10} {p50:>10} {p99:>10}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per row")
    args = parser.parse_args()
    asyncio.run(main(args.calls))
