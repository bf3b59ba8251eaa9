"""Central under load: many gateways syncing at once over loopback TLS.

Builds a real central in a temporary directory (one customer, N registered
gateways, the echo service published and licensed), starts ``optogate
central run`` as its own process, then opens N concurrent sessions from this
process — each a TLS connection and a Link in the CLIENT role that
authenticates with its gateway's outer key — and has every session sync in a
loop for a fixed time.  Each sync returns fresh sealed sync metadata (HPKE +
Ed25519, made per request) and the gateway's sealed licence set.

Prints one table: sessions, syncs, syncs per second, latency p50/p99/max.

    .venv/bin/python bench/central_sync.py [--gateways 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from central_stub.client import authenticate
from central_stub.server import tls_client_context
from central_stub.testing import TempCentral, make_central, write_config
from firmware.common.adapters.tcp import connect_tcp
from firmware.common.errors import OptogateError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig


class _Gate:
    """Counts authenticated sessions; the clock starts once all of them are in."""

    def __init__(self, sessions: int) -> None:
        self.waiting = sessions
        self.all_in = asyncio.Event()
        self.go = asyncio.Event()
        self.stop_at = 0.0

    def arrived(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_in.set()


async def _gateway(
    central: TempCentral, name: str, port: int, gate: _Gate, latencies: list[float]
) -> None:
    transport = await connect_tcp(
        "127.0.0.1", port, ssl_context=tls_client_context(central.ca_cert), connect_timeout=60
    )
    link = Link(transport, SessionConfig(role=Role.CLIENT, baud=None))
    try:
        await authenticate(link, name, central.gateways[name].outer, central.key.key_id, timeout=60)
        # the first sync seals this gateway's licence set and bundle: warm-up, not measured
        await link.request(m.Sync(since_version=0), expect=m.SyncData, timeout=60)
        gate.arrived()
        await gate.go.wait()
        while time.perf_counter() < gate.stop_at:
            t0 = time.perf_counter()
            await link.request(m.Sync(since_version=0), expect=m.SyncData, timeout=30)
            latencies.append(time.perf_counter() - t0)
    finally:
        with contextlib.suppress(OptogateError):
            await link.aclose()


async def _run(central: TempCentral, port: int, seconds: float) -> tuple[list[float], float]:
    gate = _Gate(len(central.gateways))
    latencies: list[float] = []
    tasks = [
        asyncio.create_task(_gateway(central, name, port, gate, latencies))
        for name in central.gateways
    ]
    failed = asyncio.ensure_future(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
    ready = asyncio.ensure_future(gate.all_in.wait())
    await asyncio.wait({failed, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    t0 = time.perf_counter()
    gate.stop_at = t0 + seconds
    gate.go.set()
    await asyncio.gather(*tasks)
    failed.cancel()
    return latencies, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        central = make_central(Path(tmp), now=int(time.time()), gateways=args.gateways)
        print(f"setup: {args.gateways} gateways in {time.perf_counter() - t0:.1f} s", flush=True)
        config = write_config(central)
        proc = subprocess.Popen(
            [sys.executable, "-m", "host_tools.cli", "central", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = 0
            for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "started":
                    port = int(event["listen"][0].rsplit(":", 1)[1])
                    break
            # drain the server's log so its pipe never blocks it
            drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
            latencies, elapsed = asyncio.run(_run(central, port, args.seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        drain.wait(10)
    latencies.sort()
    n = len(latencies)
    p99 = latencies[min(n - 1, int(n * 0.99))]
    print()
    print("| sessions | syncs | seconds | syncs/s | p50 ms | p99 ms | max ms |")
    print("|---------:|------:|--------:|--------:|-------:|-------:|-------:|")
    print(
        f"| {args.gateways} | {n} | {elapsed:.1f} | {n / elapsed:.0f} | "
        f"{statistics.median(latencies) * 1000:.1f} | {p99 * 1000:.1f} | "
        f"{latencies[-1] * 1000:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
