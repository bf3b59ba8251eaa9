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

The client is one process with ``--clients`` keep-alive TLS connections,
each sending calls back to back for ``--seconds`` after a warm-up: an
aiohttp client in this process (``--client aiohttp``, the default), or
``wrk`` (``--client wrk``, if installed: a C client that needs several times
less CPU per call, so that on a small machine the client does not take the
CPU the servers need; its warm-up is a first, unmeasured run).  Each row
also gives the CPU the server used per call (the daemon's process alone, and
with its workers) and the cores the client used: a client near one full
core is the bottleneck, and then the row measures the client.  Also printed:
the daemon's resident memory when idle (the daemon alone, and with its warm
workers).  The outer module and central are played by the integration
tests' scripted peer on loopback (the link is idle during the measurement).

The two rows are measured in ``--rounds`` interleaved rounds (inner then
bare, then bare then inner, ...), both servers running all along, so that a
change in the machine's speed during the run (a shared VM's CPU is not
steady) weighs on both alike; the ratio is given per round and as the
median of the rounds.

``--other-keys N`` licenses N more keys (a licence each) that do not call:
what a call costs should not depend on how many programs a site has.

Usage::

    .venv/bin/python bench/inner_api.py [--clients 16] [--seconds 10] [--rounds 3] [--client wrk]
        [--other-keys N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import ssl
import statistics
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


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = string.rep("x", 64)
wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Optogate-Params"] = '{{"text": "hello"}}'
"""

_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}

# A client process using this much CPU is (near) saturated: the row's
# throughput is then the client's, not the server's.
CLIENT_BOUND_CORES = 0.85


async def load_wrk(
    url: str, key: str, clients: int, seconds: float
) -> tuple[float, float, float, int]:
    """Return (calls/s, p50 ms, p99 ms, errors) of ``wrk`` with ``clients`` connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT.format(key=key))
    try:
        out = ""
        for duration in (2, max(1, round(seconds))):  # warm-up, then the measured run
            proc = await asyncio.create_subprocess_exec(
                "wrk",
                "-t1",
                f"-c{clients}",
                f"-d{duration}s",
                "--latency",
                "-s",
                f.name,
                url + "/v1/services/echo/call",
                stdout=asyncio.subprocess.PIPE,
            )
            out = (await proc.communicate())[0].decode()
    finally:
        os.unlink(f.name)

    def ms(label: str) -> float:
        m = re.search(label + r"\s+([\d.]+)(us|ms|s)\b", out)
        assert m is not None, out
        return float(m.group(1)) * _WRK_UNITS[m.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate is not None, out
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    return float(rate.group(1)), ms("50%"), ms("99%"), errors


def children(pid: int) -> list[int]:
    """Return the PIDs of the children of ``pid``."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
    return kids


def cpu_s(pid: int) -> float:
    """Return the CPU seconds (user + system) ``pid`` has used, 0 if it is gone."""
    with contextlib.suppress(OSError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def client_cpu_s() -> float:
    """Return the CPU seconds this process and its reaped children (wrk) have used."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


Row = tuple[str, float, float, float, int, float, float, float]


async def measure(
    name: str, url: str, key: str, ca: Path, pid: int, args: argparse.Namespace
) -> Row:
    """Load ``url`` and return (name, calls/s, p50, p99, errors, server us/call
    (process alone, and with its children), client cores)."""
    kids = children(pid)
    own0, kids0, client0 = cpu_s(pid), sum(map(cpu_s, kids)), client_cpu_s()
    wall0 = time.perf_counter()
    if args.client == "wrk":
        rate, p50, p99, errors = await load_wrk(url, key, args.clients, args.seconds)
    else:
        rate, lat, errors = await load(url, key, ca, args.clients, args.seconds)
        p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
    wall = time.perf_counter() - wall0
    own = cpu_s(pid) - own0
    tree = own + sum(map(cpu_s, kids)) - kids0
    calls = max(1.0, rate * wall)
    client = (client_cpu_s() - client0) / wall
    return (name, rate, p50, p99, errors, own / calls * 1e6, tree / calls * 1e6, client)


def rss_kib(pid: int, *, with_children: bool) -> int:
    """Return VmRSS of ``pid`` (and its children) in KiB."""
    pids = [pid, *(children(pid) if with_children else [])]
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


async def main_async(args: argparse.Namespace) -> list[Row]:
    if args.client == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("--client wrk: wrk is not installed")
    link_port = free_port()
    rows: list[Row] = []
    with provisioned(link_port, pool_size=args.workers) as gw:
        peer = CentralPeer(gw)
        key = generate_api_key()
        peer.publish(build_bundle(REFERENCE / "echo"))
        peer.grant("echo", key, lic_id="L-bench")
        for n in range(args.other_keys):
            peer.grant("echo", generate_api_key(), lic_id=f"L-other-{n}")
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
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                f.write(BARE_SERVER)
            bare = await asyncio.create_subprocess_exec(
                sys.executable,
                f.name,
                str(bare_port),
                str(gw.keys / "tls.crt"),
                str(gw.keys / "tls.key"),
            )
            await asyncio.sleep(3.0)  # both idle: the memory figures, and the bare server up
            os.unlink(f.name)
            assert daemon.proc is not None
            idle_daemon = rss_kib(daemon.proc.pid, with_children=False)
            idle_all = rss_kib(daemon.proc.pid, with_children=True)
            bare_url = f"https://127.0.0.1:{bare_port}"
            inner_row = ("inner daemon, echo", daemon.url, daemon.proc.pid)
            bare_row = ("bare aiohttp, echo", bare_url, bare.pid)
            for n in range(args.rounds):
                order = (inner_row, bare_row) if n % 2 == 0 else (bare_row, inner_row)
                for name, url, pid in order:
                    rows.append(await measure(name, url, key.secret, gw.ca_file, pid, args))
            await asyncio.sleep(1.5)  # the status file is rewritten every second
            usage = json.loads((gw.state / "status.json").read_text())["usage"]
            group = usage["appended"] / max(1, usage["commits"])
        finally:
            if bare is not None:
                bare.terminate()
                await bare.wait()
            await daemon.terminate()
            await peer.stop()
    print_table(rows, idle_daemon, idle_all, args)
    print(f"usage journal: {group:.1f} records per fdatasync on average")
    return rows


def ratios(rows: list[Row]) -> list[float]:
    """Return inner / bare throughput of each round (rows come in pairs, either order)."""
    out = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        inner, bare = (a, b) if a[0].startswith("inner") else (b, a)
        out.append(inner[1] / bare[1])
    return out


def print_table(rows: list[Row], idle: int, idle_all: int, args: argparse.Namespace) -> None:
    print(
        f"{args.clients} keep-alive TLS 1.3 clients ({args.client}), {args.seconds:g} s per row,"
        f" {args.rounds} interleaved rounds, loopback; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| round | row | calls/s | p50 ms | p99 ms | errors | server CPU us/call"
        " (process / with workers) | client cores |"
    )
    print("|---:|-----|--------:|-------:|-------:|-------:|------:|------:|")
    for i, (name, rate, p50, p99, errors, own_us, tree_us, client) in enumerate(rows):
        print(
            f"| {i // 2 + 1} | {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {errors} |"
            f" {own_us:.0f} / {tree_us:.0f} | {client:.2f} |"
        )
    each = ratios(rows)
    print(f"\ninner / bare throughput per round: {', '.join(f'{r:.0%}' for r in each)}")
    print(f"inner / bare throughput (median of rounds): {statistics.median(each):.0%}")
    for name, *_, client in rows:
        if client >= CLIENT_BOUND_CORES:
            print(f"warning: the client used {client:.2f} cores in row '{name}': that row")
            print("  measured the client more than the server (try --client wrk)")
    print(
        f"idle RSS: daemon {idle / 1024:.1f} MiB; daemon + warm workers {idle_all / 1024:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved inner/bare rounds")
    parser.add_argument("--workers", type=int, default=2, help="warm workers of the service")
    parser.add_argument(
        "--other-keys",
        type=int,
        default=0,
        help="licensed keys besides the caller's (a licence each), as on a site of many programs",
    )
    parser.add_argument("--client", choices=("aiohttp", "wrk"), default="aiohttp")
    parser.add_argument("--markdown", action="store_true", help="(the table is always markdown)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
