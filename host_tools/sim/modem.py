"""``optogate sim modem``: a Hayes modem on a pseudo-terminal, calls over TCP.

Theory of operation
-------------------
The emulator opens a pty in raw mode and prints its slave path; the program
under test opens that path as if it were a USB modem's serial port.  The
command interpreter and call model are the sans-I/O core
:class:`host_tools.sim.hayes.HayesModem`; this module is its adapter:

* bytes the DTE writes to the pty go to the core; bytes the core has for the
  DTE are written back (non-blocking, bounded);
* a dialled number is looked up in the phone book (``--phonebook
  5551234=127.0.0.1:7000``) and the "call" is a raw TCP connection to that
  address: 8-bit clean, no telnet negotiation, nothing added;
* with ``--listen HOST:PORT`` an incoming TCP connection is an incoming call:
  the modem rings (``RING``) until the DTE answers with ATA or S0 auto-answers,
  then bridges, so a second emulator can sit in front of central's serial port;
* one timer, the core's next deadline, drives dial delays, rings, the escape
  guard time and the pacing of data at the CONNECT speed.

When the far end's data arrives faster than the paced line can carry it, the
adapter stops reading the TCP socket, so TCP flow control pushes back just as
a real line's bandwidth would.

Contract: prints one JSON line ``{"port": "/dev/pts/N"}`` (plus ``"listen":
"HOST:PORT"`` with ``--listen``, the bound address, useful with port 0) on
stdout, logs one JSON line per event on stderr, and runs until SIGTERM or
SIGINT, then exits 0.

What it does not model, beyond what :mod:`host_tools.sim.hayes` lists: the
emulator keeps its own descriptor of the pty slave open, so bytes sent while
no program has the port open wait in the pty (drivers flush input on open);
one call at a time; a refused TCP connection is reported as NO ANSWER.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tty
from collections.abc import Callable
from typing import Final

from host_tools.sim.hayes import CloseLine, HayesConfig, HayesModem, OpenLine

#: Most bytes taken from the pty or a socket in one read.
MAX_READ: Final = 4096

#: Stop reading the far end's socket while this many bytes wait for the paced
#: line: about a second at 33,600 bit/s, so the DTE never sees a stall.
LINE_HIGH_WATER: Final = 4096

#: Bytes for the DTE kept when the program on the pty does not read; beyond
#: that they are dropped and counted, as a UART overrun would lose them.
MAX_DTE_PENDING: Final = 65536

#: How long a TCP connect may take before the call is reported NO ANSWER.
CONNECT_TIMEOUT: Final = 5.0

Log = Callable[..., None]


def log_to_stderr(event: str, **fields: object) -> None:
    """Write one structured log line to stderr."""
    record = {"event": event, **fields}
    print(json.dumps(record, separators=(",", ":")), file=sys.stderr, flush=True)


def _no_log(event: str, **fields: object) -> None:
    del event, fields


def parse_address(text: str) -> tuple[str, int]:
    """Return (host, port) from ``HOST:PORT``; raise ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class ModemEmulator:
    """The emulator in-process: ``async with ModemEmulator(config) as modem:``.

    ``port_path`` is the pty slave to open; ``listen_address`` the bound
    ``host:port`` in answer mode.  A failure of the service loop is raised by
    :meth:`aclose` (and so by the ``async with`` exit), never swallowed.
    """

    def __init__(
        self,
        config: HayesConfig,
        listen: tuple[str, int] | None = None,
        log: Log = _no_log,
    ) -> None:
        self.core = HayesModem(config)
        self._listen = listen
        self._log = log
        self._master = -1
        self._slave = -1
        self.port_path = ""
        self.listen_address: str | None = None
        self._server: asyncio.Server | None = None
        self._wake = asyncio.Event()
        self._line_room = asyncio.Event()
        self._line: asyncio.StreamWriter | None = None
        self._line_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._pending = bytearray()
        self.dropped_dte_bytes = 0

    async def __aenter__(self) -> ModemEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the pty (and the listening socket); start serving."""
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            tty.setraw(master)
            tty.setraw(slave)
            os.set_blocking(master, False)
            self.port_path = os.ttyname(slave)
        except OSError:
            os.close(master)
            os.close(slave)
            raise
        self._master, self._slave = master, slave
        loop.add_reader(master, self._on_dte_readable)
        if self._listen is not None:
            try:
                self._server = await asyncio.start_server(self._on_call, *self._listen)
            except OSError:
                await self.aclose()
                raise
            host, port = self._server.sockets[0].getsockname()[:2]
            self.listen_address = f"{host}:{port}"
        self._run_task = asyncio.create_task(self._run(), name="modem-emulator")

    async def aclose(self) -> None:
        """Stop serving and release everything; raise what the service loop raised."""
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        if self._run_task is not None:
            if self._run_task.done() and not self._run_task.cancelled():
                error = self._run_task.exception()
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run_task
            self._run_task = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in (self._connect_task, self._line_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._close_line()
        if self._master >= 0:
            loop.remove_reader(self._master)
            loop.remove_writer(self._master)
            os.close(self._master)
            os.close(self._slave)
            self._master = self._slave = -1
        if error is not None:
            raise error

    def power_off(self) -> None:
        """Cut the emulated modem's power (see :meth:`HayesModem.power_off`)."""
        self.core.power_off(self._now())
        self._pending.clear()
        self._wake.set()

    def power_on(self) -> None:
        """Restore the emulated modem's power (see :meth:`HayesModem.power_on`)."""
        self.core.power_on(self._now())
        self._wake.set()

    async def wait_failed(self) -> None:
        """Return (raising its error) when the service loop stops."""
        if self._run_task is not None:
            await self._run_task

    # ----------------------------------------------------------- service loop

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self._now()
            self.core.handle_deadline(now)
            self._service(now)
            deadline = self.core.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._now())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _service(self, now: float) -> None:
        # Bytes first: when the carrier drops after N bytes, the bytes that
        # made it go out before the CloseLine that follows them.
        line_data = self.core.bytes_to_line(now)
        if line_data and self._line is not None:
            self._line.write(line_data)
        self._write_dte(self.core.bytes_to_dte(now))
        while (action := self.core.next_event()) is not None:
            if isinstance(action, OpenLine):
                self._log("dial", address=action.address)
                self._connect_task = asyncio.create_task(self._connect(action.address))
            elif isinstance(action, CloseLine):
                self._log("hangup")
                self._close_line()
        if self.core.line_backlog() < LINE_HIGH_WATER:
            self._line_room.set()
        else:
            self._line_room.clear()

    # --------------------------------------------------------------- the pty

    def _on_dte_readable(self) -> None:
        try:
            data = os.read(self._master, MAX_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if data:
            self.core.receive_from_dte(data, self._now())
            self._wake.set()

    def _write_dte(self, data: bytes) -> None:
        if data:
            room = MAX_DTE_PENDING - len(self._pending)
            if len(data) > room:
                self.dropped_dte_bytes += len(data) - room
                data = data[: max(0, room)]
            self._pending += data
        if not self._pending:
            return
        try:
            written = os.write(self._master, self._pending)
        except BlockingIOError:
            written = 0
        del self._pending[:written]
        loop = asyncio.get_running_loop()
        if self._pending:
            loop.add_writer(self._master, self._on_dte_writable)
        else:
            loop.remove_writer(self._master)

    def _on_dte_writable(self) -> None:
        asyncio.get_running_loop().remove_writer(self._master)
        self._write_dte(b"")

    # ------------------------------------------------------------- the line

    async def _connect(self, address: str) -> None:
        try:
            host, port = parse_address(address)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError, ValueError) as e:
            self._log("line_failed", address=address, error=str(e))
            self.core.line_failed(self._now())
            self._wake.set()
            return
        self._line = writer
        self._log("line_up", address=address)
        self.core.line_connected(self._now())
        self._wake.set()
        self._line_task = asyncio.create_task(self._pump_line(reader, writer))

    async def _on_call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._line is not None or not self.core.incoming_call(self._now()):
            self._log("call_refused", peer=str(peer))
            writer.close()
            return
        self._log("incoming_call", peer=str(peer))
        self._line = writer
        self._wake.set()
        self._line_task = asyncio.current_task()
        try:
            await self._pump_line(reader, writer)
        except asyncio.CancelledError:
            # Hung up from the modem side (_close_line cancels this task): the
            # call is over.  Ending the handler normally keeps asyncio's server
            # from reporting a cancelled connection callback with a traceback.
            writer.close()

    async def _pump_line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._line_room.wait()
                data = await reader.read(MAX_READ)
                if self._line is not writer:
                    return
                if not data:
                    break
                self.core.line_data(data, self._now())
                if self.core.line_backlog() >= LINE_HIGH_WATER:
                    self._line_room.clear()
                self._wake.set()
        except ConnectionError:
            pass
        if self._line is writer:
            self._log("line_closed")
            self._line = None
            writer.close()
            self.core.line_closed(self._now())
            self._wake.set()

    def _close_line(self) -> None:
        writer, self._line = self._line, None
        if writer is not None:
            writer.close()
        task, self._line_task = self._line_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()


