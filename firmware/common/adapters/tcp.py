"""TCP transport (optionally TLS) over asyncio streams.

The uplink from the outer module to central runs the same framed session as
the optical link, over TCP instead of a UART.  :func:`connect_tcp` dials,
:func:`serve_tcp` listens and hands each accepted connection to a callback;
both produce a :class:`StreamTransport`.  asyncio already disables Nagle's
algorithm on TCP sockets, so small acknowledgements are not delayed.  Every
``OSError`` (``ssl.SSLError`` is one) becomes a
:class:`~firmware.common.errors.PortError`.  End of stream is returned as b""
by :meth:`StreamTransport.read`: the peer closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

from firmware.common.adapters.transport import READ_SIZE
from firmware.common.errors import LinkClosed, PortError


class StreamTransport:
    """A :class:`~firmware.common.adapters.transport.Transport` over an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self._name = f"tcp:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "tcp"
        self._closed = False

    @property
    def name(self) -> str:
        """``tcp:HOST:PORT`` of the peer."""
        return self._name

    async def read(self) -> bytes:
        """Return the next bytes (at least one), or b"" once the peer closed.

        Raises PortError on a socket or TLS error, LinkClosed once closed locally.
        """
        if self._closed:
            raise LinkClosed(f"{self._name} is closed")
        try:
            return await self._reader.read(READ_SIZE)
        except OSError as e:
            if self._closed:
                raise LinkClosed(f"{self._name} is closed") from e
            raise PortError(f"{self._name}: read failed: {e}") from e

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` and wait for the socket buffer to drain.

        Raises PortError on a socket or TLS error, LinkClosed once closed locally.
        """
        if self._closed:
            raise LinkClosed(f"{self._name} is closed")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as e:
            raise PortError(f"{self._name}: write failed: {e}") from e

    async def aclose(self) -> None:
        """Close the connection (idempotent); errors while closing are ignored."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def connect_tcp(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10.0,
) -> StreamTransport:
    """Connect to ``host:port`` (TLS when ``ssl_context`` is given).

    Returns the connected transport.  Raises PortError when the connection or
    the TLS handshake fails or takes longer than ``connect_timeout`` seconds.
    """
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
    except TimeoutError as e:
        raise PortError(f"connecting to {host}:{port} timed out after {connect_timeout:g} s") from e
    except OSError as e:
        raise PortError(f"cannot connect to {host}:{port}: {e}") from e
    return StreamTransport(reader, writer)


async def serve_tcp(
    host: str,
    port: int,
    on_connect: Callable[[StreamTransport], Awaitable[None]],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Listen on ``host:port``; run ``on_connect(transport)`` for each connection.

    Returns the listening server (close it with ``server.close()``).  The
    transport is closed when ``on_connect`` returns or raises.  Raises
    PortError when the address cannot be bound.
    """

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = StreamTransport(reader, writer)
        try:
            await on_connect(transport)
        finally:
            await transport.aclose()

    try:
        return await asyncio.start_server(accepted, host, port, ssl=ssl_context)
    except OSError as e:
        raise PortError(f"cannot listen on {host}:{port}: {e}") from e
