"""The gateway protocol over TCP with TLS, against a real Link client; and a central restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import cbor2
import pytest

from central_stub import admin
from central_stub.cli import main as cli_main
from central_stub.client import authenticate
from central_stub.config import Listen
from central_stub.gateway import CentralService
from central_stub.server import (
    CentralServer,
    core_executor,
    serve_connection,
    tls_client_context,
    tls_server_context,
)
from central_stub.testing import TempCentral, make_central, write_config
from firmware.common.adapters.tcp import StreamTransport, connect_tcp
from firmware.common.crypto.freshness import SyncVerifier
from firmware.common.crypto.keys import SigningKey
from firmware.common.crypto.sealed import Kind
from firmware.common.errors import OptogateError, PortError, RemoteError
from firmware.common.link import messages as m
from firmware.common.link.kinds import Kind as MessageKind
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from firmware.common.uplink import UsageRecord, sign_usage_batch
from provisioning.bundle import load_bundle

pytestmark = [pytest.mark.integration]

NOW = int(time.time())


@pytest.fixture
def central(tmp_path: Path) -> TempCentral:
    return make_central(tmp_path, now=NOW, gateways=2)


@contextlib.asynccontextmanager
async def serving(central: TempCentral) -> AsyncIterator[tuple[CentralServer, int]]:
    from dataclasses import replace

    config = replace(central.config, listen=(Listen("127.0.0.1", 0),))
    service = CentralService(central.repo, central.key, sync_expiry=config.sync_expiry)
    server = CentralServer(config, service, lambda event, **fields: None)
    tls = config.tls_dir
    await server.start(tls_server_context(tls / "server.crt", tls / "server.key"))
    try:
        yield server, server.addresses[0][1]
    finally:
        await server.aclose()


@contextlib.asynccontextmanager
async def client(central: TempCentral, port: int) -> AsyncIterator[Link]:
    transport = await connect_tcp(
        "127.0.0.1", port, ssl_context=tls_client_context(central.ca_cert)
    )
    link = Link(transport, SessionConfig(role=Role.CLIENT, baud=None))
    try:
        yield link
    finally:
        with contextlib.suppress(OptogateError):
            await link.aclose()


def _batch(central: TempCentral, batch_id: str, records: int = 2) -> bytes:
    key_hash = central.repo.snapshot().list_client_keys("acme")[0].key_hash
    return sign_usage_batch(
        central.gateways["gw1"].inner_signing,
        gateway="gw1",
        batch_id=batch_id,
        created=NOW,
        records=[UsageRecord(NOW, "echo", "lic-000001", key_hash, 1)] * records,
    )


@pytest.mark.timeout(60)
async def test_auth_fetch_sync_usage_over_tls(central: TempCentral) -> None:
    gw = central.gateways["gw1"]
    async with serving(central) as (server, port), client(central, port) as link:
        with pytest.raises(RemoteError) as refused:
            await link.request(m.Sync(since_version=0))
        assert refused.value.code == "auth_required"
        await authenticate(link, "gw1", gw.outer, central.key.key_id)

        data = await link.request(m.Sync(since_version=0), expect=m.SyncData)
        verifier = SyncVerifier(recipient=gw.inner_hpke, central=central.public, gateway="gw1")
        verifier.accept_sync_metadata(data.sealed, NOW)
        licences = verifier.accept_licence_set(data.sealed_licences, NOW)
        assert [lic.service for lic in licences.licences] == ["echo"]

        svc = await link.request(m.FetchService(service="echo"), expect=m.Service)
        opened = verifier.accept_object(svc.sealed_bundle, Kind.BUNDLE, "echo", NOW)
        assert load_bundle(opened.payload).manifest.name == "echo"

        batch = _batch(central, "batch-1")
        ack = await link.request(m.UsageReport(batch=batch), expect=m.UsageAck)
        again = await link.request(m.UsageReport(batch=batch), expect=m.UsageAck)
        assert again.sealed_ack == ack.sealed_ack
        assert len(central.repo.snapshot().list_usage("acme", 0, 2**62)) == 2

        with pytest.raises(RemoteError) as unknown:
            await link.request(m.FetchService(service="nope"))
        assert unknown.value.code == "unknown_service"
        assert server.status()["auth_ok"] == 1


@pytest.mark.timeout(60)
async def test_refusals_over_tls(central: TempCentral) -> None:
    async with serving(central) as (server, port):
        async with client(central, port) as link:
            with pytest.raises(RemoteError) as e:
                await authenticate(link, "gw-unknown", SigningKey.generate(), central.key.key_id)
            assert e.value.code == "unknown_gateway"
            with pytest.raises(RemoteError) as e:
                await authenticate(link, "gw1", central.gateways["gw2"].outer, central.key.key_id)
            assert e.value.code == "bad_signature"
        admin.revoke_gateway(central.repo, "gw2", now=NOW, actor="test")
        async with client(central, port) as link:
            with pytest.raises(RemoteError) as e:
                await authenticate(link, "gw2", central.gateways["gw2"].outer, central.key.key_id)
            assert e.value.code == "gateway_revoked"
        audit = [a.action for a in central.repo.snapshot().list_audit() if not a.ok]
        assert audit == [
            "gateway.unknown_gateway",
            "gateway.bad_signature",
            "gateway.gateway_revoked",
        ]
        assert server.status()["refused_bad_signature"] == 1


@pytest.mark.timeout(60)
async def test_garbage_and_plain_tcp_do_not_disturb_the_server(central: TempCentral) -> None:
    async with serving(central) as (_, port):
        # garbage inside TLS: frames fail their CRC and are dropped
        ctx = tls_client_context(central.ca_cert)
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(os.urandom(5000) + b"\x00\x01\x02\x00" * 100)
        await writer.drain()
        # no TLS at all: the handshake fails on the server side
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"GET / HTTP/1.0\r\n\r\n")
        await w2.drain()
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w2.close()
        async with client(central, port) as link:
            await authenticate(link, "gw1", central.gateways["gw1"].outer, central.key.key_id)
            await link.request(m.Sync(since_version=0), expect=m.SyncData)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.timeout(60)
async def test_a_client_that_vanishes_mid_transfer_leaves_nothing(central: TempCentral) -> None:
    big = _batch(central, "big", records=30_000)  # ~3 MB: many frames
    async with serving(central) as (server, port):
        async with client(central, port) as link:
            await authenticate(link, "gw1", central.gateways["gw1"].outer, central.key.key_id)
            request = asyncio.ensure_future(link.request(m.UsageReport(batch=big)))
            await asyncio.sleep(0.05)
            assert not request.done()
        with contextlib.suppress(OptogateError, asyncio.CancelledError):
            await request
        await asyncio.sleep(0.5)
        assert central.repo.snapshot().get_usage_batch("gw1", "big") is None
        assert central.repo.snapshot().list_usage("acme", 0, 2**62) == []
        assert server.status()["active_connections"] == 0


# ---------------------------------------------------------------------- the real process


@contextlib.contextmanager
def central_process(
    config: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "central", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        port = 0
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event["event"] == "started":
                port = int(event["listen"][0].rsplit(":", 1)[1])
                break
        assert port, proc.stderr.read() if proc.stderr else "no output"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_restarting_central_between_requests_loses_nothing(
    central: TempCentral, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(central)
    batch = _batch(central, "batch-r")
    gw = central.gateways["gw1"]

    async def session(port: int) -> tuple[bytes, bytes, bytes]:
        async with client(central, port) as link:
            await authenticate(link, "gw1", gw.outer, central.key.key_id)
            ack = await link.request(m.UsageReport(batch=batch), expect=m.UsageAck)
            data = await link.request(m.Sync(since_version=0), expect=m.SyncData)
            svc = await link.request(m.FetchService(service="echo"), expect=m.Service)
            return ack.sealed_ack, data.sealed_licences, svc.sealed_bundle

    notify_path = central.root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        with central_process(config, {"NOTIFY_SOCKET": str(notify_path)}) as (proc, port):
            assert notify.recv(64) == b"READY=1"  # systemd Type=notify readiness
            first = asyncio.run(session(port))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0

    async def refused(port: int) -> str:
        async with client(central, port) as link:
            with pytest.raises(RemoteError) as e:
                await authenticate(link, "gw1", gw.outer, central.key.key_id)
            return e.value.code

    with central_process(config) as (_, port):
        second = asyncio.run(session(port))
        # the admin CLI changes the database under the running server (another process)
        assert cli_main(["gateway", "revoke", "gw1", "--config", str(config)], "c") == 0
        assert asyncio.run(refused(port)) == "gateway_revoked"
    assert second == first  # same ack, same sealed licence set and bundle: nothing re-made
    assert len(central.repo.snapshot().list_usage("acme", 0, 2**62)) == 2
    actions = [a.action for a in central.repo.snapshot().list_audit()]
    assert actions.count("usage.store") == 1
    assert actions.count("usage.duplicate") == 1
    capsys.readouterr()
    assert cli_main(["status", "--config", str(config)], "optogate central") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["stopped"] is True
    assert status["auth_ok"] == 1  # the second run's counters
    assert status["usage_duplicate"] == 1
    assert status["refused_gateway_revoked"] == 1


def test_tls_context_rejects_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PortError):
        tls_server_context(tmp_path / "no.crt", tmp_path / "no.key")
    with pytest.raises(PortError):
        tls_client_context(tmp_path / "no-ca.crt")


@contextlib.asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[StreamTransport, StreamTransport]]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    ends = (StreamTransport(ra, wa), StreamTransport(rb, wb))
    try:
        yield ends
    finally:
        for end in ends:
            await end.aclose()


@pytest.mark.timeout(30)
async def test_watchdog_closes_silent_and_failing_connections(central: TempCentral) -> None:
    service = CentralService(central.repo, central.key, sync_expiry=86400)
    executor = core_executor()
    closed: list[dict[str, object]] = []

    def log(event: str, **fields: object) -> None:
        if event == "connection_closed":
            closed.append(fields)

    try:
        # never authenticates: closed after auth_timeout
        async with socket_pair() as (server_end, client_end):
            link = Link(client_end, SessionConfig(role=Role.CLIENT, baud=None))
            await serve_connection(service, server_end, executor=executor, log=log, auth_timeout=1)
            with contextlib.suppress(OptogateError):
                await link.aclose()
        # three refused attempts: closed
        async with socket_pair() as (server_end, client_end):
            link = Link(client_end, SessionConfig(role=Role.CLIENT, baud=None))
            serving = asyncio.ensure_future(
                serve_connection(service, server_end, executor=executor, log=log)
            )
            for _ in range(3):
                with pytest.raises(RemoteError):
                    await authenticate(link, "ghost", SigningKey.generate(), central.key.key_id)
            await asyncio.wait_for(serving, 10)
            with contextlib.suppress(OptogateError):
                await link.aclose()
    finally:
        executor.shutdown()
    assert [c["reason"] for c in closed] == ["auth_timeout", "too_many_auth_failures"]
    assert service.counters["closed_auth_timeout"] == 1


def _audited(central: TempCentral, action: str) -> bool:
    return any(a.action == action for a in central.repo.snapshot().list_audit())


@pytest.mark.timeout(30)
async def test_malformed_messages_are_answered_and_audited(central: TempCentral) -> None:
    async with serving(central) as (server, port), client(central, port) as link:
        await authenticate(link, "gw1", central.gateways["gw1"].outer, central.key.key_id)
        # The Link will not encode a malformed message, so put raw bytes on its session:
        # a readable envelope whose body has the wrong type.
        bad = cbor2.dumps(
            {"v": m.FORMAT_VERSION, "id": 5, "re": None, "body": {"since_version": "soon"}},
            canonical=True,
        )
        link._queue(MessageKind.SYNC, bad)
        async with asyncio.timeout(10):
            while not _audited(central, "gateway.bad_message"):  # noqa: ASYNC110 - a file
                await asyncio.sleep(0.1)
        # the connection is still good
        await link.request(m.Sync(since_version=0), expect=m.SyncData)
        assert server.status()["refused_bad_message"] == 1
