"""Goodput over the simulated optical UART: our framed link against ZMODEM.

For each row (baud rate, bit-error rate) the benchmark starts a fresh
``optogate sim link`` and moves the same number of bytes from side a to side
b twice, each time under the same time bound:

* **optogate link**: ``optogate link echo --port B --baud BAUD`` on side b and
  ``optogate link test --port A --baud BAUD --bytes N --seed S --json`` on side a; the
  test's own JSON report gives the goodput and whether the digest matched.
* **ZMODEM**: ``rz -b -y`` (in a temporary directory) on side b and
  ``sz -b FILE`` on side a, lrzsz's defaults otherwise (1 KiB subpackets,
  streaming, CRC-32).  The received file is compared byte for byte; goodput is
  file size over the time from starting sz to sz's successful exit, which
  follows rz's answer to ZFIN, itself sent once the file is complete.

ZMODEM_ENDING: sz finishes with ``"OO"``, ``tcdrain()`` and
``tcflush(TCIOFLUSH)``.  On a UART, tcdrain waits until "OO" has left; on a
pty it returns at once and the flush throws away whatever the simulator has
not read yet, so rz often never sees "OO" and waits 3 x 10 s before giving
up (successfully).  That wait is an artefact of ptys, so the clock stops when
sz exits and rz is then given ``RZ_GRACE`` seconds before it is stopped.

Fraction is goodput over the line rate, ``baud / 10`` bytes per second (8N1).
A transfer not finished within the bound is stopped and reported as not
completed.  Bit errors are seeded (``--seed``), so a row replays.

Setup: lrzsz is installed with apt-get when ``sz``/``rz`` are missing (needs
root).  If ``optogate link`` is not available yet, its columns read "n/a".

Usage::

    .venv/bin/python bench/link_goodput.py            # 1 MiB, 6 rows
    .venv/bin/python bench/link_goodput.py --quick    # 64 KiB
    .venv/bin/python bench/link_goodput.py --rows 921600:0,921600:1e-5 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_ROWS = [(b, e) for b in (115200, 921600) for e in (0.0, 1e-6, 1e-5)]
FULL_SIZE = 1 << 20
QUICK_SIZE = 64 << 10
#: Each transfer may take this many times its ideal time on a clean line
#: (plus MIN_BOUND): room for protocol overhead and retransmissions, but a
#: stalled transfer is stopped rather than holding up the run.
BOUND_FACTOR = 4.0
MIN_BOUND = 30.0
#: How long rz may take to exit by itself once sz is done (see ZMODEM_ENDING).
RZ_GRACE = 1.0
#: Grace period for a process asked to stop.
STOP_GRACE = 5.0


@dataclass
class Result:
    completed: bool
    goodput: float | None = None  # bytes per second
    seconds: float | None = None
    note: str = ""
    flips: int | None = None


@dataclass
class Row:
    baud: int
    ber: float
    ours: Result
    zmodem: Result


# -- setup ------------------------------------------------------------------------


def ensure_lrzsz() -> None:
    """Install lrzsz when sz/rz are missing; exit with a message if that is impossible."""
    if shutil.which("sz") and shutil.which("rz"):
        return
    if os.geteuid() != 0:
        sys.exit("sz/rz not found: install Debian's lrzsz (apt-get install lrzsz)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "lrzsz"],
        check=True,
        env=env,
    )
    if not (shutil.which("sz") and shutil.which("rz")):
        sys.exit("lrzsz installed but sz/rz are still not on PATH")


def our_link_available() -> bool:
    return importlib.util.find_spec("firmware.common.link.cli") is not None


def optogate(*args: str) -> list[str]:
    return [sys.executable, "-m", "host_tools.cli", *args]


# -- processes ----------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Terminate a process (and its session), escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE)


@dataclass
class Sim:
    a: str
    b: str
    control: str

    def stats(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(self.control)
            sock.sendall(b'{"cmd": "stats"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        stats: dict[str, Any] = json.loads(buf)["stats"]
        return stats

    def flips(self) -> int:
        stats = self.stats()
        return int(stats["a->b"]["bits_flipped"] + stats["b->a"]["bits_flipped"])


@contextlib.contextmanager
def simulator(baud: int, ber: float, seed: int) -> Iterator[Sim]:
    proc = subprocess.Popen(
        optogate("sim", "link", "--baud", str(baud), "--ber", repr(ber), "--seed", str(seed)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 20.0)[0]:
            raise RuntimeError("the link simulator did not start")
        info = json.loads(proc.stdout.readline())
        yield Sim(info["a"], info["b"], info["control"])
    finally:
        stop_process(proc)


def bound_for(size: int, baud: int) -> float:
    return MIN_BOUND + BOUND_FACTOR * size / (baud / 10)


# -- the two transfers -----------------------------------------------------------


def run_zmodem(sim: Sim, payload: Path, bound: float) -> Result:
    expected = hashlib.sha256(payload.read_bytes()).digest()
    with tempfile.TemporaryDirectory(prefix="zmodem-rx-") as rx:
        fd_a = os.open(sim.a, os.O_RDWR | os.O_NOCTTY)
        fd_b = os.open(sim.b, os.O_RDWR | os.O_NOCTTY)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            started = time.monotonic()
            procs.append(
                subprocess.Popen(
                    ["rz", "-b", "-y", "-q"],
                    cwd=rx,
                    stdin=fd_b,
                    stdout=fd_b,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            procs.append(
                subprocess.Popen(
                    ["sz", "-b", "-q", str(payload)],
                    stdin=fd_a,
                    stdout=fd_a,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            sz = procs[1]
            try:
                sz_code = sz.wait(bound)
            except subprocess.TimeoutExpired:
                return Result(False, note=f"not done in {bound:.0f} s")
            # sz exits only after rz has answered ZFIN, i.e. after rz has
            # written and closed the whole file: that is the end of the
            # transfer.  rz then waits for sz's "OO" (over and out), which
            # sz's exit flush can discard on a pty (see ZMODEM_ENDING).
            seconds = time.monotonic() - started
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[0].wait(RZ_GRACE)
        finally:
            for proc in procs:
                stop_process(proc)
            os.close(fd_a)
            os.close(fd_b)
        got = Path(rx) / payload.name
        if sz_code != 0:
            return Result(False, seconds=seconds, note=f"sz exit {sz_code}")
        if not got.exists() or hashlib.sha256(got.read_bytes()).digest() != expected:
            return Result(False, seconds=seconds, note="file differs")
        return Result(True, goodput=payload.stat().st_size / seconds, seconds=seconds)


def run_ours(sim: Sim, baud: int, size: int, seed: int, bound: float) -> Result:
    echo = subprocess.Popen(
        optogate("link", "echo", "--port", sim.b, "--baud", str(baud)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        cmd = optogate(
            "link",
            "test",
            "--port",
            sim.a,
            "--baud",
            str(baud),
            "--bytes",
            str(size),
            "--seed",
            str(seed),
            "--json",
        )
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=bound, check=False)
        except subprocess.TimeoutExpired:
            return Result(False, note=f"not done in {bound:.0f} s")
    finally:
        stop_process(echo)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return Result(False, note=f"exit {proc.returncode}: {' '.join(tail)[:80]}")
    report = json.loads(proc.stdout)
    if not report.get("digest_ok"):
        return Result(False, seconds=report.get("seconds"), note="digest mismatch")
    return Result(True, goodput=float(report["goodput_Bps"]), seconds=float(report["seconds"]))


def measure(baud: int, ber: float, size: int, seed: int, ours: bool) -> Row:
    bound = bound_for(size, baud)
    payload_dir = tempfile.mkdtemp(prefix="goodput-")
    try:
        payload = Path(payload_dir) / "payload.bin"
        payload.write_bytes(random.Random(seed).randbytes(size))
        if ours:
            with simulator(baud, ber, seed) as sim:
                our = run_ours(sim, baud, size, seed, bound)
                our.flips = sim.flips()
        else:
            our = Result(False, note="n/a")
        with simulator(baud, ber, seed) as sim:
            zm = run_zmodem(sim, payload, bound)
            zm.flips = sim.flips()
    finally:
        shutil.rmtree(payload_dir, ignore_errors=True)
    return Row(baud, ber, our, zm)


# -- output -------------------------------------------------------------------------

HEADERS = [
    "baud",
    "BER",
    "line B/s",
    "optogate B/s",
    "optogate %",
    "ZMODEM B/s",
    "ZMODEM %",
    "ZMODEM completed",
    "bits flipped (optogate / ZMODEM)",
]


def cells(row: Row) -> list[str]:
    line = row.baud / 10

    def pair(r: Result) -> list[str]:
        if r.completed and r.goodput is not None:
            return [f"{r.goodput:,.0f}", f"{100 * r.goodput / line:.1f}"]
        return [r.note or "failed", "-"]

    return [
        str(row.baud),
        "0" if row.ber == 0 else f"{row.ber:g}",
        f"{line:,.0f}",
        *pair(row.ours),
        *pair(row.zmodem),
        "yes" if row.zmodem.completed else f"no ({row.zmodem.note})",
        f"{_count(row.ours.flips)} / {_count(row.zmodem.flips)}",
    ]


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def print_table(rows: list[Row], markdown: bool) -> None:
    table = [HEADERS, *(cells(r) for r in rows)]
    if markdown:
        print("| " + " | ".join(HEADERS) + " |")
        print("|" + "|".join("---:" for _ in HEADERS) + "|")
        for line in table[1:]:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    for n, line in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def parse_rows(text: str) -> list[tuple[int, float]]:
    rows = []
    for item in text.split(","):
        baud, _, ber = item.partition(":")
        rows.append((int(baud), float(ber or 0)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE} bytes per transfer")
    parser.add_argument("--size", type=int, help="bytes per transfer (default 1 MiB)")
    parser.add_argument(
        "--rows",
        type=parse_rows,
        help="comma-separated BAUD:BER pairs (default: 115200 and 921600 x 0, 1e-6, 1e-5)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for payload and bit errors")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    size = args.size or (QUICK_SIZE if args.quick else FULL_SIZE)
    rows = args.rows or DEFAULT_ROWS
    ensure_lrzsz()
    ours = our_link_available()
    if not ours:
        print("note: `optogate link` is not available; its columns read n/a", file=sys.stderr)
    results = []
    for baud, ber in rows:
        print(f"measuring {baud} baud, BER {ber:g}, {size} bytes ...", file=sys.stderr)
        results.append(measure(baud, ber, size, args.seed, ours))
    print(
        f"{size} bytes per transfer, seed {args.seed}, time bound "
        f"{MIN_BOUND:.0f} s + {BOUND_FACTOR:g} x ideal",
        file=sys.stderr,
    )
    print_table(results, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
