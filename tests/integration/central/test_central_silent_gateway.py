"""A gateway that goes silent without closing its line is let go promptly.

On an answering modem over a pty there is no DCD line, and the emulator in
command mode echoes what central sends, so the port may never report the end
of a call.  Central must still notice that the gateway's session died (by
keepalive) and end the connection, so the line is hung up and free for the
next call, instead of holding it until the 300 s idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from pathlib import Path

import pytest

from central_stub.client import authenticate
from central_stub.config import Listen
from central_stub.gateway import CentralService
from central_stub.server import CentralServer
from central_stub.testing import make_central
from firmware.common.adapters.tcp import connect_tcp
from firmware.common.errors import OptogateError
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

pytestmark = [pytest.mark.integration]

NOW = int(time.time())


class FreezableRelay:
    """A TCP relay that can stop forwarding without closing either side."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the line has gone quiet
                writer.write(data)
                await writer.drain()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for r, w in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(r, w))
            self.tasks.add(task)

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def aclose(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


@pytest.mark.timeout(60)
async def test_a_silent_gateway_is_let_go_by_keepalive_not_the_idle_timeout(
    tmp_path: Path,
) -> None:
    central = make_central(tmp_path, now=NOW)
    gw = central.gateways["gw1"]
    events: list[tuple[str, dict[str, object]]] = []
    config = replace(central.config, listen=(Listen("127.0.0.1", 0),))
    service = CentralService(central.repo, central.key, sync_expiry=config.sync_expiry)
    server = CentralServer(config, service, lambda e, **f: events.append((e, f)))
    await server.start(None)
    relay = FreezableRelay(server.addresses[0])
    link = None
    try:
        host, port = await relay.start()
        link = Link(await connect_tcp(host, port), SessionConfig(role=Role.CLIENT, baud=None))
        await authenticate(link, "gw1", gw.outer, central.key.key_id, timeout=20)
        relay.frozen.set()
        frozen_at = time.monotonic()
        async with asyncio.timeout(20):  # keepalive (4 s) plus the watchdog's tick
            while server.status()["active_connections"]:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert time.monotonic() - frozen_at < 10
        closed = [f for e, f in events if e == "connection_closed"]
        assert closed[-1]["reason"] == "session_down"
    finally:
        if link is not None:
            with contextlib.suppress(OptogateError):
                await link.aclose()
        await relay.aclose()
        await server.aclose()
