"""Faults on the whole appliance: noise, a cut and a garbage flood on the optical line
during bundle transfers, the outer module SIGKILLed in the middle of a call to central,
the inner module SIGKILLed while a bundle arrives, central down then up, the gateway's
modem BUSY twice, a tampered bundle.

Each appliance (internet path, so that no dial delay dominates, except for the modem
test) takes several faults in turn; each fault hits a service that is not built yet,
so a bundle really crosses the line while it happens.  Every call must end with the
right answer; the supervisor must report a killed process as a death and start it
again on request.
"""

from __future__ import annotations

import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from host_tools.client import CallResult, Client, GatewayError, Unavailable
from host_tools.demo import Appliance, DemoError, appliance, link_command
from host_tools.tour import SAMPLE_DOCUMENT, SAMPLE_DXF, fresh_outer_status

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


#: Start (~20 s), four cold calls with faults (~60 s), stop; room for a loaded machine.
BOUND_S = 360
#: Bit-error rate during the noisy transfer: the 38 KiB dxf2svg bundle is
#: about 310,000 bits, so 2e-5 damages a handful of frames, each retransmitted.
NOISE_BER = 2e-5
#: A garbage flood: one bit in fifty damaged, for long enough that the
#: session's keepalive gives up (4 s) and the link must come back by itself.
FLOOD_BER = 0.02
FLOOD_S = 6.0
#: Bytes beyond the keepalives that show a bundle is crossing the line.
BUNDLE_UNDER_WAY = 3000


def _stats(app: Appliance) -> dict[str, Any]:
    reply = link_command(app.control, {"cmd": "stats"})
    stats = reply["stats"]
    assert isinstance(stats, dict)
    return stats


def _flipped(app: Appliance) -> int:
    stats = _stats(app)
    return sum(int(stats[d]["bits_flipped"]) for d in ("a->b", "b->a"))


