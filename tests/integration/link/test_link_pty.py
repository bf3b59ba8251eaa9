"""The Link facade over real carriers: a raw pty pair (in process) and loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tty
from collections.abc import Awaitable, Callable, Iterator

import pytest

from firmware.common.adapters.serial import FdTransport, open_serial
from firmware.common.adapters.tcp import StreamTransport, connect_tcp, serve_tcp
from firmware.common.errors import (
    LinkClosed,
    LinkDown,
    LinkTimeout,
    LocalProtocolError,
    PeerRestarted,
    PortError,
    RemoteError,
)
from firmware.common.link import messages as m
from firmware.common.link.link import Handler, Link, LinkFailed
from firmware.common.link.session import Role, SessionConfig, SessionDown, SessionUp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

#: A pty has no line rate; the session still paces as if it had this one.
BAUD = 921_600


def config(role: Role, **kw: object) -> SessionConfig:
    return SessionConfig(role=role, baud=BAUD, **kw)  # type: ignore[arg-type]


class PtyPair:
    """A raw pty pair: the master fd (no path) and the slave's device path."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        # Keep the slave open until the test opens it by path, so the pair
        # never hangs up in between; the test's own open replaces this one.
        self._slave = slave

    def release_slave(self) -> None:
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1

    def close(self) -> None:
        self.release_slave()
        with contextlib.suppress(OSError):
            os.close(self.master)


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    pair = PtyPair()
    yield pair
    pair.close()


async def echo_handler(msg: m.Message) -> m.Message | None:
    if isinstance(msg, m.LinkEcho):
        return m.LinkEchoReply(nonce=msg.nonce, sent_at=msg.sent_at)
    if isinstance(msg, m.Status):
        return m.StatusReport(fields={"ok": True})
    if isinstance(msg, m.Sync):
        raise RemoteError("not_now", "come back later", 2.5)
    if isinstance(msg, m.FetchService) and msg.service == "slow":
        await asyncio.sleep(3600)
    return None


async def close_quietly(link: Link) -> None:
    """Close a link whose carrier the test broke on purpose."""
    with contextlib.suppress(LinkDown, PortError, LinkClosed):
        await link.aclose()


async def with_links(
    pair: PtyPair,
    body: Callable[[Link, Link], Awaitable[None]],
    handler: Handler = echo_handler,
) -> None:
    """Run ``body(client, server)``: client on the slave by path, server on the master."""
    server = Link(
        FdTransport(pair.master, "pty-master", close_fd=False),
        config(Role.SERVER),
        rng=random.Random(1),
    )
    client_port = await open_serial(pair.path, BAUD)
    pair.release_slave()
    client = Link(client_port, config(Role.CLIENT), rng=random.Random(2))
    serving = asyncio.create_task(server.serve(handler))
    try:
        await client.wait_up(5)
        await server.wait_up(5)
        await body(client, server)
    finally:
        try:
            await client.aclose()
        finally:
            await close_quietly(server)
            await asyncio.wait_for(serving, 5)


@pytest.mark.asyncio
async def test_echo_round_trip_over_a_pty(pty_pair: PtyPair) -> None:
    async def body(client: Link, server: Link) -> None:
        reply = await client.request(m.LinkEcho(nonce=b"abc", sent_at=1.5), expect=m.LinkEchoReply)
        assert reply == m.LinkEchoReply(nonce=b"abc", sent_at=1.5)
        assert client.connected
        assert server.connected
        stats = client.statistics()
        assert stats["link_requests"] == 1
        assert stats["messages_sent"] >= 1

    await with_links(pty_pair, body)


