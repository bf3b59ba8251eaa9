"""Offline operation and power: the outer module off, its power line, our own power failing.

The power lines come from a scripted link-simulator control socket speaking
the watch protocol of ``firmware.common.power.simlink`` (side ``a`` is the
outer module, ``b`` the inner one); the daemon's real SimGpio backend,
debounce and PowerWatcher turn them into events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator

import httpx
import pytest
from inner_testbed import (
    CentralPeer,
    DaemonRunner,
    algo_bundle,
    free_port,
    generate_api_key,
    provisioned,
    ssl_context,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class PowerSim:
    """The simulator's control socket: streams power states to watchers."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="og-power-")
        self.path = os.path.join(self.dir, "control.sock")
        self.state = {"a": True, "b": True}
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # {"cmd": "watch"}
            self._writers.append(writer)
            for side, on in self.state.items():
                writer.write(
                    json.dumps({"event": "power", "side": side, "on": on}).encode() + b"\n"
                )
            await writer.drain()
            with contextlib.suppress(OSError):
                await reader.read()

        self._server = await asyncio.start_unix_server(on_client, self.path)

    async def set(self, side: str, on: bool) -> None:
        self.state[side] = on
        for w in self._writers:
            w.write(json.dumps({"event": "power", "side": side, "on": on}).encode() + b"\n")
            with contextlib.suppress(OSError):
                await w.drain()

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


async def call(http: httpx.AsyncClient, key: str, service: str, **params: object) -> httpx.Response:
    return await http.post(
        f"/v1/services/{service}/call",
        json=params,
        headers={"Authorization": f"Bearer {key}"},
    )


@pytest.fixture
async def powered() -> AsyncIterator[
    tuple[PowerSim, CentralPeer, DaemonRunner, str, httpx.AsyncClient]
]:
    sim = PowerSim()
    await sim.start()
    link_port = free_port()
    extra = f'[gpio]\nbackend = "sim"\ndebounce_ms = 10\n\n[sim]\ncontrol = "{sim.path}"\n'
    with provisioned(link_port, extra=extra) as gw:
        peer = CentralPeer(gw)
        key = generate_api_key()
        for name in ("algo", "later"):
            peer.publish(algo_bundle(name, 1))
            peer.grant(name, key, lic_id=f"L-{name}")
        await peer.start(link_port)
        daemon = DaemonRunner(gw)
        try:
            await daemon.start()
            await daemon.wait_for(lambda: daemon.daemon.trust.licences is not None)
            async with httpx.AsyncClient(
                base_url=daemon.url, verify=ssl_context(gw), timeout=20
            ) as http:
                yield sim, peer, daemon, key.secret, http
        finally:
            if daemon.task is not None and not daemon.task.done():
                await daemon.stop()
            await peer.stop()
            await sim.stop()


async def test_peer_power_loss_forces_the_link_down_and_built_services_keep_serving(
    powered: tuple[PowerSim, CentralPeer, DaemonRunner, str, httpx.AsyncClient],
) -> None:
    sim, peer, daemon, key, http = powered
    assert (await call(http, key, "algo")).status_code == 200  # built
    await call(http, key, "algo", mode="refuse")
    await sim.set("a", False)  # the outer module loses power
    await daemon.wait_for(lambda: not daemon.daemon.upstream.peer_powered)
    assert not daemon.daemon.upstream.connected
    assert (await http.get("/v1/health")).json()["link"] == "down"
    fetches = peer.counts.get("fetch", 0)
    r = await call(http, key, "later")  # not built: 503 at once, nothing asked
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"
    assert int(r.headers["Retry-After"]) >= 1
    assert peer.counts.get("fetch", 0) == fetches
    for _ in range(5):
        assert (await call(http, key, "algo")).status_code == 200
    # power back: handshake, then sync and usage shipment without being asked
    syncs, usage = peer.counts["sync"], peer.counts.get("usage", 0)
    await sim.set("a", True)
    await daemon.wait_for(lambda: peer.counts.get("usage", 0) > usage, timeout=15)
    assert peer.counts["sync"] > syncs
    assert len(peer.records()) == 7
    assert (await call(http, key, "later")).status_code == 200


async def test_outer_module_gone_entirely(
    powered: tuple[PowerSim, CentralPeer, DaemonRunner, str, httpx.AsyncClient],
) -> None:
    _, peer, daemon, key, http = powered
    assert (await call(http, key, "algo")).status_code == 200
    await peer.stop()  # no process at the other end at all
    await daemon.wait_for(lambda: not daemon.daemon.upstream.connected)
    assert (await call(http, key, "algo")).status_code == 200
    assert (await call(http, key, "later")).status_code == 503
    await peer.start()
    await daemon.wait_for(lambda: daemon.daemon.upstream.connected, timeout=15)
    assert (await call(http, key, "later")).status_code == 200


async def test_own_power_failing_finishes_work_and_exits_75(
    powered: tuple[PowerSim, CentralPeer, DaemonRunner, str, httpx.AsyncClient],
) -> None:
    sim, _, daemon, key, http = powered
    assert (await call(http, key, "algo")).status_code == 200
    slow = asyncio.ensure_future(call(http, key, "algo", mode="sleep", seconds=0.3))
    await asyncio.sleep(0.1)
    await sim.set("b", False)
    assert daemon.task is not None
    async with asyncio.timeout(15):
        code = await daemon.task
    assert code == 75
    assert (await slow).status_code == 200  # the call in flight was finished
    assert daemon.events("own_power_failing")
    entries = daemon.gw.state / "usage"
    size = sum(p.stat().st_size for p in entries.glob("seg-*.log"))
    assert size > 0  # both records are on disk