def _in_background(fn: Callable[[], CallResult]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as e:  # the test thread re-raises it
            box.append(e)

    thread = threading.Thread(target=run, name="e2e-call")
    thread.start()
    return thread, box


def _result(thread: threading.Thread, box: list[Any], limit: float) -> CallResult:
    thread.join(limit)
    assert not thread.is_alive(), "the call did not end"
    (outcome,) = box
    if isinstance(outcome, Exception):
        raise outcome
    assert isinstance(outcome, CallResult)
    return outcome


def _wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.timeout(BOUND_S)
def test_noise_cut_outer_killed_and_central_down() -> None:
    with appliance(internet=True, expiring_after_s=None) as app:
        sup = app.supervisor
        assert sup is not None

        def client(max_wait: float = 180) -> Client:
            return Client(app.url, app.api_key, app.ca_file, max_wait=max_wait, timeout=300)

        # 1. Noise on the optical line while the dxf2svg bundle crosses it.
        link_command(app.control, {"cmd": "set", "ber": NOISE_BER})
        with client() as gw:
            svg = gw.call("dxf2svg", {}, SAMPLE_DXF)
        link_command(app.control, {"cmd": "set", "ber": 0.0})
        assert svg.result["entities"] == {"CIRCLE": 1, "LINE": 4}
        assert _flipped(app) > 0  # the line really was noisy

        # 2. The line cut for 3 s while doc-encrypt is being fetched.
        def encrypt() -> CallResult:
            with client() as gw:
                return gw.call("doc-encrypt", {"op": "encrypt", "password": "pw"}, SAMPLE_DOCUMENT)

        delivered = int(_stats(app)["a->b"]["bytes_delivered"])
        thread, box = _in_background(encrypt)
        # The bundle flows outer -> inner (a -> b); keepalives are a few bytes a
        # second, so this many more bytes means the bundle is on the line.
        _wait_for(
            lambda: int(_stats(app)["a->b"]["bytes_delivered"]) > delivered + BUNDLE_UNDER_WAY,
            60,
            "the doc-encrypt bundle never started across the line",
        )
        link_command(app.control, {"cmd": "cut"})
        time.sleep(3)
        link_command(app.control, {"cmd": "restore"})
        sealed = _result(thread, box, 240)
        assert sealed.data.startswith(b"OGDE")
        assert int(_stats(app)["a->b"]["lost_cut"]) + int(_stats(app)["b->a"]["lost_cut"]) > 0

        # 3. The outer module SIGKILLed while it fetches polyline-simplify from central.
        outer = sup.processes["outer"]
        polyline = [(0.0, 0.0), (1.0, 0.01), (2.0, -0.01), (3.0, 5.0), (4.0, 6.0), (5.0, 7.0)]
        points = b"".join(struct.pack("<dd", *p) for p in polyline)

        def simplify() -> CallResult:
            with client() as gw:
                return gw.call("polyline-simplify", {"epsilon": 0.1}, points)

        thread, box = _in_background(simplify)
        _wait_for(
            lambda: outer.last_event.startswith(("connecting", "call_up", "fetched")),
            60,
            "the outer module never called central",
        )
        sup.kill("outer")
        sup.wait_exit("outer", 10)
        assert outer.state == "died"
        assert [d.name for d in sup.deaths] == ["outer"]
        sup.restart("outer")
        done = _result(thread, box, 240)
        assert done.result == {"points_in": 6, "points_out": 4}

        # 4. Central down: an unbuilt service answers 503 with Retry-After; central
        #    back on the same address: the same call succeeds.
        sup.stop("central")
        with pytest.raises(Unavailable) as refused, client(max_wait=0) as gw:
            gw.call("echo", {"text": "x"}, b"x")
        assert refused.value.status == 503 and refused.value.retry_after is not None
        sup.restart("central")
        with client() as gw:
            echoed = gw.call("echo", {"text": "x"}, b"x")
        assert echoed.data == b"x"
        assert [d.name for d in sup.deaths] == ["outer"]  # nothing else died


@pytest.mark.timeout(BOUND_S)
def test_modem_busy_twice_then_the_call_goes_through() -> None:
    with appliance(modem_busy=2, expiring_after_s=None) as app:
        with Client(app.url, app.api_key, app.ca_file, max_wait=240, timeout=300) as gw:
            svg = gw.call("dxf2svg", {}, SAMPLE_DXF)
        assert svg.result["entities"] == {"CIRCLE": 1, "LINE": 4}
        status = fresh_outer_status(app, time.time())
        # Both dials of the first connect met BUSY; a later connect got through.
        assert status["uplink.connect_failures_dialup"] >= 1, status
        assert status["uplink.calls_dialup"] >= 1, status
        log = (app.state_dir / "logs" / "outer.log").read_text().splitlines()
        busy = [line for line in log if "modem_" in line and "Busy" in line]
        assert len(busy) >= 2, busy
        assert app.supervisor is not None and app.supervisor.deaths == []


@pytest.mark.timeout(BOUND_S)
def test_inner_killed_mid_transfer_garbage_flood_and_a_tampered_bundle() -> None:
    with appliance(internet=True, expiring_after_s=None) as app:
        sup = app.supervisor
        assert sup is not None

        def client(max_wait: float = 180) -> Client:
            return Client(app.url, app.api_key, app.ca_file, max_wait=max_wait, timeout=300)

        def convert() -> CallResult:
            with client() as gw:
                return gw.call("dxf2svg", {}, SAMPLE_DXF)

        # 1. The inner module SIGKILLed while the dxf2svg bundle crosses the line
        #    (and while it writes what arrived): it starts again from what it
        #    had committed and builds the service on the next call.
        delivered = int(_stats(app)["a->b"]["bytes_delivered"])
        thread, box = _in_background(convert)
        _wait_for(
            lambda: int(_stats(app)["a->b"]["bytes_delivered"]) > delivered + BUNDLE_UNDER_WAY,
            60,
            "the dxf2svg bundle never started across the line",
        )
        sup.kill("inner")
        thread.join(60)
        assert not thread.is_alive()
        assert isinstance(box[0], GatewayError)  # the caller's connection died with it
        sup.wait_exit("inner", 10)
        assert [(d.name, d.exit_code) for d in sup.deaths] == [("inner", -signal.SIGKILL)]
        sup.restart("inner")
        assert convert().result["entities"] == {"CIRCLE": 1, "LINE": 4}

        # 2. A flood of garbage on the optical line (every few bytes damaged) while
        #    doc-encrypt is fetched: the session drops what fails its CRC, goes
        #    down, and comes back when the line is clean; the call gets through.
        def encrypt() -> CallResult:
            with client() as gw:
                return gw.call("doc-encrypt", {"op": "encrypt", "password": "pw"}, SAMPLE_DOCUMENT)

        thread, box = _in_background(encrypt)
        link_command(app.control, {"cmd": "set", "ber": FLOOD_BER})
        time.sleep(FLOOD_S)
        link_command(app.control, {"cmd": "set", "ber": 0.0})
        assert _result(thread, box, 240).data.startswith(b"OGDE")

        # 3. A tampered bundle is refused by central; the gateway keeps serving.
        good = (app.state_dir / "bundles" / "echo.ogb").read_bytes()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01
        (app.state_dir / "bundles" / "echo-tampered.ogb").write_bytes(bytes(bad))
        with pytest.raises(DemoError, match="publish"):
            app.command(
                "central", "--config", str(app.central_config), "service", "publish",
                "bundles/echo-tampered.ogb",
            )  # fmt: skip
        with client() as gw:
            assert gw.call("echo", {"text": "y"}, b"y").data == b"y"
        assert [d.name for d in sup.deaths] == ["inner"]  # nothing else died
