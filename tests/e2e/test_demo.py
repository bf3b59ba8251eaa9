"""The whole appliance, as ``optogate demo`` launches it: the tour, the internet path, Ctrl-C.

Each test provisions and starts its own appliance (central, modem emulators,
link simulator, outer and inner modules, each a real process) in a fresh
temporary state directory and stops all of it before it ends; the process
groups the supervisor makes are killed whole, so the algorithm workers go
too.  Nothing is faked: the keys, the dial-up calls through the emulated
modems, the sealed bundles and the licences are the real ones.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host_tools.client import Client
from host_tools.demo import (
    CUSTOMER,
    EXPIRING_SERVICE,
    Appliance,
    appliance,
)
from host_tools.tour import SAMPLE_DXF, STEPS, outer_status, walk

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


#: The tour takes about 40 s on an idle two-core machine, plus 20 s to start
#: and 25 s to stop; the bound leaves room for a loaded one.
TOUR_BOUND_S = 420
#: The usage journal ships when the link comes back up; allow a dial-up call.
USAGE_SHIPPED_S = 60
#: One appliance started, one cold call, stopped.
SHORT_BOUND_S = 240


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _usage(app: Appliance) -> dict[str, int]:
    month = time.strftime("%Y-%m", time.gmtime())
    out = app.command("central", "--config", str(app.central_config), "usage", "report",
                      "--customer", CUSTOMER, "--month", month, "--csv")  # fmt: skip
    calls: dict[str, int] = {}
    for row in list(csv.DictReader(io.StringIO(out))):
        calls[row["service"]] = calls.get(row["service"], 0) + int(row["calls"])
    return calls


def _usage_once_shipped(app: Appliance) -> dict[str, int]:
    """Return central's usage once the calls before the power cut have arrived (or at 60 s)."""
    deadline = time.monotonic() + USAGE_SHIPPED_S
    while True:
        calls = _usage(app)
        if calls.get("dxf2svg", 0) >= 3 or time.monotonic() > deadline:
            return calls
        time.sleep(1.0)


@pytest.mark.timeout(TOUR_BOUND_S)
def test_tour_every_step_behaves() -> None:
    with appliance() as app:
        results = walk(app)
        usage = _usage_once_shipped(app) if all(r.ok for r in results) else {}
        central_log = (app.state_dir / "logs" / "central.log").read_text().splitlines()
        fetches = [json.loads(line).get("service") for line in central_log if '"fetch"' in line]
        sup = app.supervisor
        assert sup is not None
        pids = [m.pid for m in sup.processes.values()]
        outer_restarts = sup.processes["outer"].restarts
        deaths = list(sup.deaths)
    killed = [name for name, m in sup.processes.items() if m.killed]
    report = "\n".join(f"{r.name}: {r.ok} {r.seconds:.1f} s {r.detail}" for r in results)
    assert [r.name for r in results] == [title for title, _ in STEPS], report
    cold, warm, doc, expired, payment, paid, cut, back = results
    assert cold.ok, report
    assert "CONNECT 33600" in cold.detail, report  # the first call dialled central
    assert warm.ok, report
    assert doc.ok, report
    assert "same bytes" in doc.detail
    assert expired.ok, report
    assert "402 payment_required" in expired.detail
    assert f"for {EXPIRING_SERVICE} expired" in expired.detail
    assert payment.ok, report
    assert re.search(r"payment \S+ recorded: licence \S+ valid until", payment.detail)
    assert paid.ok, report
    assert cut.ok, report
    assert "exit 3" in cut.detail and "503 unavailable, Retry-After" in cut.detail
    assert back.ok, report
    assert "polyline-simplify built and answered" in back.detail
    # Only the cold call fetched dxf2svg: the warm one and the one during the
    # power cut were answered by the built service.
    assert fetches.count("dxf2svg") == 1, fetches
    assert outer_restarts == 1  # booted once when its power returned
    # Every call that ran before the power cycle is billed exactly once (the
    # inner module ships its journal when the link comes back up).
    assert usage.get("dxf2svg") == 3, usage
    assert usage.get("doc-encrypt") == 2, usage
    assert usage.get(EXPIRING_SERVICE) == 1, usage
    assert usage.get("polyline-simplify", 0) in (0, 1), usage
    assert deaths == [], f"processes died during the tour: {deaths}"
    assert killed == [], f"did not stop on SIGTERM within their grace: {killed}"
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.timeout(SHORT_BOUND_S)
def test_internet_path_and_a_death_is_reported() -> None:
    with appliance(internet=True) as app:
        sup = app.supervisor
        assert sup is not None
        assert "modem-central" not in sup.processes
        with Client(app.url, app.api_key, app.ca_file, max_wait=120) as gw:
            out = gw.call("dxf2svg", {}, SAMPLE_DXF)
            assert out.result["entities"] == {"CIRCLE": 1, "LINE": 4}
        deadline = time.monotonic() + 10
        while outer_status(app).get("last_call.transport") != "internet":
            assert time.monotonic() < deadline, outer_status(app)
            time.sleep(0.2)
        inner = sup.processes["inner"]
        sup.kill("inner")
        sup.wait_exit("inner", 10)
        assert inner.state == "died"
        assert [(d.name, d.exit_code) for d in sup.deaths] == [("inner", -signal.SIGKILL)]
        assert sup.processes["outer"].alive() and sup.processes["central"].alive()


