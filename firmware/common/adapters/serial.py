"""Serial-port transport: pyserial to open and configure, the event loop to move bytes.

Theory of operation
-------------------
:func:`open_serial` opens a port with pyserial only to get the configuration
right: raw 8N1 at the given baud, no software or hardware flow control (the
optocouplers carry TX and RX only), ``exclusive=True`` so a second program
cannot share the port, and DTR/RTS set explicitly *before* opening so pyserial
asserts them once instead of toggling them (a modem hangs up when DTR drops).
Bytes left in the input queue from before we opened are flushed.

From then on pyserial is out of the data path: the port's file descriptor is
non-blocking and :class:`FdTransport` moves bytes with ``os.read`` /
``os.write`` driven by ``loop.add_reader`` / ``loop.add_writer``.  That avoids
pyserial's ``select``-based timeouts and threads entirely.  Received bytes are
buffered up to ``MAX_BUFFERED`` and the reader is paused beyond that, so a
slow consumer pushes back into the kernel (and, on a pty, into the sender)
instead of growing memory.  Every ``OSError``, and end of file (a tty that
hung up), becomes a :class:`~firmware.common.errors.PortError`.

:class:`FdTransport` also wraps any other descriptor that behaves like a tty
(a pty master in tests, a pipe).  On Linux a pty whose other end is closed
reads as ``EIO`` (master) or end of file (slave); both are a PortError: the
device is gone, which a real UART never reports (its line just goes quiet and
the session's keepalive decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Final

import serial as pyserial

from firmware.common.adapters.transport import READ_SIZE
from firmware.common.errors import LinkClosed, LocalProtocolError, PortError

#: Received bytes held for the reader before the descriptor is no longer
#: polled: a second at 4 Mbaud, far more than one frame.
MAX_BUFFERED: Final = 512 * 1024


class FdTransport:
    """A :class:`~firmware.common.adapters.transport.Transport` over a non-blocking descriptor.

    Must be created inside a running event loop.  Closing the transport
    closes ``fd`` too unless ``close_fd`` is False (the owner closes it).
    """

    def __init__(self, fd: int, name: str, *, close_fd: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._name = name
        self._close_fd = close_fd
        os.set_blocking(fd, False)
        self._buf = bytearray()
        self._error: PortError | None = None
        self._closed = False
        self._reading = False  # add_reader is registered
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self._start_reading()

    @property
    def name(self) -> str:
        """The device path or description given at creation."""
        return self._name

    # -- reading -------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._error = PortError(f"{self._name}: read failed: {e}")
            self._error.__cause__ = e
            self._stop_reading()
        else:
            if data:
                self._buf += data
                if len(self._buf) >= MAX_BUFFERED:
                    self._stop_reading()  # back-pressure until the reader catches up
            else:
                # End of file on a tty means hang-up (a pty's far end closed).
                self._error = PortError(f"{self._name}: hung up")
                self._stop_reading()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """Return the bytes received so far, waiting for at least one.

        Raises PortError when the descriptor fails, LinkClosed once closed,
        LocalProtocolError when another task is already reading.
        """
        if self._waiter is not None:
            raise LocalProtocolError(f"{self._name}: two tasks reading at once")
        while not self._buf:
            if self._closed:
                raise LinkClosed(f"{self._name} is closed")
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        if not (self._error or self._closed):
            self._start_reading()
        return data

    # -- writing -------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Write all of ``data``, waiting for the descriptor to become writable.

        Raises PortError when the descriptor fails, LinkClosed once closed.
        """
        view = memoryview(data)
        while view:
            if self._closed:
                raise LinkClosed(f"{self._name} is closed")
            try:
                n = os.write(self._fd, view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                raise PortError(f"{self._name}: write failed: {e}") from e
            view = view[n:]
            if view:
                await self._writable()

    async def _writable(self) -> None:
        self._writer = fut = self._loop.create_future()
        self._loop.add_writer(self._fd, _wake, fut)
        try:
            await fut
        finally:
            self._writer = None
            if not self._closed:
                self._loop.remove_writer(self._fd)

    # -- closing -------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop polling and close the descriptor; pending I/O raises LinkClosed."""
        self.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose`, for cleanup paths that cannot await."""
        if self._closed:
            return
        self._stop_reading()
        self._closed = True
        self._loop.remove_writer(self._fd)
        for fut in (self._waiter, self._writer):
            if fut is not None and not fut.done():
                fut.set_result(None)  # the woken task sees _closed and raises
        if self._close_fd:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SerialTransport(FdTransport):
    """A serial port opened by :func:`open_serial`; closing it closes the port."""

    def __init__(self, port: pyserial.Serial, name: str) -> None:
        self._port = port
        super().__init__(port.fileno(), name, close_fd=False)

    @property
    def baud(self) -> int:
        """The configured line rate in baud."""
        return int(self._port.baudrate)

    def close(self) -> None:
        """Close the port (idempotent)."""
        super().close()
        with contextlib.suppress(OSError, pyserial.SerialException):
            self._port.close()


async def open_serial(
    device: str, baud: int, *, dtr: bool = True, rts: bool = True
) -> SerialTransport:
    """Open ``device`` raw 8N1 at ``baud``, exclusively, with DTR/RTS as given.

    Returns a SerialTransport bound to the running loop.  Raises PortError when
    the device cannot be opened or configured (missing, busy, not a tty, bad
    baud rate).
    """
    port = pyserial.Serial()
    try:
        port.port = device
        port.baudrate = baud
        port.bytesize = pyserial.EIGHTBITS
        port.parity = pyserial.PARITY_NONE
        port.stopbits = pyserial.STOPBITS_ONE
        port.xonxoff = False
        port.rtscts = False
        port.dsrdtr = False
        port.timeout = 0
        port.exclusive = True
        # Set before open(): pyserial then applies them once, with no toggle.
        port.dtr = dtr
        port.rts = rts
        port.open()
        port.reset_input_buffer()
    except (OSError, ValueError, pyserial.SerialException) as e:
        with contextlib.suppress(Exception):
            port.close()
        raise PortError(f"cannot open {device} at {baud} baud: {e}") from e
    try:
        return SerialTransport(port, device)
    except OSError as e:
        port.close()
        raise PortError(f"cannot poll {device}: {e}") from e