@pytest.mark.asyncio
async def test_many_exchanges_in_flight_map_to_their_replies(pty_pair: PtyPair) -> None:
    async def body(client: Link, server: Link) -> None:
        nonces = [os.urandom(8) for _ in range(40)]
        replies = await asyncio.gather(
            *(client.request(m.LinkEcho(nonce=n, sent_at=float(i))) for i, n in enumerate(nonces))
        )
        assert [(r.nonce, r.sent_at) for r in replies] == [  # type: ignore[attr-defined]
            (n, float(i)) for i, n in enumerate(nonces)
        ]

    await with_links(pty_pair, body)


@pytest.mark.asyncio
async def test_control_message_overtakes_a_bulk_message(pty_pair: PtyPair) -> None:
    received: list[str] = []

    async def handler(msg: m.Message) -> m.Message | None:
        received.append(type(msg).__name__)
        return await echo_handler(msg)

    async def body(client: Link, server: Link) -> None:
        bulk = asyncio.create_task(
            client.send(m.LinkData(chunk=os.urandom(200_000), index=0, last=False))
        )
        await asyncio.sleep(0.05)  # the bulk message (~2 s of line time) is on the line
        echo = await client.request(m.LinkEcho(nonce=b"x", sent_at=0.0), timeout=10)
        assert isinstance(echo, m.LinkEchoReply)
        await asyncio.wait_for(bulk, 20)
        assert received == ["LinkEcho", "LinkData"]

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_remote_error_and_typed_replies(pty_pair: PtyPair) -> None:
    async def body(client: Link, server: Link) -> None:
        with pytest.raises(RemoteError) as info:
            await client.request(m.Sync(since_version=0))
        assert info.value.code == "not_now"
        assert info.value.retry_after == 2.5
        report = await client.request(m.Status(), expect=m.StatusReport)
        assert report.fields == {"ok": True}
        with pytest.raises(m.InvalidMessage, match="not a LinkDigest"):
            await client.request(m.Status(), expect=m.LinkDigest)

    await with_links(pty_pair, body)


@pytest.mark.asyncio
async def test_unanswered_request_times_out_and_a_late_reply_is_counted(
    pty_pair: PtyPair,
) -> None:
    release = asyncio.Event()

    async def handler(msg: m.Message) -> m.Message | None:
        await release.wait()
        return m.StatusReport(fields={})

    async def body(client: Link, server: Link) -> None:
        with pytest.raises(LinkTimeout):
            await client.request(m.Status(), timeout=0.3)
        release.set()
        for _ in range(100):
            if client.statistics().get("link_late_replies"):
                break
            await asyncio.sleep(0.02)
        assert client.statistics()["link_late_replies"] == 1
        assert client.statistics()["link_timeouts"] == 1

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_direction_rules(pty_pair: PtyPair) -> None:
    async def body(client: Link, server: Link) -> None:
        with pytest.raises(LocalProtocolError, match="server role may not send"):
            await server.request(m.Status())
        with pytest.raises(LocalProtocolError, match="is a reply"):
            await client.request(m.AuthOk())
        # Maintenance kinds travel either way: the client answers the server's echo
        # even though it never serves requests of the request range.
        answered: list[m.Message] = []

        async def client_handler(msg: m.Message) -> m.Message | None:
            answered.append(msg)
            return await echo_handler(msg)

        serving = asyncio.create_task(client.serve(client_handler))
        reply = await server.request(m.LinkEcho(nonce=b"s", sent_at=2.0), timeout=5)
        assert isinstance(reply, m.LinkEchoReply)
        assert [type(a) for a in answered] == [m.LinkEcho]
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    await with_links(pty_pair, body)


@pytest.mark.asyncio
async def test_force_down_fails_exchanges_in_flight_then_recovers(pty_pair: PtyPair) -> None:
    async def body(client: Link, server: Link) -> None:
        pending = asyncio.create_task(client.request(m.FetchService(service="slow"), timeout=10))
        await asyncio.sleep(0.2)
        client.force_down(LinkDown("peer power line dropped"))
        with pytest.raises(LinkDown, match="power line"):
            await pending
        await client.wait_up(5)
        reply = await client.request(m.LinkEcho(nonce=b"again", sent_at=0.0), timeout=5)
        assert isinstance(reply, m.LinkEchoReply)
        assert client.statistics()["forced_down"] == 1

    await with_links(pty_pair, body)


