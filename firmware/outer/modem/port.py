"""asyncio adapter: a modem on a pyserial port, driven by the dialler core.

Theory of operation
-------------------
:class:`ModemPort` owns the serial port: it opens it exclusively, sets DTR
and RTS high explicitly before the open (pyserial would otherwise pulse them,
and a modem hangs up on a DTR drop), flushes stale input, and reads and
writes the descriptor without blocking through the event loop.  Whether the
port has modem-control lines is found out by using them: a pty has none, so
setting DTR fails and the dialler falls back to the escape sequence.

:class:`ModemConnection` runs one :class:`~firmware.outer.modem.dialler.Dialler`
on it: a single task feeds the core what the port reads, writes what the core
sends, applies its :class:`~firmware.outer.modem.dialler.SetDTR` actions and
sleeps until its next deadline (every wait in the core has one, so no
operation here can hang).  With ``keep_ready`` in the configuration the
modem is prepared (reset and initialised) as soon as the port is open, and
again by the core after each call, so a dial finds it READY; a preparation
that fails is logged (``prepare_failed``) and kept in ``prepare_error``,
and the next dial runs the full reset.  Once connected, the call's data
stream is exposed with a deliberately small interface for the framed link
session::

    conn = await ModemConnection.open("/dev/ttyACM0", DiallerConfig(number="5551234"))
    await conn.dial()                   # raises Busy, NoCarrier, CallLimitReached...
    data = await conn.read()            # b"" once the call is over
    conn.write(frame); await conn.drain()
    conn.carrier_lost                   # asyncio.Event, set when the line drops
    await conn.hangup(); await conn.close()

:class:`ModemTransport` wraps a connected call in the Transport protocol of
:mod:`firmware.common.adapters.transport`, so the Link facade runs on it
unchanged.  Failures of the port reach every waiter as :class:`PortError`;
nothing dies silently in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Final

import serial

from firmware.common.errors import LinkClosed, ModemError, PortError
from firmware.outer.modem.dialler import (
    CallAttemptFailed,
    CallFailed,
    CarrierLost,
    Connected,
    DataReceived,
    Dialler,
    DiallerConfig,
    HungUp,
    PrepareFailed,
    Ready,
    Ringing,
    SetDTR,
    State,
)
from firmware.outer.modem.errors import CallAbandoned, ModemTimeout, NoCarrier

#: Most bytes taken from the port in one read.
MAX_READ: Final = 4096

#: Received call data held for the reader before the port stops being read
#: (the modem then buffers, and its own flow control takes over).
MAX_READ_BUFFER: Final = 256 * 1024

#: How often DCD is sampled while online, on ports that have it: well inside
#: the modem's own carrier-loss delay (S10, 1.4 s).
DCD_POLL: Final = 0.25

#: Serial speed between the Pi and the modem: every USB modem accepts 115200,
#: and it is well above any line speed, so the port never limits a call.
DEFAULT_BAUDRATE: Final = 115200

Log = Callable[..., None]


def _no_log(event: str, **fields: object) -> None:
    del event, fields


class ModemPort:
    """A serial port with non-blocking, event-loop driven I/O.

    ``on_data(bytes)`` is called with what is read; ``on_error(PortError)``
    once if the port fails (e.g. the USB modem was unplugged).
    """

    def __init__(self, path: str, baudrate: int = DEFAULT_BAUDRATE) -> None:
        self.path = path
        self.baudrate = baudrate
        self.has_modem_control = False
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._pending = bytearray()
        self._drained = asyncio.Event()
        self._drained.set()
        self._reading = False
        self.on_data: Callable[[bytes], None] = lambda data: None
        self.on_error: Callable[[PortError], None] = lambda error: None

    def open(self) -> None:
        """Open the port exclusively with DTR and RTS high; drop stale input.

        Raises PortError if the port cannot be opened.
        """
        port = serial.Serial()
        port.port = self.path
        port.baudrate = self.baudrate
        port.timeout = 0
        port.write_timeout = 0
        port.exclusive = True
        port.dtr = True
        port.rts = True
        try:
            port.open()
            port.reset_input_buffer()  # stale bytes are from before our time
        except (serial.SerialException, OSError) as e:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
            raise PortError(f"cannot open {self.path}: {e}") from e
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        try:
            port.dtr = True
            self.has_modem_control = True
        except (serial.SerialException, OSError):
            self.has_modem_control = False  # a pty, or an adapter without the lines
        self.resume_reading()

    def resume_reading(self) -> None:
        """Read the port again (after :meth:`pause_reading`)."""
        if self._fd >= 0 and not self._reading:
            asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
            self._reading = True

    def pause_reading(self) -> None:
        """Stop reading: the modem buffers until :meth:`resume_reading`."""
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._reading = False

    def set_dtr(self, level: bool) -> None:
        """Set DTR; raise PortError if the port has no such line."""
        if self._serial is None or not self.has_modem_control:
            raise PortError(f"{self.path} has no DTR line")
        try:
            self._serial.dtr = level
        except (serial.SerialException, OSError) as e:
            raise PortError(f"setting DTR on {self.path}: {e}") from e

    def carrier_detect(self) -> bool | None:
        """Return the DCD line, or None where the port has none."""
        if self._serial is None or not self.has_modem_control:
            return None
        try:
            return bool(self._serial.cd)
        except (serial.SerialException, OSError):
            return None

    def write(self, data: bytes) -> None:
        """Queue ``data`` and write as much as the port takes now."""
        if self._fd < 0:
            raise PortError(f"{self.path} is closed")
        self._pending += data
        self._flush()

    async def drain(self) -> None:
        """Wait until every queued byte has been handed to the port."""
        await self._drained.wait()

    def close(self) -> None:
        """Close the port (idempotent)."""
        if self._fd >= 0:
            loop = asyncio.get_running_loop()
            self.pause_reading()
            loop.remove_writer(self._fd)
            self._fd = -1
        if self._serial is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self._serial.close()
            self._serial = None
        self._pending.clear()
        self._drained.set()

    def _flush(self) -> None:
        if not self._pending or self._fd < 0:
            return
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            written = 0
        except OSError as e:
            self._fail(e)
            return
        del self._pending[:written]
        loop = asyncio.get_running_loop()
        if self._pending:
            self._drained.clear()
            loop.add_writer(self._fd, self._on_writable)
        else:
            self._drained.set()

    def _on_writable(self) -> None:
        asyncio.get_running_loop().remove_writer(self._fd)
        self._flush()

    def read_pending(self) -> None:
        """Hand ``on_data`` whatever the port holds right now, without waiting.

        The connection calls this before acting on a deadline, so bytes that
        arrived before it are never judged as silence.
        """
        for _ in range(MAX_READ_BUFFER // MAX_READ):
            if not self._reading or self._serial is None:
                return
            try:
                # a tty read returns b"" when empty (VMIN 0), which means end
                # of file to _on_readable, so ask first
                waiting = self._serial.in_waiting
            except (serial.SerialException, OSError):
                return  # _on_readable reports a failed port when it is read
            if not waiting or not self._on_readable():
                return

    def _on_readable(self) -> bool:
        """Read once; return True if bytes were read."""
        try:
            data = os.read(self._fd, MAX_READ)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self._fail(e)
            return False
        if not data:
            self._fail(OSError("end of file"))
            return False
        self.on_data(data)
        return True

    def _fail(self, error: OSError) -> None:
        path = self.path
        self.close()
        self.on_error(PortError(f"{path}: {error}"))


class ModemConnection:
    """A modem call on a serial port; see the module docstring.

    Create with :meth:`open`.  ``speed`` and ``protocol`` describe the call
    once connected; ``carrier_lost`` is set when the line drops; an optional
    ``on_carrier_lost`` callback runs at the same moment.  ``prepare_error``
    says why the last preparation failed ("" once the modem is READY again
    or a call connects).
    """

    def __init__(self, port: ModemPort, config: DiallerConfig, log: Log = _no_log) -> None:
        self._port = port
        config = dataclasses.replace(config, use_dtr=port.has_modem_control)
        self._core = Dialler(config)
        self._log = log
        self.carrier_lost = asyncio.Event()
        self.on_carrier_lost: Callable[[], None] | None = None
        self.speed: int | None = None
        self.protocol = ""
        self._buffer = bytearray()
        self._readable = asyncio.Event()
        self._eof = False
        self._error: PortError | None = None
        self._call: asyncio.Future[Connected] | None = None
        self._hangup: asyncio.Future[HungUp] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._logged_state = self._core.state
        self._state_changed = asyncio.Event()
        self._dcd_seen = False
        self.prepare_error = ""
        port.on_data = self._on_data
        port.on_error = self._on_error
        self._task = asyncio.create_task(self._run(), name=f"modem {port.path}")
        if config.keep_ready:
            self._core.prepare(self._now())  # the task sends it as it starts

    @classmethod
    async def open(
        cls,
        path: str,
        config: DiallerConfig,
        *,
        baudrate: int = DEFAULT_BAUDRATE,
        log: Log = _no_log,
    ) -> ModemConnection:
        """Open the modem's port and return the connection: idle, or (with
        ``keep_ready``) preparing the modem.

        Raises PortError if the port cannot be opened.
        """
        port = ModemPort(path, baudrate)
        port.open()
        return cls(port, config, log)

    async def __aenter__(self) -> ModemConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def path(self) -> str:
        """The serial port's path."""
        return self._port.path

    @property
    def state(self) -> State:
        """The dialler core's state."""
        return self._core.state

    @property
    def has_modem_control(self) -> bool:
        """True if hang-up uses DTR and carrier is read from DCD."""
        return self._port.has_modem_control

    @property
    def port_error(self) -> PortError | None:
        """How the port failed (the USB modem was unplugged...), or None."""
        return self._error

    def statistics(self) -> dict[str, int]:
        """Return the dialler's counters."""
        return self._core.statistics()

    async def wait_prepared(self) -> bool:
        """Wait while the modem is being prepared; return True if it rests READY.

        Every step of a preparation has a deadline, so this cannot hang.
        Raises PortError if the port failed or the connection is closed.
        """
        while self._core.preparing:
            self._check_port()
            self._state_changed.clear()
            await self._state_changed.wait()
        self._check_port()
        return self._core.state is State.READY

    # ----------------------------------------------------------------- calls

    async def dial(self) -> Connected:
        """Call the configured number (with the configured retries).

        A READY modem is probed with AT and dialled at once; an idle one is
        reset and initialised first; a preparation under way is waited for.

        Returns the Connected event.  Raises the last attempt's ModemError
        (Busy, NoAnswer, NoDialtone, NoCarrier, ModemTimeout,
        ModemCommandError, CallLimitReached), CallAbandoned if :meth:`hangup`
        ran meanwhile, PortError, or LocalProtocolError if a call is already in
        progress.  Cancelling it abandons the call.
        """
        return await self._start_call(self._core.dial)

    async def answer(self) -> Connected:
        """Wait (without limit) for an incoming call and answer it.

        Returns the Connected event.  Raises CallAbandoned, PortError or
        LocalProtocolError like :meth:`dial`; cancelling it stops answering.
        """
        return await self._start_call(self._core.answer)

    async def _start_call(self, start: Callable[[float], None]) -> Connected:
        self._check_port()
        start(self._now())
        self._buffer.clear()
        self._eof = False
        self.carrier_lost.clear()
        self._dcd_seen = False
        self._call = asyncio.get_running_loop().create_future()
        self._wake.set()
        try:
            connected = await self._call
        except asyncio.CancelledError:
            # the caller gave up: abandon the call rather than leave it half made
            if self._error is None and self._core.state is not State.ONLINE:
                self._core.hangup(self._now())
                self._wake.set()
            raise
        finally:
            self._call = None
        self.speed, self.protocol = connected.speed, connected.protocol
        return connected

    async def read(self) -> bytes:
        """Return the next bytes of the call, waiting for some; b"" once it is over.

        Raises PortError if the port failed.
        """
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self._eof or self._core.state is not State.ONLINE:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        self._port.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        """Send ``data`` on the call.  Raises NoCarrier if no call is up."""
        if self._core.state is not State.ONLINE:
            raise NoCarrier(f"no call is up (modem {self._core.state.value})")
        self._core.send_data(data, self._now())
        self._port.write(self._core.bytes_to_send())

    async def drain(self) -> None:
        """Wait until written data has been handed to the port.  Raises PortError."""
        self._check_port()
        await self._port.drain()
        self._check_port()

    async def hangup(self) -> None:
        """End the call (DTR drop, or +++ and ATH0); abandon a call being set up.

        Raises ModemTimeout if the modem never confirmed the hang-up, PortError
        if the port failed.
        """
        self._check_port()
        if self._hangup is None:
            self._hangup = asyncio.get_running_loop().create_future()
            self._core.hangup(self._now())
            self._wake.set()
        try:
            result = await asyncio.shield(self._hangup)
        finally:
            self._hangup = None
        self._eof = True
        self._readable.set()
        if not result.clean:
            raise ModemTimeout("the modem did not confirm the hang-up")

    async def close(self) -> None:
        """Hang up if a call is up, then stop and close the port (idempotent)."""
        if self._closed:
            return
        if self._error is None and self._core.in_call:
            with contextlib.suppress(ModemError, PortError):
                await self.hangup()
        self._closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._port.close()
        self._state_changed.set()

    # ---------------------------------------------------------------- driver

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _check_port(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise PortError("the modem connection is closed")

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            deadline = self._core.next_deadline()
            if deadline is not None and self._now() >= deadline:
                # e.g. the silence that confirms a NO CARRIER: first take any
                # bytes already waiting in the port, which would break it
                self._port.read_pending()
            now = self._now()
            self._core.handle_deadline(now)
            if self._core.state is State.ONLINE:
                # Some modems raise DCD a moment after CONNECT: DCD only counts
                # once it has been seen high during this call.
                dcd = self._port.carrier_detect()
                if dcd:
                    self._dcd_seen = True
                elif dcd is False and self._dcd_seen:
                    self._core.set_carrier_detect(False, now)
            self._service()
            deadline = self._core.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._now())
            if self._core.state is State.ONLINE and self._port.has_modem_control:
                timeout = DCD_POLL if timeout is None else min(timeout, DCD_POLL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _service(self) -> None:
        self._note_state()
        while (event := self._core.next_event()) is not None:
            if isinstance(event, SetDTR):
                try:
                    self._port.set_dtr(event.level)
                except PortError as e:
                    self._log("dtr_failed", error=str(e))
            elif isinstance(event, DataReceived):
                self._buffer += event.data
                self._readable.set()
                if len(self._buffer) >= MAX_READ_BUFFER:
                    self._port.pause_reading()
            elif isinstance(event, Connected):
                self.prepare_error = ""  # the modem took its reset and init after all
                self._log("connected", speed=event.speed, protocol=event.protocol)
                if self._call is not None and not self._call.done():
                    self._call.set_result(event)
            elif isinstance(event, CallAttemptFailed):
                self._log("attempt_failed", error=repr(event.error), retry_at=event.retry_at)
            elif isinstance(event, CallFailed):
                self._log("call_failed", error=repr(event.error), attempts=event.attempts)
                if self._call is not None and not self._call.done():
                    self._call.set_exception(event.error)
            elif isinstance(event, Ready):
                self.prepare_error = ""
                self._log("ready")
            elif isinstance(event, PrepareFailed):
                # not fatal: the modem rests idle and the next dial resets it in full
                self.prepare_error = str(event.error) or type(event.error).__name__
                self._log("prepare_failed", error=repr(event.error))
            elif isinstance(event, Ringing):
                self._log("ringing", count=event.count)
            elif isinstance(event, CarrierLost):
                self._log("carrier_lost")
                self._lost()
            elif isinstance(event, HungUp):
                self._log("hung_up", clean=event.clean)
                if self._hangup is not None and not self._hangup.done():
                    self._hangup.set_result(event)
                if self._call is not None and not self._call.done():
                    self._call.set_exception(CallAbandoned("hung up before the call connected"))
                self._eof = True
                self._readable.set()
        out = self._core.bytes_to_send()
        if out and self._error is None:
            self._port.write(out)
        self._note_state()

    def _note_state(self) -> None:
        state = self._core.state
        if state is not self._logged_state:
            self._logged_state = state
            self._state_changed.set()
            self._log("state", state=state.value)

    def _lost(self) -> None:
        self._eof = True
        self._readable.set()
        self.carrier_lost.set()
        if self.on_carrier_lost is not None:
            self.on_carrier_lost()

    def _on_data(self, data: bytes) -> None:
        self._core.receive_bytes(data, self._now())
        self._wake.set()

    def _on_error(self, error: PortError) -> None:
        self._error = error
        self._log("port_failed", error=str(error))
        for future in (self._call, self._hangup):
            if future is not None and not future.done():
                future.set_exception(error)
        if self._core.state is State.ONLINE:
            self._lost()
        self._readable.set()
        self._state_changed.set()


class ModemTransport:
    """A connected call as a :class:`~firmware.common.adapters.transport.Transport`.

    This is what the :class:`~firmware.common.link.link.Link` facade runs on:
    ``read`` returns b"" when the carrier is lost (the Link reports LinkDown),
    ``write`` waits until the port has taken the bytes, and ``aclose`` hangs
    up the call (the port stays open for the next one) unless
    ``hang_up_on_close`` is False.  A write after carrier loss raises
    PortError; any call after ``aclose`` raises LinkClosed.
    """

    def __init__(self, connection: ModemConnection, *, hang_up_on_close: bool = True) -> None:
        self._conn = connection
        self._hang_up_on_close = hang_up_on_close
        self._closed = False

    @property
    def name(self) -> str:
        """``modem:<port path>``."""
        return f"modem:{self._conn.path}"

    async def read(self) -> bytes:
        """Return the next bytes of the call, or b"" once it is over.

        Raises PortError if the port failed, LinkClosed once closed locally.
        """
        self._check_open()
        data = await self._conn.read()
        self._check_open()
        return data

    async def write(self, data: bytes) -> None:
        """Send all of ``data`` and wait until the port has taken it.

        Raises PortError if the carrier or the port is gone, LinkClosed once closed.
        """
        self._check_open()
        try:
            self._conn.write(data)
        except NoCarrier as e:
            raise PortError(f"{self.name}: {e}") from e
        await self._conn.drain()

    async def aclose(self) -> None:
        """Hang up (unless told not to); errors while hanging up are ignored.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._hang_up_on_close:
            with contextlib.suppress(ModemError, PortError):
                await self._conn.hangup()

    def _check_open(self) -> None:
        if self._closed:
            raise LinkClosed(f"{self.name} is closed")


__all__ = ["DEFAULT_BAUDRATE", "ModemConnection", "ModemPort", "ModemTransport"]
