"""The byte-stream interface the link session runs over.

A :class:`Transport` is the only thing the :class:`~firmware.common.link.link.Link`
facade needs from a carrier: read some bytes, write all bytes, close.  The
optical UART (:mod:`firmware.common.adapters.serial`), a modem's data stream
after CONNECT (the same serial adapter) and TCP to central
(:mod:`firmware.common.adapters.tcp`) all implement it, so the session and the
facade are the same code on every carrier.

Implementations wrap every foreign exception (``OSError``,
``serial.SerialException``, ``ssl.SSLError``...) in
:class:`~firmware.common.errors.PortError`, and raise
:class:`~firmware.common.errors.LinkClosed` once closed locally.
"""

from __future__ import annotations

from typing import Final, Protocol

#: Largest read handed out at once: a few frames, so one read never holds the
#: event loop for long; the kernel keeps the rest.
READ_SIZE: Final = 64 * 1024


class Transport(Protocol):
    """A bidirectional byte stream driven by the running asyncio loop."""

    @property
    def name(self) -> str:
        """A short description for logs (a device path or a peer address)."""
        ...

    async def read(self) -> bytes:
        """Return the next bytes received (at least one), or b"" at end of stream.

        Raises PortError when the carrier fails, LinkClosed once closed locally.
        Only one task may read at a time.
        """
        ...

    async def write(self, data: bytes) -> None:
        """Write all of ``data``; return once the operating system has taken it.

        Raises PortError when the carrier fails, LinkClosed once closed locally.
        """
        ...

    async def aclose(self) -> None:
        """Close the carrier; pending reads and writes raise LinkClosed.  Idempotent."""
        ...
