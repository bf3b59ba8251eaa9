"""asyncio adapters of the gateway protocol: TLS listeners, answering modems, one Link each.

Theory of operation
-------------------
Each accepted TCP connection (TLS 1.3, central's certificate) and each
answered modem call becomes one :class:`~firmware.common.link.link.Link` in
the SERVER role (``baud=None`` on TCP; the call's line speed on a modem),
paired with one :class:`~central_stub.gateway.GatewayConnection` that holds
its authentication state.  :func:`serve_connection` feeds every request to
the connection core with the wall clock's ``now`` and returns its reply.

The core does blocking work — sealing (HPKE, Ed25519), reading blobs, and
the fsyncs of a transaction — so it runs on **one worker thread** shared by
all connections, never on the event loop: the loop keeps every session's
acknowledgements and keepalives flowing while a request is being computed
(a blocked loop would starve 100 sessions into their 4 s dead-peer timeout).
One thread also means the core never runs twice at once, so its caches and
counters need no locks.

A **watchdog** per connection audits the messages its Link refused as
malformed (the Link answers them ``bad_message`` before any handler sees
them) and closes the connection when

* it has not authenticated within ``AUTH_TIMEOUT`` (an idle anonymous
  connection holds memory and a slot),
* it failed authentication ``MAX_AUTH_FAILURES`` times,
* it has been silent for ``IDLE_TIMEOUT`` (the outer module reconnects), or
* the session restarted inside it after authentication: a new session
  instance is a new peer as far as central knows, so it must authenticate
  again on a new connection.

Nothing here writes state itself: what a request stores, the core stores in
one transaction, so a peer that vanishes mid-transfer leaves nothing
half-written (an unfinished message is never handed to the core at all).

:class:`CentralServer` starts every configured listener, counts what it
refuses (``connections_refused`` over ``max_connections``), and exposes
:meth:`CentralServer.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final

from central_stub.config import CentralConfig, SerialListener
from central_stub.gateway import AuthState, CentralService, GatewayConnection
from firmware.common.adapters.tcp import StreamTransport, serve_tcp
from firmware.common.adapters.transport import Transport
from firmware.common.errors import LinkClosed, OptogateError, PortError
from firmware.common.link import messages
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

if TYPE_CHECKING:
    from firmware.outer.modem.port import ModemConnection

logger = logging.getLogger(__name__)

#: An outer module authenticates in two round trips; 30 s covers a slow
#: modem line with retransmissions and still frees the slot soon.
AUTH_TIMEOUT: Final = 30.0
#: An authenticated connection silent this long is closed; the outer module
#: dials again when it has something to do.
IDLE_TIMEOUT: Final = 300.0
#: Watchdog period: well under every timeout above.
WATCH_INTERVAL: Final = 0.5
#: How long shutdown waits for connections to wind down once their transports are closed.
CLOSE_GRACE: Final = 5.0
#: After a failed answer (port trouble), wait before opening the modem again.
MODEM_RETRY: Final = 5.0

Log = Callable[..., None]


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Return a TLS 1.3-only server context for central's certificate chain and key.

    Raises PortError if the files do not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise PortError(f"cannot load central's TLS certificate {cert}: {e}") from e
    return ctx


def tls_client_context(ca_cert: Path) -> ssl.SSLContext:
    """Return the context an outer module uses: TLS 1.3, trusting only central's CA.

    Raises PortError if the CA file does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=ca_cert)
    except (OSError, ssl.SSLError) as e:
        raise PortError(f"cannot load central's CA certificate {ca_cert}: {e}") from e
    return ctx


