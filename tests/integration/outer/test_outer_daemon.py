"""The outer daemon end to end: an inner-module CLIENT link on one side, a real central peer
on the other, the relay's allowlist, cache, typed errors and the power lines in between."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from outer_central_peer import LICENCE_VERSION, CentralPeer, Keys

from firmware.common.adapters.serial import open_serial
from firmware.common.adapters.tcp import StreamTransport, connect_tcp
from firmware.common.errors import LinkDown, OptogateError, RemoteError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from firmware.common.power.sim import SimGpio
from firmware.outer.app import EXIT_FAILURE, EXIT_POWER, OuterDaemon
from firmware.outer.cache import digest_of
from firmware.outer.config import parse_config
from host_tools.sim.hayes import HayesConfig
from host_tools.sim.link import LinkSimulator
from host_tools.sim.modem import ModemEmulator

pytestmark = [pytest.mark.integration]


def config_doc(tmp: Path, peer: CentralPeer, ca: Path, **uplink: object) -> dict[str, Any]:
    return {
        "gateway": {"keys_dir": str(tmp / "outer"), "state_dir": str(tmp / "state")},
        "optical": {"transport": "tcp", "listen": "127.0.0.1:0"},
        "uplink": {
            "order": ["internet"],
            "sync_at_start": False,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 0.5,
            "connect_timeout_s": 5.0,
            "request_timeout_s": 10.0,
            **uplink,
        },
        "internet": {"host": "127.0.0.1", "port": peer.tls_port, "ca": str(ca)},
    }


async def until(predicate: Callable[[], bool], limit: float) -> None:
    async with asyncio.timeout(limit):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


@dataclass
class Outer:
    daemon: OuterDaemon
    task: asyncio.Task[int]
    peer: CentralPeer
    keys: Keys
    gpio: SimGpio
    tmp: Path

    async def inner(self, wrap: Callable[[StreamTransport], Any] | None = None) -> Link:
        host, port = self.daemon.optical_address.rsplit(":", 1)
        transport: Any = await connect_tcp(host, int(port))
        if wrap is not None:
            transport = wrap(transport)
        link = Link(transport, SessionConfig(role=Role.CLIENT, baud=None))
        await link.wait_up(5.0)
        return link


@contextlib.asynccontextmanager
async def outer_daemon(tmp_path: Path, **uplink: object) -> AsyncIterator[Outer]:
    keys = Keys()
    tls = keys.write_tls(tmp_path / "tls")
    keys.write_outer_dir(tmp_path / "outer")
    peer = await CentralPeer(keys, tls, bundle_size=4000).start()
    doc = config_doc(tmp_path, peer, tls[0], **uplink)
    gpio = SimGpio()
    gpio.pin(17).drive(False)  # the inner module is powered (active low)
    gpio.pin(27).drive(True)  # our own supply is good
    config = parse_config(doc, tmp_path)
    daemon = OuterDaemon(config, backend=gpio)
    task = asyncio.create_task(daemon.run())
    try:
        await until(lambda: bool(daemon.optical_address) or task.done(), 5)
        assert not task.done(), "the daemon did not start"
        yield Outer(daemon, task, peer, keys, gpio, tmp_path)
    finally:
        if not task.done():
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
        await peer.aclose()


async def close(link: Link) -> None:
    with contextlib.suppress(OptogateError):
        await link.aclose()


@pytest.mark.timeout(30)
async def test_relay_refuses_requests_outside_the_allowlist(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner()
        try:
            for msg in (
                m.AuthBegin(gateway_id="gw-test"),
                m.AuthProof(signature=b"x"),
                m.LinkEcho(nonce=b"n", sent_at=0.0),
            ):
                with pytest.raises(RemoteError) as info:
                    await inner.request(msg, timeout=5)
                assert info.value.code == "not_allowed"
            status = await inner.request(m.Status(), timeout=5, expect=m.StatusReport)
            assert status.fields["relay.refused"] == 3
            assert outer.peer.kinds() == []  # nothing reached central
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_second_daemon_on_the_same_state_refuses_to_start(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        logged: list[str] = []
        second = OuterDaemon(outer.daemon.config, log=lambda event, **_: logged.append(event))
        assert await second.run() == EXIT_FAILURE
        assert logged == ["startup_failed"]
        assert not outer.task.done()


@pytest.mark.timeout(30)
async def test_repeated_fetch_is_served_from_the_cache_without_a_call(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner()
        try:
            fetch = m.FetchService(service="dxf", have_version=None)
            first = await inner.request(fetch, timeout=10, expect=m.Service)
            assert first.sealed_bundle == outer.peer.bundle
            assert outer.peer.kinds().count("FETCH_SERVICE") == 1
            second = await inner.request(fetch, timeout=10, expect=m.Service)
            assert second == first
            held = await inner.request(
                m.FetchService(service="dxf", have_version=3), timeout=10, expect=m.Service
            )
            assert held.sealed_bundle == b"" and held.sealed_licence == first.sealed_licence
            assert outer.peer.kinds().count("FETCH_SERVICE") == 1
            status = await inner.request(m.Status(), timeout=5, expect=m.StatusReport)
            assert status.fields["relay.cache_hits"] == 2
            assert status.fields["uplink.calls"] == 1
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_periodic_sync_at_start_answers_the_inner_modules_sync_without_a_call(
    tmp_path: Path,
) -> None:
    async with outer_daemon(tmp_path, sync_at_start=True, idle_hangup_s=0.2) as outer:
        await until(lambda: outer.daemon.status().get("uplink.syncs") == 1, 10)
        await until(lambda: outer.daemon.status().get("uplink.hangups_idle") == 1, 10)
        inner = await outer.inner()
        try:
            reply = await inner.request(m.Sync(since_version=0), timeout=10, expect=m.SyncData)
            assert reply.sealed_licences == outer.peer.licences
            assert outer.peer.kinds().count("SYNC") == 1
            status = await inner.request(m.Status(), timeout=5, expect=m.StatusReport)
            assert status.fields["relay.sync_cache_hits"] == 1
            assert status.fields["uplink.calls"] == 1
            assert "last_sync" in status.fields
            # the next periodic sync names the cached set: central leaves it out,
            # and the cache still answers the inner module with it
            uplink = outer.daemon._uplink
            assert uplink is not None
            await uplink.sync_now()  # as the schedule would
            assert outer.peer.since_versions == [0, LICENCE_VERSION]
            reply = await inner.request(m.Sync(since_version=0), timeout=10, expect=m.SyncData)
            assert reply.sealed_licences == outer.peer.licences
            assert outer.peer.kinds().count("SYNC") == 2
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_a_sync_naming_the_held_set_is_answered_without_it_from_central_or_cache(
    tmp_path: Path,
) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner()
        try:

            async def sync(since: int) -> m.SyncData:
                return await inner.request(
                    m.Sync(since_version=since), timeout=10, expect=m.SyncData
                )

            assert (await sync(LICENCE_VERSION)).sealed_licences == b""  # central's answer
            # the set is not cached yet: a holder of another one cannot be answered
            assert (await sync(0)).sealed_licences == outer.peer.licences
            assert outer.peer.kinds().count("SYNC") == 2
            # now it is: the cache answers either holder, leaving the set out for its holder
            assert (await sync(LICENCE_VERSION)).sealed_licences == b""
            assert (await sync(LICENCE_VERSION - 1)).sealed_licences == outer.peer.licences
            assert outer.peer.kinds().count("SYNC") == 2
            status = await inner.request(m.Status(), timeout=5, expect=m.StatusReport)
            assert status.fields["relay.sync_cache_hits"] == 2
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_corrupt_cache_object_goes_to_central_again(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner()
        try:
            fetch = m.FetchService(service="dxf", have_version=None)
            first = await inner.request(fetch, timeout=10, expect=m.Service)
            blob = tmp_path / "state" / "cache" / "objects" / digest_of(first.sealed_bundle)
            blob.write_bytes(b"rot" + blob.read_bytes()[3:])
            again = await inner.request(fetch, timeout=10, expect=m.Service)
            assert again.sealed_bundle == outer.peer.bundle
            assert outer.peer.kinds().count("FETCH_SERVICE") == 2
            assert blob.read_bytes() == outer.peer.bundle  # rewritten whole
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_tampered_object_from_central_is_refused_and_not_cached(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        good = outer.peer.bundle
        outer.peer.bundle = good[:-70] + bytes([good[-70] ^ 1]) + good[-69:]
        inner = await outer.inner()
        try:
            with pytest.raises(RemoteError) as info:
                await inner.request(m.FetchService(service="dxf", have_version=None), timeout=10)
            assert info.value.code == "bad_upstream_object"
            assert not list((tmp_path / "state" / "cache" / "objects").iterdir())
            outer.peer.bundle = good
            reply = await inner.request(
                m.FetchService(service="dxf", have_version=None), timeout=10, expect=m.Service
            )
            assert reply.sealed_bundle == good
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_unreachable_central_answers_quickly_typed_and_cache_still_serves(
    tmp_path: Path,
) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner()
        try:
            first = await inner.request(
                m.FetchService(service="dxf", have_version=None), timeout=10, expect=m.Service
            )
            await outer.peer.aclose()  # central goes away: its port is closed
            with pytest.raises(RemoteError) as info:
                await inner.request(m.UsageReport(batch=b"batch"), timeout=10)
            assert info.value.code == "central_unreachable"
            assert info.value.retry_after is not None and info.value.retry_after > 0
            cached = await inner.request(
                m.FetchService(service="dxf", have_version=None), timeout=10, expect=m.Service
            )
            assert cached == first
            with pytest.raises(RemoteError) as unknown:
                await inner.request(m.FetchService(service="cad", have_version=None), timeout=10)
            assert unknown.value.code == "central_unreachable"
        finally:
            await close(inner)


class Noisy:
    """A transport that puts garbage on the line before every write."""

    def __init__(self, inner: StreamTransport) -> None:
        self._inner = inner
        self.name = "noisy"

    async def read(self) -> bytes:
        return await self._inner.read()

    async def write(self, data: bytes) -> None:
        await self._inner.write(b"\x00\x17\xffgarbage\x01\x02\x00" + data)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.timeout(30)
async def test_garbage_on_the_optical_line_is_counted_and_service_continues(
    tmp_path: Path,
) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner(wrap=Noisy)
        try:
            reply = await inner.request(m.Sync(since_version=0), timeout=10, expect=m.SyncData)
            assert reply.sealed
            status = await inner.request(m.Status(), timeout=5, expect=m.StatusReport)
            dropped = sum(
                int(v) for k, v in status.fields.items() if k.startswith("optical.dropped_")
            )
            assert dropped > 0, status.fields
            assert status.fields["outer.state"] == "running"
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_inner_power_loss_forces_the_link_down_at_once(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        inner = await outer.inner()
        try:
            outer.peer.reply_delay = 3.0  # a request in flight when the power goes
            pending = asyncio.create_task(inner.request(m.Sync(since_version=0), timeout=20))
            await until(lambda: "SYNC" in outer.peer.kinds(), 10)
            outer.gpio.pin(17).drive(True)  # the inner module's supply is gone
            with pytest.raises(LinkDown):
                await asyncio.wait_for(pending, 2.0)
            assert outer.daemon.counters["peer_power_lost"] == 1
            assert not outer.task.done()
        finally:
            await close(inner)


@pytest.mark.timeout(30)
async def test_own_power_loss_stops_with_a_distinct_status(tmp_path: Path) -> None:
    async with outer_daemon(tmp_path) as outer:
        outer.gpio.pin(27).drive(False)
        assert await asyncio.wait_for(outer.task, 10) == EXIT_POWER
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        assert status["outer.state"] == "stopped"


@pytest.mark.timeout(60)
@pytest.mark.slow
async def test_cli_run_status_and_sd_notify(tmp_path: Path) -> None:
    keys = Keys()
    tls = keys.write_tls(tmp_path / "tls")
    keys.write_outer_dir(tmp_path / "outer")
    peer = await CentralPeer(keys, tls).start()
    doc = config_doc(tmp_path, peer, tls[0])
    lines = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    (tmp_path / "outer.toml").write_text("\n".join(lines) + "\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    cmd = [sys.executable, "-m", "host_tools.cli", "outer"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, "run", "--config", str(tmp_path / "outer.toml"), stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        address = ""
        async with asyncio.timeout(20):
            while True:
                line = await proc.stdout.readline()
                assert line, "the daemon exited"
                event = json.loads(line)
                if event["event"] == "optical_listening":
                    address = event["address"]
                if event["event"] == "ready":
                    break
        loop = asyncio.get_running_loop()
        got = b""
        async with asyncio.timeout(10):
            while b"WATCHDOG=1" not in got:
                got += await loop.sock_recv(notify, 4096)
        assert b"READY=1" in got
        host, port = address.rsplit(":", 1)
        link = Link(await connect_tcp(host, int(port)), SessionConfig(role=Role.CLIENT, baud=None))
        try:
            reply = await link.request(m.Status(), timeout=10, expect=m.StatusReport)
            assert reply.fields["uplink.state"] == "idle"
            assert reply.fields["optical.connected"] is True
        finally:
            await close(link)
        await asyncio.sleep(2.5)  # one status-file period
        status = await asyncio.create_subprocess_exec(
            *cmd, "status", "--config", str(tmp_path / "outer.toml"), stdout=subprocess.PIPE
        )
        out, _ = await status.communicate()
        assert status.returncode == 0, out
        assert b"uplink.state" in out and b"modem.state" not in out
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        status = await asyncio.create_subprocess_exec(
            *cmd, "status", "--config", str(tmp_path / "outer.toml"), stdout=subprocess.PIPE
        )
        out, _ = await status.communicate()
        assert status.returncode == 1 and b"not running" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()
        await peer.aclose()


@pytest.mark.timeout(40)
@pytest.mark.slow
async def test_serial_optical_link_and_power_through_the_link_simulator(tmp_path: Path) -> None:
    keys = Keys()
    tls = keys.write_tls(tmp_path / "tls")
    keys.write_outer_dir(tmp_path / "outer")
    peer = await CentralPeer(keys, tls).start()
    control = tmp_path / "link.sock"
    try:
        async with LinkSimulator(baud=115200, control_path=control) as sim:
            doc = config_doc(tmp_path, peer, tls[0])
            doc["optical"] = {"transport": "serial", "device": sim.a_path, "baud": 115200}
            doc["gpio"] = {"backend": "sim"}
            doc["sim"] = {"control": str(control)}
            daemon = OuterDaemon(parse_config(doc, tmp_path))
            task = asyncio.create_task(daemon.run())
            inner = Link(await open_serial(sim.b_path, 115200), SessionConfig(role=Role.CLIENT))
            try:
                reply = await inner.request(m.Sync(since_version=0), timeout=15, expect=m.SyncData)
                assert reply.sealed
                status = await inner.request(m.Status(), timeout=10, expect=m.StatusReport)
                assert status.fields["power.inner"] is True
                sim.power("b", False)  # the inner module's supply goes
                await until(lambda: daemon.counters.get("peer_power_lost") == 1, 5)
                sim.power("b", True)
                sim.power("a", False)  # then our own
                assert await asyncio.wait_for(task, 10) == EXIT_POWER
            finally:
                await close(inner)
                if not task.done():
                    os.kill(os.getpid(), signal.SIGTERM)
                    await asyncio.wait_for(task, 10)
    finally:
        await peer.aclose()


@pytest.mark.timeout(90)
@pytest.mark.slow
async def test_dialup_drop_mid_bundle_leaves_the_cache_clean_and_the_next_call_completes(
    tmp_path: Path,
) -> None:
    keys = Keys()
    tls = keys.write_tls(tmp_path / "tls")
    keys.write_outer_dir(tmp_path / "outer")
    peer = await CentralPeer(keys, tls, bundle_size=6000).start()
    hayes = HayesConfig(
        speed=115200,
        phonebook={"5551234": f"127.0.0.1:{peer.plain_port}"},
        dial_delay=0.1,
        no_carrier_after=3000,
    )
    try:
        async with ModemEmulator(hayes) as modem:
            # two dials, a drop and a hang-up fit in one request's time
            doc = config_doc(tmp_path, peer, tls[0], order=["dialup"], request_timeout_s=40.0)
            del doc["internet"]
            doc["dialup"] = {
                "device": modem.port_path,
                "number": "5551234",
                "init_string": "ATQ0 V1 E1 S0=0 &C1 &D2 S12=10",
                "max_attempts": 1,
                "command_timeout_s": 2.0,
                "carrier_timeout_s": 5.0,
            }
            daemon = OuterDaemon(parse_config(doc, tmp_path), backend=SimGpio())
            task = asyncio.create_task(daemon.run())
            await until(lambda: bool(daemon.optical_address), 5)
            host, port = daemon.optical_address.rsplit(":", 1)
            inner = Link(await connect_tcp(host, int(port)), SessionConfig(role=Role.CLIENT))
            objects = tmp_path / "state" / "cache" / "objects"
            fetch = m.FetchService(service="dxf", have_version=None)
            try:
                with pytest.raises(RemoteError) as info:
                    await inner.request(fetch, timeout=50)
                assert info.value.code == "central_unreachable"
                assert info.value.retry_after is not None
                assert not list(objects.iterdir())  # nothing half-written was kept
                modem.core.config.no_carrier_after = None
                await asyncio.sleep(0.6)  # past the backoff
                reply = await inner.request(fetch, timeout=40, expect=m.Service)
                assert reply.sealed_bundle == peer.bundle
                assert sorted(p.read_bytes() for p in objects.iterdir()) == sorted(
                    [peer.bundle, peer.licences]
                )
                status = await inner.request(m.Status(), timeout=10, expect=m.StatusReport)
                fields = status.fields
                failed = int(fields["uplink.calls_dropped"])
                failed += int(fields.get("uplink.connect_failures_dialup", 0))
                assert failed == 2  # the call, and the one it was resumed on
                assert status.fields["modem.state"] == "online"  # the call is still up
            finally:
                await close(inner)
                os.kill(os.getpid(), signal.SIGTERM)
                assert await asyncio.wait_for(task, 20) == 0
    finally:
        await peer.aclose()
