"""Central answering a modem: the emulator rings, central's modem driver answers, a gateway syncs.

The calling side is the emulator's TCP listener (an incoming call); the
answering side is central's ``[[serial]]`` listener on the emulator's pty,
driven by the real AT dialler in answer mode (RING, then ATA).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from central_stub.client import authenticate
from central_stub.config import SerialListener
from central_stub.gateway import CentralService
from central_stub.server import CentralServer
from central_stub.testing import TempCentral, make_central
from firmware.common.adapters.tcp import connect_tcp
from firmware.common.crypto.freshness import SyncVerifier
from firmware.common.errors import OptogateError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOW = int(time.time())
#: The emulator's CONNECT speed; the calling side paces its session to it.
LINE_SPEED = 33600


@contextlib.contextmanager
def modem_emulator() -> Iterator[tuple[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "sim", "modem", "--answer",
         "--listen", "127.0.0.1:0", "--ring-interval", "0.5", "--answer-delay", "0.2",
         "--speed", str(LINE_SPEED)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield ready["port"], ready["listen"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _until_idle(server: CentralServer) -> None:
    # one call at a time: the caller redials once central has hung up the last one
    # (on a pty there is no DCD, so central notices the caller's hang-up by keepalive)
    async with asyncio.timeout(20):
        while server.status()["active_connections"]:  # noqa: ASYNC110 - another party's state
            await asyncio.sleep(0.1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("rings", "calls"),
    [(0, 2), (2, 1)],
    ids=["ring-then-ATA-two-calls", "auto-answer-S0=2"],
)
async def test_gateway_calls_central_through_an_answering_modem(
    tmp_path: Path, rings: int, calls: int
) -> None:
    central: TempCentral = make_central(tmp_path, now=NOW)
    gw = central.gateways["gw1"]
    events: list[str] = []
    with modem_emulator() as (pty, listen):
        config = replace(central.config, serial=(SerialListener(pty, auto_answer_rings=rings),))
        service = CentralService(central.repo, central.key, sync_expiry=config.sync_expiry)
        server = CentralServer(config, service, lambda event, **fields: events.append(event))
        await server.start(None)
        try:
            await asyncio.sleep(2.0)  # the driver resets the modem and waits for RING
            host, port = listen.rsplit(":", 1)
            for _ in range(calls):  # after a call hangs up, central answers the next
                await _until_idle(server)
                transport = await connect_tcp(host, int(port))  # the caller dials in
                link = Link(transport, SessionConfig(role=Role.CLIENT, baud=LINE_SPEED))
                try:
                    await authenticate(link, "gw1", gw.outer, central.key.key_id, timeout=45)
                    data = await link.request(
                        m.Sync(since_version=0), expect=m.SyncData, timeout=30
                    )
                finally:
                    with contextlib.suppress(OptogateError):
                        await link.aclose()
            verifier = SyncVerifier(recipient=gw.inner_hpke, central=central.public, gateway="gw1")
            verifier.accept_sync_metadata(data.sealed, NOW)
            licences = verifier.accept_licence_set(data.sealed_licences, NOW)
            assert [lic.service for lic in licences.licences] == ["echo"]
            assert events.count("modem_call") == calls
            assert server.status()["auth_ok"] == calls
        finally:
            await server.aclose()
