"""Throughput and latency of the inner module's LAN API, against a bare aiohttp endpoint.

Rows (same machine, same run, same client):

* **inner daemon, echo**: ``optogate inner run`` as its own process, the
  reference ``echo`` bundle built and warm, every call through TLS 1.3, the
  API-key check, the licence decision at trusted time, the body parser, the
  JSON Schema, the sandboxed Python worker and a usage record made durable
  (fdatasync, grouped) before the answer.
* **bare aiohttp, echo**: an aiohttp TLS 1.3 server in its own process whose
  handler does the same work in-process (parse the Optogate-Params header,
  return the body and a result header) - the ceiling the daemon is compared to.

The client is one process with ``--clients`` keep-alive TLS connections
(aiohttp), each sending calls back to back for ``--seconds`` after a warm-up.
Also printed: the daemon's resident memory when idle (the daemon alone, and
with its warm workers).  The outer module and central are played by the
integration tests' scripted peer on loopback (the link is idle during the
measurement).

Usage::

    .venv/bin/python bench/inner_api.py [--clients 16] [--seconds 10] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "inner"))

from inner_testbed import (  # noqa: E402
    REFERENCE,
    CentralPeer,
    DaemonProcess,
    build_bundle,
    free_port,
    generate_api_key,
    provisioned,
)

BARE_SERVER = r"""
import json, ssl, sys
from aiohttp import web

async def call(request):
    params = json.loads(request.headers.get("Optogate-Params", "{}"))
    data = await request.read()
    result = json.dumps({"params": params}, separators=(",", ":"))
    return web.Response(body=data, headers={"Content-Type": "application/octet-stream",
                                            "Optogate-Result": result})

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
app = web.Application()
app.router.add_post("/v1/services/{service}/call", call)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=ctx, access_log=None,
            print=None)
"""


async def load(
    url: str, key: str, ca: Path, clients: int, seconds: float
) -> tuple[float, list[float], int]:
    """Return (calls/s, latencies in s, errors) of ``clients`` looping callers."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/octet-stream",
        "Optogate-Params": json.dumps({"text": "hello"}),
    }
    body = b"x" * 64
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(ssl=ctx, limit=clients)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            async with session.post("/v1/services/echo/call", data=body, headers=headers) as r:
                got = await r.read()
                if r.status != 200 or got != body:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

        async def caller(until: float) -> None:
            while time.perf_counter() < until:
                await one()

        await asyncio.gather(
            *(caller(time.perf_counter() + 2.0) for _ in range(clients))
        )  # warm-up
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(caller(start + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, errors


def rss_kib(pid: int, *, with_children: bool) -> int:
    """Return VmRSS of ``pid`` (and its children) in KiB."""
    pids = [pid]
    if with_children:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry.name))
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main_async(args: argparse.Namespace) -> list[tuple[str, float, float, float, int]]:
    link_port = free_port()
    rows = []
    with provisioned(link_port, pool_size=args.workers) as gw:
        peer = CentralPeer(gw)
        key = generate_api_key()
        peer.publish(build_bundle(REFERENCE / "echo"))
        peer.grant("echo", key, lic_id="L-bench")
        await peer.start(link_port)
        daemon = DaemonProcess(gw)
        bare_port = free_port()
        bare = None
        try:
            await daemon.start()
            ctx = ssl.create_default_context(cafile=str(gw.ca_file))
            async with aiohttp.ClientSession() as s:  # build the service once
                for _ in range(100):
                    r = await s.post(
                        daemon.url + "/v1/services/echo/call",
                        data=b"",
                        headers={
                            "Authorization": f"Bearer {key.secret}",
                            "Content-Type": "application/octet-stream",
                        },
                        ssl=ctx,
                    )
                    if r.status == 200:
                        break
                    await asyncio.sleep(0.2)
            await asyncio.sleep(3.0)
            assert daemon.proc is not None
            idle_daemon = rss_kib(daemon.proc.pid, with_children=False)
            idle_all = rss_kib(daemon.proc.pid, with_children=True)
            rate, lat, errors = await load(
                daemon.url, key.secret, gw.ca_file, args.clients, args.seconds
            )
            rows.append(("inner daemon, echo", rate, pct(lat, 0.5), pct(lat, 0.99), errors))
            await asyncio.sleep(1.5)  # the status file is rewritten every second
            usage = json.loads((gw.state / "status.json").read_text())["usage"]
            group = usage["appended"] / max(1, usage["commits"])
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                f.write(BARE_SERVER)
            bare = await asyncio.create_subprocess_exec(
                sys.executable,
                f.name,
                str(bare_port),
                str(gw.keys / "tls.crt"),
                str(gw.keys / "tls.key"),
            )
            await asyncio.sleep(1.5)
            os.unlink(f.name)
            rate, lat, errors = await load(
                f"https://127.0.0.1:{bare_port}", key.secret, gw.ca_file, args.clients, args.seconds
            )
            rows.append(("bare aiohttp, echo", rate, pct(lat, 0.5), pct(lat, 0.99), errors))
        finally:
            if bare is not None:
                bare.terminate()
                await bare.wait()
            await daemon.terminate()
            await peer.stop()
    print_table(rows, idle_daemon, idle_all, args)
    print(f"usage journal: {group:.1f} records per fdatasync on average")
    return rows


def print_table(
    rows: list[tuple[str, float, float, float, int]],
    idle: int,
    idle_all: int,
    args: argparse.Namespace,
) -> None:
    print(f"{args.clients} keep-alive TLS 1.3 clients, {args.seconds:g} s per row, loopback")
    print("| row | calls/s | p50 ms | p99 ms | errors |")
    print("|-----|--------:|-------:|-------:|-------:|")
    for name, rate, p50, p99, errors in rows:
        print(f"| {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {errors} |")
    if len(rows) == 2:
        print(f"\ninner / bare throughput: {rows[0][1] / rows[1][1]:.0%}")
    print(
        f"idle RSS: daemon {idle / 1024:.1f} MiB; daemon + warm workers {idle_all / 1024:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2, help="warm workers of the service")
    parser.add_argument("--markdown", action="store_true", help="(the table is always markdown)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