# -------------------------------------------------------------------- CLI


def _phonebook_entry(text: str) -> tuple[str, str]:
    number, sep, address = text.partition("=")
    if not sep or not number:
        raise argparse.ArgumentTypeError(f"expected NUMBER=HOST:PORT, got {text!r}")
    try:
        parse_address(address)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return number, address


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the argument parser of ``optogate sim modem``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="A Hayes modem on a pty; calls are raw TCP connections."
    )
    parser.add_argument(
        "--phonebook",
        action="append",
        type=_phonebook_entry,
        default=[],
        metavar="NUMBER=HOST:PORT",
        help="where a dialled number leads (repeatable)",
    )
    parser.add_argument("--speed", type=int, default=33600, help="CONNECT speed, bit/s")
    parser.add_argument("--protocol", default="", help="CONNECT suffix, e.g. ARQ/V34/LAPM/V42BIS")
    parser.add_argument("--dial-delay", type=float, default=2.0, help="seconds from ATD to result")
    parser.add_argument(
        "--answer-delay", type=float, default=1.0, help="seconds from ATA to CONNECT"
    )
    parser.add_argument("--ring-interval", type=float, default=6.0, help="seconds between RINGs")
    parser.add_argument("--busy", type=int, default=0, metavar="N", help="first N dials: BUSY")
    parser.add_argument("--no-answer", type=int, default=0, metavar="N", help="next N: NO ANSWER")
    parser.add_argument("--no-dialtone", type=int, default=0, metavar="N", help="NO DIALTONE")
    parser.add_argument(
        "--no-carrier-after", type=int, default=None, metavar="N", help="drop after N data bytes"
    )
    parser.add_argument("--ber", type=float, default=0.0, help="bit error rate of the line")
    parser.add_argument("--seed", type=int, default=0, help="seed of the line noise")
    parser.add_argument(
        "--error-first", action="store_true", help="answer ERROR to the first command"
    )
    parser.add_argument(
        "--answer", action="store_true", help="answer incoming calls (needs --listen)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="accept incoming calls here")
    return parser


def config_from_args(args: argparse.Namespace) -> HayesConfig:
    """Return the core configuration the arguments describe; raise ValueError if invalid."""
    return HayesConfig(
        speed=args.speed,
        protocol=args.protocol,
        phonebook=dict(args.phonebook),
        dial_delay=args.dial_delay,
        answer_delay=args.answer_delay,
        ring_interval=args.ring_interval,
        busy=args.busy,
        no_answer=args.no_answer,
        no_dialtone=args.no_dialtone,
        no_carrier_after=args.no_carrier_after,
        ber=args.ber,
        seed=args.seed,
        error_first=args.error_first,
    )


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate sim modem``; return the exit status (0 after SIGTERM/SIGINT)."""
    args = build_parser(prog).parse_args(argv)
    try:
        config = config_from_args(args)
        listen = parse_address(args.listen) if args.listen else None
        if args.answer and listen is None:
            raise ValueError("--answer needs --listen HOST:PORT")
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config, listen))
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


async def _serve(config: HayesConfig, listen: tuple[str, int] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    modem = ModemEmulator(config, listen, log=log_to_stderr)
    await modem.start()
    try:
        ready: dict[str, object] = {"port": modem.port_path}
        if modem.listen_address is not None:
            ready["listen"] = modem.listen_address
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        stopping = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(modem.wait_failed())
        await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failed.cancel()
        log_to_stderr("signal" if stop.is_set() else "stopped", **modem.core.statistics())
    finally:
        await modem.aclose()
    return 0
