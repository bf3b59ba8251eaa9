"""The protocol-break isolator's cost: link goodput with and without it, and its CPU speed.

1. **Goodput.**  For each run, a fresh ``optogate sim link --baud BAUD`` (with
   and without ``--isolator``, alternating so machine load hits both alike),
   ``optogate link echo`` on side a (outer, server) and ``optogate link test
   --bytes N --json`` on side b (inner, client).  The table gives each run's
   goodput, retransmissions and timeouts, the isolator's forwarded and dropped
   frames (from the simulator's control socket), and the mean of each mode.
2. **CPU.**  :class:`~firmware.isolator.simbox.IsolatorMiddlebox` alone, with
   the C-accelerated codec and with the pure-Python one the board runs, on a
   stream of full 4 KiB frames: megabytes per second of input it filters.

Usage::

    .venv/bin/python bench/isolator_goodput.py [--baud 1000000] [--bytes 2097152] [--runs 2]
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from firmware.common.link.kinds import Kind
from firmware.isolator import suite
from firmware.isolator.simbox import IsolatorMiddlebox

OPTOGATE = str(Path(sys.executable).with_name("optogate"))
#: Seconds for the simulator to print its ptys and for the link to come up.
START_TIMEOUT = 10.0
#: Bound on one transfer: generous against a loaded machine.
TRANSFER_TIMEOUT = 300.0


def sim_stats(control: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(START_TIMEOUT)
        s.connect(control)
        s.sendall(b'{"cmd": "stats"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)["stats"]


def one_run(baud: int, nbytes: int, isolator: bool) -> dict:
    sim = subprocess.Popen(
        [OPTOGATE, "sim", "link", "--baud", str(baud), *(["--isolator"] if isolator else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    echo = None
    try:
        assert sim.stdout is not None
        ports = json.loads(sim.stdout.readline())
        echo = subprocess.Popen(
            [OPTOGATE, "link", "echo", "--port", ports["a"], "--baud", str(baud)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cmd = [OPTOGATE, "link", "test", "--port", ports["b"], "--baud", str(baud), "--json"]
        test = subprocess.run(
            [*cmd, "--bytes", str(nbytes)],
            capture_output=True,
            text=True,
            timeout=TRANSFER_TIMEOUT,
            check=False,
        )
        report = json.loads(test.stdout.strip().splitlines()[-1])
        report["middlebox"] = sim_stats(ports["control"]).get("middlebox")
        return report
    finally:
        for proc in (echo, sim):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=START_TIMEOUT)


def cpu_speed(fast: bool, seconds: float = 2.0) -> float:
    box = IsolatorMiddlebox(fast=fast, clock=lambda: 0.0)
    payload = bytes(range(256)) * 16
    frame = suite.data_frame(Kind.SERVICE, "a->b", payload[:4088], msg_len=1 << 26, flags=0)
    fed = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        # a fresh box every 10 frames keeps the byte budget out of the way
        if fed % (10 * len(frame)) == 0:
            box = IsolatorMiddlebox(fast=fast, clock=lambda: 0.0)
        assert box.process("a->b", frame) == frame
        fed += len(frame)
    return fed / (time.perf_counter() - start) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baud", type=int, default=1_000_000)
    parser.add_argument("--bytes", type=int, default=2 * 2**20)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    print(f"goodput at {args.baud} baud, {args.bytes} bytes per run")
    print(
        f"{'mode':<10}{'goodput B/s':>14}{'fraction':>10}{'retx':>6}{'rto':>5}{'fwd':>7}{'drop':>6}"
    )
    results: dict[str, list[float]] = {"plain": [], "isolator": []}
    for _ in range(args.runs):
        for mode in ("plain", "isolator"):
            r = one_run(args.baud, args.bytes, mode == "isolator")
            if not r.get("digest_ok"):
                print(f"{mode:<10} FAILED: {r}")
                return 1
            results[mode].append(r["goodput_Bps"])
            mb = r["middlebox"] or {}
            fwd = sum(c["frames_out"] for c in mb.values()) if mb else "-"
            drop = (
                sum(v for c in mb.values() for k, v in c.items() if k.startswith("dropped_"))
                if mb
                else "-"
            )
            c = r["counters"]
            print(
                f"{mode:<10}{r['goodput_Bps']:>14.1f}{r['fraction']:>10.4f}"
                f"{c['retransmits']:>6}{c['timeouts']:>5}{fwd:>7}  {drop}"
            )
    plain = statistics.mean(results["plain"])
    iso = statistics.mean(results["isolator"])
    print(f"mean plain {plain:.1f} B/s, isolator {iso:.1f} B/s: {100 * (iso / plain - 1):+.2f} %")
    print()
    print("middlebox CPU speed on full 4 KiB frames (CPython)")
    print(f"  C-accelerated codec: {cpu_speed(True):7.2f} MB/s")
    print(f"  pure-Python codec:   {cpu_speed(False):7.2f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