def core_executor() -> ThreadPoolExecutor:
    """Return the one-thread executor the protocol core runs on (shut it down when done)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ThreadPoolExecutor-central-core")


async def serve_connection(
    service: CentralService,
    transport: Transport,
    *,
    executor: ThreadPoolExecutor,
    baud: int | None = None,
    log: Log,
    auth_timeout: float = AUTH_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> None:
    """Serve one gateway connection until it ends; return None.  Never raises an optogate error."""
    peer = transport.name
    conn = GatewayConnection(service, peer)
    loop = asyncio.get_running_loop()
    started = last_request = loop.time()
    link = Link(transport, SessionConfig(role=Role.SERVER, baud=baud))
    sessions_at_auth: int | None = None

    async def handler(msg: messages.Message) -> messages.Message:
        nonlocal last_request, sessions_at_auth
        last_request = loop.time()
        was = conn.state
        reply = await loop.run_in_executor(executor, conn.handle, msg, int(time.time()))
        if was is not AuthState.AUTHENTICATED and conn.state is AuthState.AUTHENTICATED:
            sessions_at_auth = link.statistics().get("sessions_up", 0)
        return reply

    async def watchdog() -> str:
        audited_rejects = 0
        was_up = False
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = loop.time()
            # A session that was up and is down means the gateway is gone (its
            # call dropped, it hung up, it lost power).  End the connection
            # rather than wait for the idle timeout: on an answering modem the
            # line is then hung up and free for the next call, even where the
            # port cannot see carrier loss (a pty has no DCD line).
            if link.connected:
                was_up = True
            elif was_up:
                return "session_down"
            # the Link answers a malformed message bad_message itself; audit them here
            rejected = link.statistics().get("link_rejected", 0)
            if rejected > audited_rejects:
                count, audited_rejects = rejected - audited_rejects, rejected
                try:
                    await loop.run_in_executor(
                        executor, service.malformed, int(time.time()), peer, conn.gateway_id, count
                    )
                except OptogateError as e:  # the storage failed: say so, keep serving
                    log("audit_failed", peer=peer, error=str(e))
            if conn.should_close:
                return "too_many_auth_failures"
            if conn.state is not AuthState.AUTHENTICATED and now - started > auth_timeout:
                return "auth_timeout"
            if now - last_request > idle_timeout:
                return "idle_timeout"
            if (
                sessions_at_auth is not None
                and link.statistics().get("sessions_up", 0) != sessions_at_auth
            ):
                return "session_restarted"

    service.counters["connections"] += 1
    log("connection_open", peer=peer)
    reason = "closed"
    serving = asyncio.ensure_future(link.serve(handler))
    watching = asyncio.ensure_future(watchdog())
    try:
        done, _ = await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
        if watching in done:
            reason = watching.result()
            service.counters[f"closed_{reason}"] += 1
        else:
            exc = serving.exception()
            if exc is not None and not isinstance(exc, OptogateError):
                service.counters["handler_crashes"] += 1
                logger.error("gateway handler crashed: %r", exc)
                reason = f"bug: {type(exc).__name__}"
            elif exc is not None:
                reason = type(exc).__name__
    finally:
        for task in (serving, watching):
            task.cancel()
        await asyncio.gather(serving, watching, return_exceptions=True)
        with contextlib.suppress(OptogateError):
            await link.aclose()
        log(
            "connection_closed",
            peer=peer,
            gateway=conn.gateway_id,
            reason=reason,
            seconds=round(loop.time() - started, 3),
        )


class ModemTransport:
    """A :class:`Transport` over one answered modem call (``ModemConnection``)."""

    def __init__(self, conn: ModemConnection, name: str) -> None:
        self._conn = conn
        self._name = name
        self._closed = False

    @property
    def name(self) -> str:
        """``modem:DEVICE``."""
        return self._name

    async def read(self) -> bytes:
        """Return call data, b"" once the call is over.  Raises PortError, LinkClosed."""
        if self._closed:
            raise LinkClosed(f"{self._name} is closed")
        data: bytes = await self._conn.read()
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` on the call.  Raises PortError (the call is gone), LinkClosed."""
        if self._closed:
            raise LinkClosed(f"{self._name} is closed")
        try:
            self._conn.write(data)
            await self._conn.drain()
        except OptogateError as e:
            if isinstance(e, PortError):
                raise
            raise PortError(f"{self._name}: {e}") from e

    async def aclose(self) -> None:
        """Hang up (idempotent); a modem that does not confirm is logged by its adapter."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OptogateError):
            await self._conn.hangup()


class CentralServer:
    """Every listener of one central process; see the module docstring."""

    def __init__(self, config: CentralConfig, service: CentralService, log: Log) -> None:
        self.config = config
        self.service = service
        self.log = log
        self.addresses: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self._modems: list[asyncio.Task[None]] = []
        self._transports: set[Transport] = set()
        self._idle = asyncio.Event()
        self._executor = core_executor()
        self._active = 0
        self._started = time.time()

    def status(self) -> dict[str, object]:
        """Return counters and state: connections, refusals, listeners."""
        out: dict[str, object] = {
            "uptime_s": round(time.time() - self._started, 1),
            "active_connections": self._active,
            "listen": [f"{h}:{p}" for h, p in self.addresses],
            "serial": [s.port for s in self.config.serial],
        }
        # the core thread adds counters; dict() copies in one step under the GIL
        out.update(sorted(dict(self.service.counters).items()))
        return out

    async def _on_tcp(self, transport: StreamTransport) -> None:
        if self._active >= self.config.max_connections:
            self.service.counters["connections_refused"] += 1
            self.log("connection_refused", peer=transport.name, reason="max_connections")
            return
        self._active += 1
        self._idle.clear()
        self._transports.add(transport)
        try:
            await serve_connection(self.service, transport, executor=self._executor, log=self.log)
        finally:
            self._transports.discard(transport)
            self._leave()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def start(self, ssl_context: ssl.SSLContext | None) -> None:
        """Start every TCP listener and modem; raises PortError if an address cannot be bound."""
        for item in self.config.listen:
            server = await serve_tcp(item.host, item.port, self._on_tcp, ssl_context=ssl_context)
            self._servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.addresses.append((host, port))
                self.log("listening", address=f"{host}:{port}", tls=ssl_context is not None)
        for serial in self.config.serial:
            task = asyncio.create_task(self._answer_loop(serial), name=f"modem {serial.port}")
            self._modems.append(task)

    async def _answer_loop(self, serial: SerialListener) -> None:
        from firmware.outer.modem.dialler import DiallerConfig
        from firmware.outer.modem.port import ModemConnection

        def modem_log(event: str, **fields: object) -> None:
            self.log(f"modem_{event}", port=serial.port, **fields)

        while True:
            try:
                conn = await ModemConnection.open(
                    serial.port,
                    DiallerConfig(auto_answer_rings=serial.auto_answer_rings),
                    baudrate=serial.baudrate,
                    log=modem_log,
                )
            except OptogateError as e:
                self.service.counters["modem_open_failures"] += 1
                self.log("modem_unavailable", port=serial.port, error=str(e))
                await asyncio.sleep(MODEM_RETRY)
                continue
            try:
                while True:
                    connected = await conn.answer()
                    self.log("modem_call", port=serial.port, speed=connected.speed)
                    if self._active >= self.config.max_connections:
                        self.service.counters["connections_refused"] += 1
                        await conn.hangup()
                        continue
                    self._active += 1
                    self._idle.clear()
                    try:
                        await serve_connection(
                            self.service,
                            ModemTransport(conn, f"modem:{serial.port}"),
                            executor=self._executor,
                            baud=connected.speed or serial.baudrate,
                            log=self.log,
                        )
                    finally:
                        self._leave()
            except OptogateError as e:
                self.service.counters["modem_failures"] += 1
                self.log("modem_failed", port=serial.port, error=str(e))
                await asyncio.sleep(MODEM_RETRY)
            finally:
                with contextlib.suppress(OptogateError):
                    await conn.close()

    async def aclose(self) -> None:
        """Stop listening, end the modem loops and close every server (idempotent)."""
        for server in self._servers:
            server.close()
        for task in self._modems:
            task.cancel()
        await asyncio.gather(*self._modems, return_exceptions=True)
        # closing a transport ends its Link, so each connection returns normally
        for transport in list(self._transports):
            await transport.aclose()
        if self._active:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._idle.wait()
        for server in self._servers:
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()
        self._servers.clear()
        self._modems.clear()
        self._executor.shutdown(wait=True)  # the core finishes the request it is on