def _read_until(demo: subprocess.Popen[str], seen: list[str], marker: str) -> None:
    assert demo.stdout is not None
    for line in demo.stdout:
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"the demo ended before printing {marker!r}: {''.join(seen)}")


@pytest.mark.timeout(SHORT_BOUND_S)
def test_the_command_prints_how_to_call_it_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "demo", "--internet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    seen: list[str] = []
    pids: list[int] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("running; stop with Ctrl-C"):
                break
        text = "".join(seen)
        pids = [int(p) for p in re.findall(r"running\s+pid (\d+)", text)]
        assert len(pids) == 4, text  # central, link, outer, inner
        url = re.search(r"LAN API\s+(https://\S+)", text)
        ca = re.search(r"CA file\s+(\S+)", text)
        key = re.search(r"API key\s+(og_live_\S+)", text)
        assert url and ca and key, text
        (tmp_path / "drawing.dxf").write_bytes(SAMPLE_DXF)
        env = {
            **os.environ,
            "OPTOGATE_URL": url.group(1),
            "OPTOGATE_CA": ca.group(1),
            "OPTOGATE_API_KEY": key.group(1),
        }
        call = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", "call", "dxf2svg",
             "--input", str(tmp_path / "drawing.dxf"), "--output", str(tmp_path / "d.svg"),
             "--json"],
            env=env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert call.returncode == 0, call.stdout + call.stderr
        assert json.loads(call.stdout)["ok"] is True
        assert b"<svg" in (tmp_path / "d.svg").read_bytes()
        # The link simulator through the demo's own command: stats, then the
        # outer module's power off (it powers off) and on (it boots again).
        state = re.search(r"state\s+(\S+)", text)
        assert state, text

        def send(command: str) -> dict[str, object]:
            done = subprocess.run(
                [sys.executable, "-m", "host_tools.cli", "demo", "--state", state.group(1),
                 "--send", command],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            assert reply["ok"] is True
            return dict(reply)

        assert send('{"cmd": "stats"}')["stats"]
        send('{"cmd": "power", "side": "a", "on": false}')
        _read_until(demo, seen, "powered off")
        send('{"cmd": "power", "side": "a", "on": true}')
        _read_until(demo, seen, "running (restart 1)")
        pids = sorted({int(p) for p in re.findall(r"pid (\d+)", "".join(seen))})
        assert len(pids) == 5  # four first, and the outer module booted again
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=90)
        assert demo.returncode == 0, "".join(seen) + rest
        assert "stopping every process" in rest
        assert not any(_alive(pid) for pid in pids)
    finally:
        if demo.poll() is None:
            # The demo's processes are in groups of their own: kill them too.
            for pid in [demo.pid, *pids]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
