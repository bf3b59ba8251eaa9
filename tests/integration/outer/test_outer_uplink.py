"""The uplink against a real SERVER-role peer: TLS, the modem emulator, fallback, drops, idle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import socket
import time
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from outer_central_peer import CentralPeer, Keys, sealed

from firmware.common.crypto.sealed import Kind
from firmware.common.errors import RemoteError
from firmware.common.link import messages as m
from firmware.common.link.testing import collect_reply
from firmware.outer.cache import SealedCache
from firmware.outer.config import DialupConfig, InternetConfig
from firmware.outer.errors import CentralRefused, CentralUnreachable
from firmware.outer.modem.dialler import DiallerConfig
from firmware.outer.policy import CallState, PolicyConfig
from firmware.outer.relay import Relay
from firmware.outer.uplink import Connector, DialupConnector, Identity, InternetConnector, Uplink
from host_tools.sim.hayes import HayesConfig
from host_tools.sim.modem import ModemEmulator

pytestmark = [pytest.mark.integration]

NUMBER = "5551234"
#: Short S12 guard so hang-ups by escape are quick on a pty (no DTR).
FAST_INIT = "ATQ0 V1 E1 S0=0 &C1 &D2 S12=10"


def dialler(**overrides: object) -> DiallerConfig:
    fields: dict[str, object] = {
        "number": NUMBER,
        "init_string": FAST_INIT,
        "reset_pause": 0.05,
        "command_timeout": 1.0,
        "carrier_timeout": 3.0,
        "max_attempts": 1,
        "backoff_initial": 0.1,
        "backoff_max": 0.5,
        "escape_guard": 0.2,
        "carrier_confirm": 0.2,
        "seed": 1,
        **overrides,
    }
    return DiallerConfig(**fields)  # type: ignore[arg-type]


def policy(**overrides: object) -> PolicyConfig:
    fields: dict[str, object] = {
        "order": ("internet", "dialup"),
        "idle_hangup": 30.0,
        "sync_interval": 3600.0,
        "sync_batch_window": 0.0,
        "sync_at_start": False,
        "backoff_initial": 0.2,
        "backoff_max": 0.5,
        **overrides,
    }
    return PolicyConfig(**fields)  # type: ignore[arg-type]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(predicate: Callable[[], bool], limit: float) -> None:
    """Return once ``predicate()`` holds; raise TimeoutError after ``limit`` seconds."""
    async with asyncio.timeout(limit):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


@dataclass
class Bench:
    keys: Keys
    peer: CentralPeer
    identity: Identity
    ca: Path
    tmp: Path

    def internet(self, port: int | None = None) -> InternetConnector:
        cfg = InternetConfig("127.0.0.1", self.peer.tls_port if port is None else port, self.ca)
        return InternetConnector(cfg, connect_timeout=3.0)

    def dialup(self, modem: ModemEmulator, **overrides: object) -> DialupConnector:
        return DialupConnector(DialupConfig(modem.port_path, dialler(**overrides)))

    def uplink(self, connectors: list[Connector], **overrides: object) -> Uplink:
        return Uplink(
            self.identity,
            connectors,
            policy(**overrides),
            connect_timeout=10.0,
            request_timeout=20.0,
        )


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    keys = Keys()
    tls = keys.write_tls(tmp_path / "tls")
    peer = await CentralPeer(keys, tls, bundle_size=6000).start()
    identity = Identity.load(keys.write_outer_dir(tmp_path / "outer"))
    try:
        yield Bench(keys, peer, identity, tls[0], tmp_path)
    finally:
        await peer.aclose()


@contextlib.asynccontextmanager
async def modem_to(peer: CentralPeer, **overrides: object) -> AsyncIterator[ModemEmulator]:
    fields: dict[str, object] = {
        "speed": 115200,
        "phonebook": {NUMBER: f"127.0.0.1:{peer.plain_port}"},
        "dial_delay": 0.1,
        **overrides,
    }
    async with ModemEmulator(HayesConfig(**fields)) as modem:  # type: ignore[arg-type]
        yield modem


@contextlib.asynccontextmanager
async def running(uplink: Uplink) -> AsyncIterator[Uplink]:
    task = asyncio.create_task(uplink.run())
    try:
        yield uplink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await uplink.aclose()


@pytest.mark.timeout(20)
async def test_internet_call_authenticates_and_fetches(bench: Bench) -> None:
    async with running(bench.uplink([bench.internet()], order=("internet",))) as up:
        reply = await up.request(m.FetchService(service="dxf", have_version=None), m.Service)
        assert reply.sealed_bundle == bench.peer.bundle
        assert bench.peer.kinds() == ["AUTH_BEGIN", "AUTH_PROOF", "FETCH_SERVICE"]
        assert up.status()["uplink.transport"] == "internet"


@pytest.mark.timeout(20)
async def test_central_error_passes_through_unchanged(bench: Bench) -> None:
    async with running(bench.uplink([bench.internet()], order=("internet",))) as up:
        with pytest.raises(RemoteError) as info:
            await up.request(m.FetchService(service="nope", have_version=None), m.Service)
        assert info.value.code == "unknown_service"


@pytest.mark.timeout(30)
async def test_falls_back_to_dialup_when_central_tcp_port_is_closed(bench: Bench) -> None:
    async with modem_to(bench.peer) as modem:
        connectors: list[Connector] = [bench.internet(closed_port()), bench.dialup(modem)]
        async with running(bench.uplink(connectors)) as up:
            reply = await up.request(m.FetchService(service="dxf", have_version=None), m.Service)
            assert reply.sealed_bundle == bench.peer.bundle
            status = up.status()
            assert status["uplink.transport"] == "dialup"
            assert status["uplink.connect_failures_internet"] == 1
            assert status["modem.last_speed"] == 115200
            assert bench.peer.connections == 1


@pytest.mark.timeout(30)
async def test_sync_and_usage_share_one_call_then_idle_hangup(bench: Bench) -> None:
    async with modem_to(bench.peer) as modem:
        up = bench.uplink([bench.dialup(modem)], order=("dialup",), idle_hangup=0.5)
        async with running(up):
            sync, ack = await asyncio.gather(
                up.request(m.Sync(since_version=0), m.SyncData),
                up.request(m.UsageReport(batch=b"signed batch"), m.UsageAck),
            )
            assert ack.batch_id == "b1" and sync.sealed_licences
            assert bench.peer.connections == 1
            assert sorted(bench.peer.kinds()[2:]) == ["SYNC", "USAGE_REPORT"]
            assert up.policy.state is CallState.UP
            await until(lambda: up.policy.state is CallState.IDLE, 10)
            assert up.counters["hangups_idle"] == 1
            await until(lambda: not bench.peer.open_connections, 5)
            # the next request dials again
            await up.request(m.Status(), m.StatusReport)
            assert bench.peer.connections == 2


@pytest.mark.timeout(30)
async def test_request_during_a_hangup_waits_for_it_and_redials(bench: Bench) -> None:
    async with modem_to(bench.peer) as modem:
        up = bench.uplink([bench.dialup(modem)], order=("dialup",), idle_hangup=0.3)
        async with running(up):
            await up.request(m.Status(), m.StatusReport)
            await until(lambda: up.counters["hangups_idle"] == 1, 10)
            # the modem is still hanging up (escape, ATH0): this must wait, not fail
            await up.request(m.Status(), m.StatusReport)
            assert up.counters["connect_failures_dialup"] == 0
            assert bench.peer.connections == 2


@pytest.mark.timeout(40)
@pytest.mark.slow
async def test_call_dropped_mid_bundle_fails_cleanly_and_next_call_completes(
    bench: Bench,
) -> None:
    async with modem_to(bench.peer, no_carrier_after=3000) as modem:
        up = bench.uplink([bench.dialup(modem)], order=("dialup",))
        async with running(up):
            with pytest.raises(CentralUnreachable) as info:
                await up.request(m.FetchService(service="dxf", have_version=None), m.Service)
            assert info.value.retry_after is not None
            # the first drop was retried on a new call, which dropped too (during the
            # bundle, or already while authenticating, as the line's byte count allows)
            assert up.counters["calls_dropped"] + up.counters["connect_failures_dialup"] == 2
            assert up.counters["requests_resumed"] == 1
            assert up.policy.state is CallState.IDLE
            modem.core.config.no_carrier_after = None
            reply = await up.request(m.FetchService(service="dxf", have_version=None), m.Service)
            assert reply.sealed_bundle == bench.peer.bundle


@pytest.mark.timeout(40)
@pytest.mark.slow
async def test_a_relay_falling_back_to_its_cache_mid_stream_ends_with_the_cached_bundle(
    bench: Bench,
) -> None:
    """Parts of central's bundle went on; then both calls dropped and the stale cached
    bundle is served: the stream ends with it inline, so the inner module drops the parts."""
    cache = SealedCache(bench.tmp / "relay-cache")
    cache.load()
    old = sealed(bench.keys, Kind.BUNDLE, "dxf", 2, os.urandom(100))
    cache.store_service("dxf", 2, old, (7, bench.peer.licences), time.time() - 30 * 86400)
    # five parts; each call drops after about two of them
    bench.peer.bundle = sealed(bench.keys, Kind.BUNDLE, "dxf", 3, os.urandom(20_000))
    async with modem_to(bench.peer, no_carrier_after=10_000) as modem:
        up = bench.uplink([bench.dialup(modem)], order=("dialup",))
        relay = Relay(up, cache, bench.keys.central.public, status=up.status)
        async with running(up):
            stream = await relay.handle(m.FetchService(service="dxf", have_version=None))
            assert not isinstance(stream, m.Message)
            items = [item async for item in stream]
    *parts, end = items
    assert parts, "no part of central's bundle crossed before the drop: raise no_carrier_after"
    assert all(isinstance(p, m.ServicePart) for p in parts)
    assert relay.counters["stale_served"] == 1
    assert end == m.Service(sealed_bundle=old, sealed_licence=bench.peer.licences)

    async def replay() -> AsyncIterator[m.Message]:
        for item in items:
            yield item

    assert await collect_reply(replay()) == end  # what the inner module's link hands on


@pytest.mark.timeout(40)
@pytest.mark.slow
async def test_dropped_call_resumes_on_a_new_call(bench: Bench) -> None:
    async with modem_to(bench.peer, no_carrier_after=3000) as modem:
        up = bench.uplink([bench.dialup(modem)], order=("dialup",))
        async with running(up):
            fetch = asyncio.create_task(
                up.request(m.FetchService(service="dxf", have_version=None), m.Service)
            )
            await until(lambda: up.counters["calls_dropped"] > 0, 15)
            modem.core.config.no_carrier_after = None  # the line is clean for the redial
            reply = await fetch
            assert reply.sealed_bundle == bench.peer.bundle
            assert up.counters["requests_resumed"] == 1


@pytest.mark.timeout(30)
async def test_calls_per_hour_cap_becomes_the_retry_hint(bench: Bench) -> None:
    async with modem_to(bench.peer) as modem:
        connector = bench.dialup(modem, max_calls_per_hour=1)
        up = bench.uplink([connector], order=("dialup",), idle_hangup=0.2, backoff_max=5.0)
        async with running(up):
            await up.request(m.Status(), m.StatusReport)
            await until(lambda: up.counters["hangups_idle"] == 1, 10)
            with pytest.raises(CentralUnreachable) as info:
                await up.request(m.Status(), m.StatusReport)
            # the cap's hour, not the 0.2 s backoff: no redial within the hour
            assert info.value.retry_after is not None and info.value.retry_after > 3000
            assert bench.peer.connections == 1


@pytest.mark.timeout(40)
@pytest.mark.slow
async def test_a_call_whose_line_dies_while_idle_is_ended_not_reused(bench: Bench) -> None:
    async with modem_to(bench.peer) as modem:
        up = bench.uplink([bench.dialup(modem)], order=("dialup",), idle_hangup=60.0)
        async with running(up):
            await up.request(m.Status(), m.StatusReport)
            bench.peer.muted = True  # the line goes silent; no NO CARRIER comes
            await until(lambda: up.counters["hangups_dropped"] == 1, 20)
            assert up.policy.state is CallState.IDLE  # long before the idle hang-up
            bench.peer.muted = False
            await up.request(m.Status(), m.StatusReport)
            assert bench.peer.connections == 2


@pytest.mark.timeout(20)
async def test_every_transport_down_fails_fast_then_backs_off(bench: Bench) -> None:
    up = bench.uplink(
        [bench.internet(closed_port())], order=("internet",), backoff_initial=5.0, backoff_max=5.0
    )
    async with running(up):
        with pytest.raises(CentralUnreachable) as first:
            await up.request(m.Sync(since_version=0), m.SyncData)
        assert first.value.retry_after == pytest.approx(5.0, abs=0.5)
        with pytest.raises(CentralUnreachable) as second:
            await up.request(m.Sync(since_version=0), m.SyncData)
        assert second.value.retry_after is not None and second.value.retry_after <= 5.0
        assert up.counters["connects"] == 1  # refused during the backoff, no new attempt
        assert up.counters["refused_backing_off"] == 1


@pytest.mark.timeout(20)
async def test_central_refusing_the_gateway_is_typed(bench: Bench) -> None:
    bench.peer.refuse_auth = True
    async with running(bench.uplink([bench.internet()], order=("internet",))) as up:
        with pytest.raises(CentralRefused):
            await up.request(m.Sync(since_version=0), m.SyncData)
        assert up.counters["auth_refused"] == 1


@pytest.mark.timeout(20)
async def test_certificate_outside_the_pin_is_refused(bench: Bench) -> None:
    cfg = InternetConfig("127.0.0.1", bench.peer.tls_port, bench.ca, pin_sha256="00" * 32)
    up = bench.uplink([InternetConnector(cfg, 3.0)], order=("internet",))
    async with running(up):
        with pytest.raises(CentralUnreachable, match="pin"):
            await up.request(m.Sync(since_version=0), m.SyncData)
    assert bench.peer.kinds() == []


@pytest.mark.timeout(20)
async def test_wrong_ca_is_refused(bench: Bench, tmp_path: Path) -> None:
    other = Keys().write_tls(tmp_path / "other")
    cfg = InternetConfig("127.0.0.1", bench.peer.tls_port, other[0])
    up = bench.uplink([InternetConnector(cfg, 3.0)], order=("internet",))
    async with running(up):
        with pytest.raises(CentralUnreachable):
            await up.request(m.Sync(since_version=0), m.SyncData)
    assert bench.peer.kinds() == []


@contextlib.asynccontextmanager
async def fake_modem(answer: bytes | None) -> AsyncIterator[str]:
    """A pty whose far end answers every write with ``answer`` (None: stays silent)."""
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        with contextlib.suppress(OSError):
            os.read(master, 4096)
            if answer is not None:
                os.write(master, answer)

    loop.add_reader(master, readable)
    try:
        yield path
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("answer", [None, b"\x00\xffgarbage\r\n~~~", b"AT\r\r\nATZ\r\r\n"])
async def test_modem_silent_garbage_or_odd_echo_is_unreachable(
    bench: Bench, answer: bytes | None
) -> None:
    async with fake_modem(answer) as path:
        connector = DialupConnector(DialupConfig(path, dialler(command_timeout=0.5)))
        up = bench.uplink([connector], order=("dialup",))
        async with running(up):
            with pytest.raises(CentralUnreachable):
                await up.request(m.Sync(since_version=0), m.SyncData)
            assert up.counters["connect_failures_dialup"] == 1
            assert up.status()["uplink.state"] == "idle"


@pytest.mark.timeout(30)
async def test_dialup_modem_is_prepared_at_start_and_after_each_call(bench: Bench) -> None:
    async with modem_to(bench.peer) as modem:
        connector = bench.dialup(modem)
        up = bench.uplink([connector], order=("dialup",), idle_hangup=0.3)
        async with running(up):
            # before anything needs central, the modem is reset and initialised
            await until(lambda: up.status()["modem.state"] == "ready", 10)
            assert modem.core.commands() == ["ATZ", FAST_INIT]
            await up.request(m.Status(), m.StatusReport)
            # the call itself: a probe, then the dial at once
            assert modem.core.commands()[2:] == ["AT", f"ATDT{NUMBER}"]
            await until(lambda: up.counters["hangups_idle"] == 1, 10)
            await until(lambda: up.status()["modem.state"] == "ready", 10)
            assert modem.core.commands()[4:] == ["ATH0", "ATZ", FAST_INIT]
            await up.request(m.Status(), m.StatusReport)
            assert modem.core.commands()[7:] == ["AT", f"ATDT{NUMBER}"]
            status = up.status()
            assert status["modem.prepare_failures"] == 0
            assert status["modem.probe_failures"] == 0
            assert "modem.error" not in status
            assert bench.peer.connections == 2


@pytest.mark.timeout(30)
async def test_modem_failing_its_preparation_is_reported_and_reset_at_the_next_call(
    bench: Bench,
) -> None:
    async with modem_to(bench.peer) as modem:
        modem.power_off()
        logged: list[str] = []
        connector = DialupConnector(
            DialupConfig(modem.port_path, dialler()), lambda event, **_: logged.append(event)
        )
        up = bench.uplink([connector], order=("dialup",))
        async with running(up):
            await until(lambda: up.status()["modem.state"] == "idle", 15)
            status = up.status()
            assert status["modem.prepare_failures"] == 1
            assert "ATZ" in str(status["modem.error"])
            assert "modem_prepare_failed" in logged
            assert modem.core.commands() == []  # it heard nothing
            await asyncio.sleep(0.5)
            assert up.status()["modem.prepare_failures"] == 1  # not retried on its own
            modem.power_on()
            await up.request(m.Status(), m.StatusReport)
            # idle, so the dial ran the full reset; the error is gone with it
            assert modem.core.commands() == ["ATZ", FAST_INIT, f"ATDT{NUMBER}"]
            assert "modem.error" not in up.status()


@pytest.mark.timeout(20)
async def test_modem_port_missing_at_start_is_reported_not_fatal(bench: Bench) -> None:
    missing = str(bench.tmp / "no-such-modem")
    connector = DialupConnector(DialupConfig(missing, dialler()))
    up = bench.uplink([connector], order=("dialup",))
    async with running(up):
        await until(lambda: "modem.error" in up.status(), 5)
        assert up.status()["modem.state"] == "closed"
        with pytest.raises(CentralUnreachable, match="no-such-modem"):
            await up.request(m.Status(), m.StatusReport)