@pytest.mark.asyncio
async def test_peer_restart_fails_exchange_with_peer_restarted(pty_pair: PtyPair) -> None:
    server = Link(FdTransport(pty_pair.master, "pty-master", close_fd=False), config(Role.SERVER))
    serving = asyncio.create_task(server.serve(echo_handler))
    client = Link(await open_serial(pty_pair.path, BAUD), config(Role.CLIENT))
    pty_pair.release_slave()
    try:
        await client.wait_up(5)
        pending = asyncio.create_task(client.request(m.FetchService(service="slow"), timeout=10))
        await asyncio.sleep(0.2)
        # The server "reboots": a new Link (new epoch) on the same line.
        await server.aclose()
        await asyncio.wait_for(serving, 5)
        server = Link(
            FdTransport(pty_pair.master, "pty-master", close_fd=False), config(Role.SERVER)
        )
        serving = asyncio.create_task(server.serve(echo_handler))
        with pytest.raises(PeerRestarted):
            await pending
        reply = await client.request(m.LinkEcho(nonce=b"new", sent_at=0.0), timeout=5)
        assert isinstance(reply, m.LinkEchoReply)
        assert client.statistics()["peer_restarts"] == 1
    finally:
        await client.aclose()
        await close_quietly(server)
        await asyncio.wait_for(serving, 5)


@pytest.mark.asyncio
async def test_requests_wait_for_the_session_then_time_out(pty_pair: PtyPair) -> None:
    # Nobody at the far end: the request waits for the session, within its bound.
    client = Link(await open_serial(pty_pair.path, BAUD), config(Role.CLIENT))
    try:
        with pytest.raises(LinkTimeout):
            await client.request(m.Status(), timeout=0.3)
        with pytest.raises(LinkTimeout):
            await client.wait_up(0.1)
        assert not client.connected
    finally:
        await client.aclose()
    with pytest.raises(LinkClosed):
        await client.request(m.Status())


@pytest.mark.asyncio
async def test_carrier_failure_reaches_every_caller(pty_pair: PtyPair) -> None:
    client = Link(await open_serial(pty_pair.path, BAUD), config(Role.CLIENT))
    pending = asyncio.create_task(client.request(m.Status(), timeout=10))
    await asyncio.sleep(0.1)
    pty_pair.close()  # the far end of the line disappears: reads fail with EIO
    with pytest.raises(PortError):
        await pending
    with pytest.raises(PortError):
        await client.request(m.Status())
    await client.aclose()  # the failure was reported: closing is quiet


@pytest.mark.asyncio
async def test_unreported_failure_is_raised_by_aclose(pty_pair: PtyPair) -> None:
    client = Link(await open_serial(pty_pair.path, BAUD), config(Role.CLIENT))
    await asyncio.sleep(0.05)
    pty_pair.close()
    for _ in range(100):
        if client.failed:
            break
        await asyncio.sleep(0.02)
    assert client.failed
    with pytest.raises(PortError):
        await client.aclose()


@pytest.mark.asyncio
async def test_handler_bug_answers_internal_error_and_surfaces_in_serve(
    pty_pair: PtyPair,
) -> None:
    async def buggy(msg: m.Message) -> m.Message | None:
        raise ZeroDivisionError("bug")

    server = Link(FdTransport(pty_pair.master, "pty-master", close_fd=False), config(Role.SERVER))
    client = Link(await open_serial(pty_pair.path, BAUD), config(Role.CLIENT))
    pty_pair.release_slave()
    serving = asyncio.create_task(server.serve(buggy))
    try:
        with pytest.raises(RemoteError) as info:
            await client.request(m.Status(), timeout=5)
        assert info.value.code == "internal_error"
        with pytest.raises(ZeroDivisionError):
            await asyncio.wait_for(serving, 5)
    finally:
        await client.aclose()
        await server.aclose()


