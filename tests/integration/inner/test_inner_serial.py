"""The inner daemon on a serial port: the link simulator's ptys and power switches.

``optogate sim link``'s simulator (in-process here) joins two ptys at 115200
baud; the scripted central peer serves the outer module's side ``a`` through
the real pyserial adapter, the daemon opens side ``b`` as it would open
/dev/serial0, and its sim GPIO backend follows the simulator's power state.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import httpx
import pytest
from inner_testbed import (
    CentralPeer,
    DaemonRunner,
    algo_bundle,
    generate_api_key,
    provisioned,
    ssl_context,
)

from firmware.common.adapters.serial import open_serial
from firmware.common.errors import OptogateError
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from host_tools.sim.link import LinkSimulator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]


async def test_serial_link_build_offline_and_back() -> None:
    control = Path(tempfile.mkdtemp(prefix="og-sim-")) / "control.sock"
    try:
        async with LinkSimulator(baud=115200, control_path=control) as sim:
            link = f'transport = "serial"\ndevice = "{sim.b_path}"\nbaud = 115200'
            extra = f'[gpio]\nbackend = "sim"\ndebounce_ms = 10\n\n[sim]\ncontrol = "{control}"\n'
            with provisioned(0, extra=extra, link=link) as gw:
                peer = CentralPeer(gw)
                key = generate_api_key()
                for name in ("algo", "later"):
                    peer.publish(algo_bundle(name, 1))
                    peer.grant(name, key, lic_id=f"L-{name}")
                outer = Link(await open_serial(sim.a_path, 115200), SessionConfig(role=Role.SERVER))
                serving = asyncio.ensure_future(outer.serve(peer.handle))
                daemon = DaemonRunner(gw)
                try:
                    await daemon.start()
                    await daemon.wait_for(lambda: daemon.daemon.trust.licences is not None, 30)
                    h = {"Authorization": f"Bearer {key.secret}"}
                    async with httpx.AsyncClient(
                        base_url=daemon.url, verify=ssl_context(gw), timeout=60
                    ) as http:
                        r = await http.post("/v1/services/algo/call", json={"text": "t"}, headers=h)
                        assert r.status_code == 200, r.text
                        sim.power("a", False)  # the outer module's supply goes
                        await daemon.wait_for(lambda: not daemon.daemon.upstream.peer_powered)
                        r = await http.post("/v1/services/later/call", json={}, headers=h)
                        assert r.status_code == 503
                        r = await http.post("/v1/services/algo/call", json={}, headers=h)
                        assert r.status_code == 200
                        syncs = peer.counts["sync"]
                        sim.power("a", True)
                        await daemon.wait_for(lambda: peer.counts["sync"] > syncs, 30)
                        await daemon.wait_for(lambda: peer.counts.get("usage", 0) > 0, 30)
                        assert len(peer.records()) == 2
                        r = await http.post("/v1/services/later/call", json={}, headers=h)
                        assert r.status_code == 200
                finally:
                    await daemon.stop()
                    serving.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OptogateError):
                        await serving
                    with contextlib.suppress(OptogateError):
                        await outer.aclose()
    finally:
        with contextlib.suppress(OSError):
            control.unlink()
        with contextlib.suppress(OSError):
            control.parent.rmdir()
