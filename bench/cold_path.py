"""Time to the first result of a service the inner module has never seen, over dial-up.

The whole appliance runs as in ``make demo`` (central behind an answering
modem emulator, the gateway's modem emulator at 33,600 bit/s with a set dial
delay, the outer module, the optical link simulator at 115200 baud, the inner
module), each a separate process.  With the line idle (no call up), one
``dxf2svg`` call goes out: the inner module asks the outer module, which
dials, authenticates, fetches the sealed bundle and licence and passes the
bundle on over the optical link as it arrives; the inner module verifies,
installs, starts a worker and computes.  That time is compared with its lower
bound::

    dial delay + sealed bundle bytes at the modem rate + compute time

where the compute time is the median of warm calls of the same input (the
whole LAN round trip, TLS included, which a cold call pays too).  The modem
rate is 33,600 bit/s with 10 bits per byte (8N1, as the emulator paces).  A
relay that stored the bundle and then forwarded it would pay, on top of
everything here, the bundle once more at the optical rate (``optical_s``).

Usage::

    .venv/bin/python bench/cold_path.py [--dial-delay 10] [--runs 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host_tools.demo import MODEM_SPEED, OPTICAL_BAUD, Appliance, appliance  # noqa: E402
from host_tools.tour import SAMPLE_DXF, client, outer_status  # noqa: E402

SERVICE = "dxf2svg"
PARAMS = {"precision": 2}
BITS_PER_BYTE = 10  # 8N1
IDLE_WAIT_S = 120.0
WARM_CALLS = 7


def wait_line_idle(app: Appliance) -> None:
    """Wait until the outer module has no call up and nothing pending (start-up sync done)."""
    deadline = time.monotonic() + IDLE_WAIT_S
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        status = outer_status(app)
        idle = status.get("uplink.state") == "idle" and not status.get("uplink.pending")
        if idle and int(status.get("uplink.calls", 0)) >= 1:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 2.0:
                return
        else:
            quiet_since = None
        time.sleep(0.2)
    raise SystemExit("the outer module's line never went idle")


def sealed_bundle_bytes(app: Appliance) -> int:
    """Return the size of the sealed bundle the outer module fetched (from its cache)."""
    cache = app.state_dir / "outer" / "cache"
    index = json.loads((cache / "index.json").read_text())
    digest = index["services"][SERVICE]["bundle"]
    return (cache / "objects" / digest).stat().st_size


def one_run(dial_delay: float) -> dict[str, float]:
    with appliance(dial_delay=dial_delay) as app:
        wait_line_idle(app)
        with client(app) as gw:
            started = time.monotonic()
            out = gw.call(SERVICE, PARAMS, SAMPLE_DXF)
            cold = time.monotonic() - started
            if b"<svg" not in out.data:
                raise SystemExit(f"{SERVICE} answered {out.result}")
            warm = []
            for _ in range(WARM_CALLS):
                t0 = time.monotonic()
                gw.call(SERVICE, PARAMS, SAMPLE_DXF)
                warm.append(time.monotonic() - t0)
        nbytes = sealed_bundle_bytes(app)
    compute = statistics.median(warm)
    modem_s = nbytes * BITS_PER_BYTE / MODEM_SPEED
    optical_s = nbytes * BITS_PER_BYTE / OPTICAL_BAUD
    bound = dial_delay + modem_s + compute
    return {
        "cold_s": cold,
        "bound_s": bound,
        "ratio": cold / bound,
        "bundle_bytes": nbytes,
        "modem_s": modem_s,
        "optical_s": optical_s,
        "compute_s": compute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dial-delay", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print a table row per run")
    args = parser.parse_args()
    rows = [one_run(args.dial_delay) for _ in range(args.runs)]
    for r in rows:
        if args.markdown:
            print(
                f"| {args.dial_delay:g} s | {r['bundle_bytes']:,.0f} B | {r['modem_s']:.2f} s"
                f" | {r['compute_s'] * 1000:.0f} ms | {r['bound_s']:.2f} s | {r['cold_s']:.2f} s"
                f" | {r['ratio']:.3f} |"
            )
        else:
            print(json.dumps({k: round(v, 4) for k, v in r.items()}))
    ratios = [r["ratio"] for r in rows]
    print(
        f"median ratio {statistics.median(ratios):.3f} (target <= 1.25) over {len(rows)} runs",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
