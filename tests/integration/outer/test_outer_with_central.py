"""The outer module's uplink and relay against the real central server (central_stub).

Over TLS to central's listener, and by dial-up when central's TCP port is
closed: the outer module's dialler calls through one modem emulator, whose
phone book leads to a second emulator in answer mode in front of central's
serial listener (central's own dialler answers with ATA).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from central_stub import admin
from central_stub.config import Listen, SerialListener
from central_stub.gateway import CentralService
from central_stub.server import CentralServer, tls_server_context
from central_stub.testing import ECHO_DIR, TempCentral, make_central
from firmware.common.crypto.freshness import SyncVerifier
from firmware.common.crypto.sealed import Kind
from firmware.common.errors import RemoteError
from firmware.common.link import messages as m
from firmware.common.link.testing import collect_reply
from firmware.common.uplink import UsageRecord, sign_usage_batch
from firmware.outer.cache import SealedCache
from firmware.outer.config import DialupConfig, InternetConfig
from firmware.outer.modem.dialler import DiallerConfig
from firmware.outer.policy import PolicyConfig
from firmware.outer.relay import Relay
from firmware.outer.uplink import Connector, DialupConnector, Identity, InternetConnector, Uplink
from host_tools.sim.hayes import HayesConfig
from host_tools.sim.modem import ModemEmulator
from provisioning.bundle import build_bundle

pytestmark = [pytest.mark.integration]

NOW = int(time.time())
NUMBER = "5550100"
REFERENCE_DIR = ECHO_DIR.parent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def central_server(
    central: TempCentral, *, tls: bool = True, serial: str | None = None
) -> AsyncIterator[CentralServer]:
    config = replace(
        central.config,
        listen=(Listen("127.0.0.1", 0),) if tls else (),
        serial=(SerialListener(serial),) if serial else (),
    )
    service = CentralService(central.repo, central.key, sync_expiry=config.sync_expiry)
    server = CentralServer(config, service, lambda event, **fields: None)
    tls_dir = config.tls_dir
    await server.start(tls_server_context(tls_dir / "server.crt", tls_dir / "server.key"))
    try:
        yield server
    finally:
        await server.aclose()


@contextlib.asynccontextmanager
async def relay_for(
    central: TempCentral, connectors: list[Connector], tmp: Path
) -> AsyncIterator[tuple[Relay, Uplink]]:
    gw = central.gateways["gw1"]
    identity = Identity.load(gw.directory / "outer")
    policy = PolicyConfig(
        order=tuple(c.name for c in connectors),
        sync_at_start=False,
        sync_batch_window=0.0,
        backoff_initial=0.2,
        backoff_max=0.5,
    )
    uplink = Uplink(identity, connectors, policy, connect_timeout=45.0, request_timeout=60.0)
    cache = SealedCache(tmp / "cache")
    cache.load()
    relay = Relay(uplink, cache, identity.central_key, status=uplink.status)
    task = asyncio.create_task(uplink.run())
    try:
        yield relay, uplink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await uplink.aclose()


def usage_batch(central: TempCentral) -> bytes:
    key_hash = central.repo.snapshot().list_client_keys("acme")[0].key_hash
    return sign_usage_batch(
        central.gateways["gw1"].inner_signing,
        gateway="gw1",
        batch_id="batch-1",
        created=NOW,
        records=[UsageRecord(NOW, "echo", "lic-000001", key_hash, 1)],
    )


@pytest.mark.timeout(60)
async def test_relay_through_central_over_tls(tmp_path: Path) -> None:
    central = make_central(tmp_path / "central", now=NOW)
    gw = central.gateways["gw1"]
    async with central_server(central) as server:
        port = server.addresses[0][1]
        net = InternetConnector(InternetConfig("127.0.0.1", port, central.ca_cert), 10.0)
        async with relay_for(central, [net], tmp_path) as (relay, uplink):
            sync = await relay.handle(m.Sync(since_version=0))
            assert isinstance(sync, m.SyncData)
            verifier = SyncVerifier(recipient=gw.inner_hpke, central=central.public, gateway="gw1")
            verifier.accept_sync_metadata(sync.sealed, NOW)
            verifier.accept_licence_set(sync.sealed_licences, NOW)

            service = await collect_reply(
                await relay.handle(m.FetchService(service="echo", have_version=None))
            )
            assert isinstance(service, m.Service)
            verifier.accept_object(service.sealed_bundle, Kind.BUNDLE, "echo", NOW)
            again = await collect_reply(
                await relay.handle(m.FetchService(service="echo", have_version=None))
            )
            assert again == service
            assert relay.counters["cache_hits"] == 1

            ack = await relay.handle(m.UsageReport(batch=usage_batch(central)))
            assert isinstance(ack, m.UsageAck) and ack.batch_id == "batch-1"

            with pytest.raises(RemoteError) as unknown:
                await collect_reply(
                    await relay.handle(m.FetchService(service="nope", have_version=None))
                )
            assert unknown.value.code == "unknown_service"
            assert uplink.policy.calls == 1  # everything on one call
            assert server.status()["auth_ok"] == 1


@pytest.mark.timeout(90)
@pytest.mark.slow
async def test_falls_back_to_dialup_into_centrals_answering_modem(tmp_path: Path) -> None:
    central = make_central(tmp_path / "central", now=NOW)
    answering = ModemEmulator(
        HayesConfig(speed=115200, ring_interval=0.5, answer_delay=0.2), listen=("127.0.0.1", 0)
    )
    await answering.start()
    try:
        calling_cfg = HayesConfig(
            speed=115200, phonebook={NUMBER: str(answering.listen_address)}, dial_delay=0.1
        )
        async with (
            central_server(central, tls=False, serial=answering.port_path),
            ModemEmulator(calling_cfg) as calling,
        ):
            await asyncio.sleep(2.0)  # central's driver resets its modem and waits for RING
            dialler = DiallerConfig(
                number=NUMBER,
                init_string="ATQ0 V1 E1 S0=0 &C1 &D2 S12=10",
                reset_pause=0.05,
                command_timeout=2.0,
                carrier_timeout=10.0,
                max_attempts=1,
                escape_guard=0.2,
                carrier_confirm=0.2,
                seed=1,
            )
            connectors: list[Connector] = [
                InternetConnector(InternetConfig("127.0.0.1", closed_port(), central.ca_cert), 3.0),
                DialupConnector(DialupConfig(calling.port_path, dialler)),
            ]
            async with relay_for(central, connectors, tmp_path) as (relay, uplink):
                reply = await collect_reply(
                    await relay.handle(m.FetchService(service="echo", have_version=None))
                )
                assert isinstance(reply, m.Service) and reply.sealed_bundle
                status = uplink.status()
                assert status["uplink.transport"] == "dialup"
                assert status["uplink.connect_failures_internet"] == 1
    finally:
        await answering.aclose()


@contextlib.asynccontextmanager
async def dxf2svg_relay(tmp: Path) -> AsyncIterator[Relay]:
    """A relay whose uplink reaches, over TLS, a central that publishes dxf2svg."""
    central = make_central(tmp / "central", now=NOW)
    publish_dxf2svg(central)
    async with central_server(central) as server:
        port = server.addresses[0][1]
        net = InternetConnector(InternetConfig("127.0.0.1", port, central.ca_cert), 10.0)
        async with relay_for(central, [net], tmp) as (relay, _):
            yield relay


def publish_dxf2svg(central: TempCentral) -> None:
    """Publish and license the dxf2svg bundle (about 14 KiB sealed: four parts)."""
    bundle = build_bundle(REFERENCE_DIR / "dxf2svg", central.key).to_bytes()
    admin.publish_service(central.repo, bundle, [central.key.public], now=NOW, actor="test")
    admin.issue_licence(
        central.repo,
        customer_id="acme",
        service="dxf2svg",
        valid_from=NOW - 3600,
        valid_until=NOW + 86400,
        gateway_id=None,
        now=NOW,
        actor="test",
    )


@pytest.mark.timeout(60)
async def test_the_relay_passes_a_bundle_on_while_it_still_arrives(tmp_path: Path) -> None:
    async with dxf2svg_relay(tmp_path) as relay:
        stream = await relay.handle(m.FetchService(service="dxf2svg", have_version=None))
        assert not isinstance(stream, m.Message)
        items: list[m.Message] = []
        still_arriving: list[bool] = []
        async for item in stream:
            if not items:  # the first part is passed on before central's reply is whole
                still_arriving.append(not relay._downloads[("dxf2svg", None)].task.done())
            items.append(item)
            if not isinstance(item, m.ServicePart):
                break
        assert still_arriving == [True]
        *parts, end = items
        assert len(parts) >= 3 and all(isinstance(p, m.ServicePart) for p in parts)
        assert isinstance(end, m.Service) and end.streamed > 0 and not end.sealed_bundle

        async def replay() -> AsyncIterator[m.Message]:
            for item in items:
                yield item

        whole = await collect_reply(replay())
        assert isinstance(whole, m.Service)
        # the joined bundle is central's, verified and cached whole by the relay
        assert relay.counters["bundles_streamed"] == 1
        cached = await collect_reply(
            await relay.handle(m.FetchService(service="dxf2svg", have_version=None))
        )
        assert cached == whole
        assert relay.counters["cache_hits"] == 1


@pytest.mark.timeout(60)
async def test_a_second_fetch_joins_the_one_under_way(tmp_path: Path) -> None:
    async with dxf2svg_relay(tmp_path) as relay:
        first = await relay.handle(m.FetchService(service="dxf2svg", have_version=None))
        assert not isinstance(first, m.Message)
        head = await anext(first)  # the fetch is under way
        assert isinstance(head, m.ServicePart)
        second = await collect_reply(
            await relay.handle(m.FetchService(service="dxf2svg", have_version=None))
        )
        await first.aclose()  # the first asker went away; the fetch went on
        assert relay.counters["fetches_joined"] == 1
        assert isinstance(second, m.Service) and len(second.sealed_bundle) > 10_000
        assert relay.counters["cache_misses"] == 1  # one fetch from central, not two