@pytest.mark.asyncio
async def test_open_serial_errors_are_port_errors(tmp_path: object) -> None:
    with pytest.raises(PortError, match="cannot open"):
        await open_serial("/dev/nonexistent-optogate-port", 115200)


@pytest.mark.asyncio
async def test_open_serial_is_exclusive(pty_pair: PtyPair) -> None:
    first = await open_serial(pty_pair.path, BAUD)
    try:
        with pytest.raises(PortError):
            await open_serial(pty_pair.path, BAUD)
    finally:
        await first.aclose()


@pytest.mark.asyncio
async def test_links_over_loopback_tcp() -> None:
    accepted: asyncio.Queue[StreamTransport] = asyncio.Queue()
    done = asyncio.Event()

    async def on_connect(transport: StreamTransport) -> None:
        await accepted.put(transport)
        await done.wait()

    server_sock = await serve_tcp("127.0.0.1", 0, on_connect)
    port = server_sock.sockets[0].getsockname()[1]
    client = Link(await connect_tcp("127.0.0.1", port), SessionConfig(Role.CLIENT, baud=None))
    server = Link(await accepted.get(), SessionConfig(Role.SERVER, baud=None))
    serving = asyncio.create_task(server.serve(echo_handler))
    try:
        replies = await asyncio.gather(
            *(client.request(m.LinkEcho(nonce=bytes([i + 1]), sent_at=0.0)) for i in range(20))
        )
        assert len(replies) == 20
        await client.aclose()
        # The server sees the connection close: the session goes down for good.
        with pytest.raises(LinkDown, match="closed the connection"):
            await asyncio.wait_for(serving, 5)
    finally:
        await client.aclose()
        await close_quietly(server)
        done.set()
        server_sock.close()
        await server_sock.wait_closed()


@pytest.mark.asyncio
async def test_connect_tcp_refused_is_a_port_error() -> None:
    server_sock = await serve_tcp("127.0.0.1", 0, lambda t: asyncio.sleep(0))
    port = server_sock.sockets[0].getsockname()[1]
    server_sock.close()
    await server_sock.wait_closed()
    with pytest.raises(PortError, match="cannot connect"):
        await connect_tcp("127.0.0.1", port)


async def test_listeners_hear_up_down_and_failure(pty_pair: PtyPair) -> None:
    server = Link(FdTransport(pty_pair.master, "pty-master", close_fd=False), config(Role.SERVER))
    client = Link(await open_serial(pty_pair.path, BAUD), config(Role.CLIENT))
    pty_pair.release_slave()
    heard: list[object] = []
    client.add_listener(heard.append)
    try:
        await client.wait_up(5)
        client.force_down(LinkDown("power line"))
        await client.wait_up(5)
        await server.aclose()
        pty_pair.close()  # the line is gone: the client's port hangs up
        for _ in range(200):
            if client.failed:
                break
            await asyncio.sleep(0.02)
    finally:
        await close_quietly(client)
    kinds = [type(e) for e in heard]
    assert kinds == [SessionUp, SessionDown, SessionUp, LinkFailed]
    assert isinstance(heard[1], SessionDown)
    assert "power line" in str(heard[1].error)
    assert isinstance(heard[3], LinkFailed)
    assert isinstance(heard[3].error, PortError)


async def test_a_listener_that_raises_fails_the_link(pty_pair: PtyPair) -> None:
    def broken(event: object) -> None:
        raise KeyError("listener bug")

    async def body(client: Link, server: Link) -> None:
        client.add_listener(broken)
        client.force_down(LinkDown("test"))
        assert client.failed
        with pytest.raises(KeyError):
            await client.request(m.Status())

    with pytest.raises(KeyError):  # a bug is raised by aclose even once reported
        await with_links(pty_pair, body)
