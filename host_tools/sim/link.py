"""The link simulator: two ptys joined like the optocoupled UART (``optogate sim link``).

Theory of operation
-------------------
Two pseudo-terminals stand for the two UARTs: side ``a`` is the outer
module's port, side ``b`` the inner module's.  Programs open the slave ends
(``/dev/pts/N``) as they would open ``/dev/serial0``; the simulator holds the
master ends and relays bytes between them through a
:class:`~host_tools.sim.line.LineModel`, the sans-I/O core that paces bytes at
``baud / 10`` bytes per second and applies bit errors, byte drops, latency,
line cuts and power loss.  This module is only the asyncio adapter around it:

* **Reading.**  A side's master is read only when the line model's transmit
  FIFO has room, and only that many bytes (a few milliseconds of line time).
  The sender's bytes otherwise wait in the pty, whose buffer fills until the
  sender's ``write()`` blocks: a fast sender is held to the line rate instead
  of the simulator swallowing kilobytes at once.
* **Writing.**  Bytes the model delivers are written to the far master at
  once.  The relay wakes when the model's next deadline falls due, but no
  more often than every ``GRANULARITY`` seconds, so delivery is in small
  bursts (tens to hundreds of bytes) rather than byte by byte.
* **Is anybody listening?**  A UART nobody has opened just loses what
  arrives; a pty would keep it for whoever opens it next.  The simulator
  closes its own slave descriptors right after creating the ptys, so
  Linux's pty driver reports ``POLLHUP`` on a master exactly while no
  process holds that side's slave open.  Before every delivery the relay
  polls the far master with a zero timeout; while it reports ``POLLHUP``
  the bytes are counted as ``lost_unheard`` and not written.  (A hung-up
  master is always "readable", so its reader is unregistered until the
  periodic check, every ``IDLE_POLL`` seconds, sees the side open again.)
* **Middlebox.**  An optional object with ``process(direction, data) ->
  bytes`` (``direction`` is ``"a->b"`` or ``"b->a"``) sees each direction's
  bytes as they are read, before pacing; the protocol-break isolator plugs in
  here.  Its output is paced like any other bytes.
* **Control.**  A Unix socket takes one JSON object per line and answers one
  JSON line: ``{"cmd": "cut"}``, ``{"cmd": "restore"}``, ``{"cmd": "set",
  "ber": .., "drop": .., "latency": ..}`` (any subset), ``{"cmd": "power",
  "side": "a", "on": false}`` (an unpowered side neither sends nor receives),
  ``{"cmd": "inject", "side": "a", "hex": ".."}`` (bytes put on the line as
  if that side had sent them, through the middlebox: forged frames in tests),
  ``{"cmd": "stats"}`` (counters per direction: ``bytes_in``,
  ``bytes_delivered``, ``bits_flipped``, ``bytes_dropped``, ``lost_cut``,
  ``lost_power``, ``lost_unheard``, ``overrun``, ``in_flight``; and the line
  state).  Replies are ``{"ok": true, ...}`` or ``{"ok": false, "error":
  "..."}``; a bad command changes nothing.  ``{"cmd": "watch"}`` gets no reply
  line: the connection instead receives ``{"event": "power", "side": ..,
  "on": ..}`` for both sides at once and then one line per power change,
  until either end closes it.

What the simulator does not model: modem-control lines (the optical link has
no RTS/CTS/DTR/DCD; pyserial's ioctls on a pty succeed and do nothing); the
receiving pty's buffer is kilobytes where a UART's receive FIFO is a few
bytes, so a receiver that reads slowly loses nothing until that buffer fills
(then the excess is counted as ``overrun``); bytes delivered but not yet read
when a program closes its side stay in the pty for the next program that opens
it; the baud rate a program sets on its pty is ignored (the simulator's
``--baud`` is the line rate); ``tcdrain()`` on a pty returns at once instead
of waiting for the line, so a program that drains and then flushes its port
(lrzsz's sz does, on exit) can lose its last bytes, which a UART would have
sent; break conditions and parity are not carried;
and everything listed in :mod:`host_tools.sim.line`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import select
import signal
import stat
import sys
import tempfile
import tty
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, Final, Protocol

from firmware.common.errors import OptogateError, PortError
from host_tools.sim.line import (
    DIRECTIONS,
    SIDES,
    ImpairmentError,
    Impairments,
    LineModel,
    LinkSimError,
    PowerChanged,
    UnknownSide,
    check_side,
)

#: Shortest sleep between relay passes, in seconds.  At 921600 baud 2 ms is
#: 184 bytes, well inside the model's 4 ms FIFO, so the line never idles for
#: want of a wake-up; shorter costs CPU that other processes on a small
#: machine need.
GRANULARITY: Final = 0.002
#: Longest sleep while idle: how quickly a newly opened side is noticed.
IDLE_POLL: Final = 0.02
#: Largest control line accepted, in bytes; commands are tiny.
MAX_CONTROL_LINE: Final = 4096
#: Bytes read from a master in one go while its reader is unregistered for
#: lack of room are never more than the FIFO room; this caps one os.read().
MAX_READ: Final = 65536
#: Largest ``inject`` command: a few frames, not a way to fill memory.
MAX_INJECT: Final = 65536

_HANGUP: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL


class ControlError(LinkSimError, ValueError):
    """A control command was malformed or named something unknown."""


class Middlebox(Protocol):
    """Something on the line that sees, and may rewrite, each direction's bytes.

    A middlebox may also have ``statistics() -> dict``; if it does, the
    simulator's stats include its result under ``"middlebox"``.  An exception
    from ``process`` stops the relay and is raised to the simulator's owner.
    """

    def process(self, direction: str, data: bytes) -> bytes:
        """Return the bytes to send on in ``direction`` after seeing ``data``."""
        ...


LogFn = Callable[..., None]


def log_to_stderr(event: str, **fields: object) -> None:
    """Write one structured (JSON) log line for ``event`` to stderr."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    record = {"ts": stamp, "component": "sim.link", "event": event, **fields}
    print(json.dumps(record, separators=(",", ":")), file=sys.stderr, flush=True)


def _discard_log(event: str, **fields: object) -> None:
    """Log nothing (the in-process default)."""


class _Port:
    """One side: the pty master the simulator holds and the slave's path."""

    def __init__(self, side: str) -> None:
        self.side = side
        master, slave = os.openpty()
        try:
            tty.setraw(master)
            tty.setraw(slave)
            self.path = os.ttyname(slave)
            os.set_blocking(master, False)
        except OSError:
            os.close(master)
            raise
        finally:
            # Keep no slave descriptor: POLLHUP on the master then means
            # "nobody has this side open" (see the module docstring).
            os.close(slave)
        self.master = master
        self.poller = select.poll()
        self.poller.register(master, select.POLLIN)
        self.open = False
        self.reading = False

    def peer_open(self) -> bool:
        return not any(ev & _HANGUP for _, ev in self.poller.poll(0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


class LinkSimulator:
    """The link simulator, in-process: ``async with LinkSimulator(...) as sim:``.

    ``a_path`` and ``b_path`` are the two pty slave paths; the methods mirror
    the control socket's commands.  With ``control_path`` the control socket
    is served too.  A failure of the relay is raised from the ``async with``
    block's exit (and from :meth:`aclose`), never swallowed.

    Raises :class:`~host_tools.sim.line.ImpairmentError` for bad settings.
    """

    def __init__(
        self,
        *,
        baud: int = 115200,
        ber: float = 0.0,
        drop: float = 0.0,
        latency: float = 0.0,
        seed: int = 1,
        control_path: str | os.PathLike[str] | None = None,
        middlebox: Middlebox | None = None,
        log: LogFn = _discard_log,
    ) -> None:
        self._model = LineModel(baud, Impairments(ber, drop, latency), seed)
        self._control_path = None if control_path is None else os.fspath(control_path)
        self._middlebox = middlebox
        self._log = log
        self._ports: dict[str, _Port] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._relay_runner: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._watchers: set[asyncio.Queue[PowerChanged | None]] = set()

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> LinkSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the ptys, start the relay and, if configured, the control socket.

        Raises :class:`~firmware.common.errors.PortError` if a pty or the
        socket cannot be created (nothing is left open then).
        """
        try:
            for side in SIDES:
                self._ports[side] = _Port(side)
            if self._control_path is not None:
                _remove_stale_socket(self._control_path)
                self._server = await asyncio.start_unix_server(
                    self._serve_control, path=self._control_path, limit=MAX_CONTROL_LINE
                )
        except BaseException as e:
            for port in self._ports.values():
                port.close()
            if isinstance(e, OSError):
                raise PortError(f"cannot set up the link simulator: {e}") from e
            raise
        self._relay_runner = asyncio.create_task(self._relay(), name="sim-link-relay")
        imp = self._model.impairments
        self._log(
            "started",
            a=self.a_path,
            b=self.b_path,
            control=self._control_path,
            baud=self._model.baud,
            ber=imp.ber,
            drop=imp.drop,
            latency=imp.latency,
            middlebox=type(self._middlebox).__name__ if self._middlebox else None,
        )

    async def aclose(self) -> None:
        """Stop everything and release the ptys; re-raise a relay failure, if any."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        for queue in self._watchers:
            queue.put_nowait(None)
        if self._server is not None:
            self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            with contextlib.suppress(OSError):
                os.unlink(self._control_path or "")
        failure: BaseException | None = None
        if self._relay_runner is not None:
            try:
                await self._relay_runner
            except asyncio.CancelledError:
                pass
            except Exception as e:
                failure = e
        loop = asyncio.get_running_loop()
        for port in self._ports.values():
            if port.reading:
                loop.remove_reader(port.master)
            port.close()
        self._log("stopped", stats=self._model.statistics())
        if failure is not None:
            raise failure

    async def wait_failed(self) -> None:
        """Wait for the relay to stop; raise its failure (it stops by itself only on one)."""
        assert self._relay_runner is not None, "start() first"
        await asyncio.shield(self._relay_runner)

    # -- paths --------------------------------------------------------------

    @property
    def a_path(self) -> str:
        """Path of side a's pty (the outer module's UART)."""
        return self._ports["a"].path

    @property
    def b_path(self) -> str:
        """Path of side b's pty (the inner module's UART)."""
        return self._ports["b"].path

    @property
    def control_path(self) -> str | None:
        """Path of the control socket, or None if none is served."""
        return self._control_path

    # -- operations (same as the control commands) -------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def cut(self) -> None:
        """Cut the line: every byte that would finish crossing it is lost until restore."""
        if self._model.set_cut(True, self._now()):
            self._log("cut")
        self._wake.set()

    def restore(self) -> None:
        """Restore a cut line."""
        if self._model.set_cut(False, self._now()):
            self._log("restored")
        self._wake.set()

    def set_impairments(
        self, *, ber: float | None = None, drop: float | None = None, latency: float | None = None
    ) -> Impairments:
        """Change any of the impairments; return those now in force.

        Raises :class:`~host_tools.sim.line.ImpairmentError` (nothing changes).
        """
        old = self._model.impairments
        new = Impairments(
            old.ber if ber is None else ber,
            old.drop if drop is None else drop,
            old.latency if latency is None else latency,
        )
        self._model.set_impairments(new, self._now())
        self._log("impairments", ber=new.ber, drop=new.drop, latency=new.latency)
        self._wake.set()
        return new

    def power(self, side: str, on: bool) -> None:
        """Power ``side`` on or off; watchers see the change.

        Raises :class:`~host_tools.sim.line.UnknownSide` or :class:`ControlError`.
        """
        if not isinstance(on, bool):
            raise ControlError(f"'on' must be true or false, got {on!r}")
        event = self._model.set_power(side, on, self._now())
        if event is not None:
            self._log("power", side=event.side, on=event.on)
            for queue in self._watchers:
                queue.put_nowait(event)
        self._wake.set()

    def powered(self, side: str) -> bool:
        """Return whether ``side`` is powered.  Raises :class:`~host_tools.sim.line.UnknownSide`."""
        return self._model.power(side)

    def stats(self) -> dict[str, object]:
        """Return the counters (see :meth:`LineModel.statistics`), plus the middlebox's."""
        self._model.advance(self._now())
        out = self._model.statistics()
        statistics = getattr(self._middlebox, "statistics", None)
        if callable(statistics):
            out["middlebox"] = statistics()
        return out

    async def watch(self) -> AsyncGenerator[PowerChanged, None]:
        """Yield the power state of both sides, then every power change, until closed."""
        queue: asyncio.Queue[PowerChanged | None] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            for side in SIDES:
                yield PowerChanged(side, self._model.power(side))
            while not self._stopping:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._watchers.discard(queue)

    async def drain(self) -> None:
        """Return once no byte is in flight on the line (bound it with ``asyncio.timeout``)."""
        while self._model.in_flight():
            self._wake.set()
            await asyncio.sleep(GRANULARITY)

    # -- the relay ------------------------------------------------------------

    async def _relay(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            now = loop.time()
            self._service(now)
            deadline = self._model.next_deadline()
            delay = IDLE_POLL if deadline is None else max(GRANULARITY, deadline - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, IDLE_POLL)):
                    await self._wake.wait()

    def _service(self, now: float) -> None:
        loop = asyncio.get_running_loop()
        for port in self._ports.values():
            is_open = port.peer_open()
            if is_open != port.open:
                port.open = is_open
                self._log("opened" if is_open else "closed", side=port.side, path=port.path)
            self._model.set_listening(port.side, is_open, now)
        for port in self._ports.values():
            self._read(port, now)
        for port in self._ports.values():
            data = self._model.receive(port.side, now)
            if data:
                self._write(port, data)
            want = port.open and self._model.room(port.side, now) > 0
            if want and not port.reading:
                loop.add_reader(port.master, self._on_readable, port)
                port.reading = True
            elif not want and port.reading:
                loop.remove_reader(port.master)
                port.reading = False

    def _on_readable(self, port: _Port) -> None:
        # Level-triggered: unregister until the next pass decides again, so a
        # full FIFO or a hung-up master cannot spin the loop.
        asyncio.get_running_loop().remove_reader(port.master)
        port.reading = False
        self._wake.set()

    def inject(self, side: str, data: bytes) -> None:
        """Put ``data`` on the line as if ``side``'s module had sent it.

        It goes through the middlebox, if any, like everything ``side``
        sends: a test's forged or garbage frames, written by a process other
        than the module that owns the port.  Raises UnknownSide.
        """
        check_side(side)
        now = asyncio.get_running_loop().time()
        if self._middlebox is not None:
            data = self._middlebox.process(f"{side}->{'b' if side == 'a' else 'a'}", data)
        self._model.transmit(side, data, now)
        self._log("injected", side=side, bytes=len(data))
        self._wake.set()

    def _read(self, port: _Port, now: float) -> None:
        if not port.open:
            return
        room = self._model.room(port.side, now)
        if room <= 0:
            return
        try:
            data = os.read(port.master, min(room, MAX_READ))
        except BlockingIOError:
            return
        except OSError:  # EIO: the last slave descriptor was closed meanwhile
            return
        if not data:
            return
        direction = f"{port.side}->{'b' if port.side == 'a' else 'a'}"
        if self._middlebox is not None:
            data = self._middlebox.process(direction, data)
        self._model.transmit(port.side, data, now)

    def _write(self, port: _Port, data: bytes) -> None:
        try:
            written = os.write(port.master, data)
        except BlockingIOError:
            written = 0
        except OSError:  # closed between the poll and the write
            written = 0
        if written < len(data):
            self._model.note_overrun(port.side, len(data) - written)

    # -- the control socket -------------------------------------------------

    def handle_command(self, message: object) -> dict[str, object]:
        """Carry out one decoded control command; return the reply object.

        Raises :class:`ControlError`, :class:`~host_tools.sim.line.UnknownSide`
        or :class:`~host_tools.sim.line.ImpairmentError`; state is then unchanged.
        """
        if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
            raise ControlError('a command is a JSON object with a string "cmd"')
        cmd = message["cmd"]
        args = {k: v for k, v in message.items() if k != "cmd"}
        allowed = {
            "cut": set(),
            "restore": set(),
            "stats": set(),
            "set": {"ber", "drop", "latency"},
            "power": {"side", "on"},
            "inject": {"side", "hex"},
        }
        if cmd not in allowed:
            raise ControlError(f"unknown command {cmd!r}")
        extra = set(args) - allowed[cmd]
        if extra:
            raise ControlError(f"{cmd}: unexpected field(s) {sorted(extra)}")
        if cmd == "cut":
            self.cut()
        elif cmd == "restore":
            self.restore()
        elif cmd == "stats":
            return {"ok": True, "stats": self.stats()}
        elif cmd == "set":
            imp = self.set_impairments(**args)
            return {"ok": True, "ber": imp.ber, "drop": imp.drop, "latency": imp.latency}
        elif cmd == "inject":
            if not isinstance(args.get("hex"), str) or "side" not in args:
                raise ControlError('inject needs "side" and "hex" (the bytes in hex)')
            try:
                data = bytes.fromhex(args["hex"])
            except ValueError:
                raise ControlError("inject: hex is not hexadecimal") from None
            if len(data) > MAX_INJECT:
                raise ControlError(f"inject: at most {MAX_INJECT} bytes at a time")
            self.inject(check_side(args["side"]), data)
        else:  # power
            if "side" not in args or "on" not in args:
                raise ControlError('power needs "side" and "on"')
            check_side(args["side"])
            self.power(args["side"], args["on"])
        return {"ok": True}

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            await self._control_session(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(me)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _control_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not self._stopping:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                await _send(writer, {"ok": False, "error": "command line too long"})
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                message = json.loads(line)
                if isinstance(message, dict) and message.get("cmd") == "watch":
                    if len(message) != 1:
                        raise ControlError("watch: unexpected fields")
                    await self._watch_session(reader, writer)
                    return
                reply = self.handle_command(message)
            except (ValueError, LinkSimError) as e:  # JSONDecodeError is a ValueError
                reply = {"ok": False, "error": str(e)}
            await _send(writer, reply)

    async def _watch_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        eof = asyncio.ensure_future(reader.read())
        events = self.watch()
        try:
            while True:
                nxt = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({nxt, eof}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    return
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    return
                await _send(writer, {"event": "power", "side": event.side, "on": event.on})
        finally:
            eof.cancel()
            with contextlib.suppress(BaseException):
                await eof
            await events.aclose()


async def _send(writer: asyncio.StreamWriter, obj: dict[str, object]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left at ``path`` by an earlier run; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)


# -- command line -------------------------------------------------------------


def load_isolator() -> Middlebox:
    """Return a new protocol-break isolator middlebox.

    Raises :class:`ControlError` if ``firmware.isolator.simbox`` cannot be imported.
    """
    try:
        from firmware.isolator.simbox import IsolatorMiddlebox
    except ImportError as e:
        raise ControlError(
            f"--isolator needs firmware.isolator.simbox.IsolatorMiddlebox, which is "
            f"not importable: {e}"
        ) from e
    try:
        box: Middlebox = IsolatorMiddlebox()
    except (OptogateError, ValueError, OSError) as e:
        raise ControlError(f"--isolator: the isolator could not be configured: {e}") from e
    return box


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate sim link``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Two ptys joined like the optocoupled UART: side a (outer module) and "
        "side b (inner module), paced at the baud rate, with bit errors, drops, latency, "
        "cuts and power loss controlled over a Unix socket.  Prints one JSON line "
        '{"a": PTY, "b": PTY, "control": SOCKET} on stdout, logs JSON lines on stderr, '
        "runs until SIGTERM or SIGINT.",
    )
    parser.add_argument("--baud", type=int, default=115200, help="line rate, 8N1 (115200)")
    parser.add_argument("--ber", type=float, default=0.0, help="bit-error rate (0)")
    parser.add_argument("--drop", type=float, default=0.0, help="byte drop rate (0)")
    parser.add_argument("--latency", type=float, default=0.0, help="one-way latency, s (0)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument(
        "--control", metavar="PATH", help="control socket path (default: a new temporary one)"
    )
    parser.add_argument(
        "--isolator",
        action="store_true",
        help="pass both directions through the protocol-break isolator",
    )
    return parser


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate sim link``; return the exit status (0 after SIGTERM/SIGINT)."""
    args = build_parser(prog).parse_args(argv)
    try:
        middlebox = load_isolator() if args.isolator else None
        # Validate before creating anything.
        LineModel(args.baud, Impairments(args.ber, args.drop, args.latency), args.seed)
    except (ImpairmentError, ControlError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="optogate-link-") as tmp:
        control = args.control or str(Path(tmp) / "control.sock")
        try:
            return asyncio.run(_serve(args, control, middlebox))
        except OSError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # the relay failed: say so, and exit non-zero
            log_to_stderr("failed", error=f"{type(e).__name__}: {e}")
            return 1


async def _serve(args: argparse.Namespace, control: str, middlebox: Middlebox | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sim = LinkSimulator(
        baud=args.baud,
        ber=args.ber,
        drop=args.drop,
        latency=args.latency,
        seed=args.seed,
        control_path=control,
        middlebox=middlebox,
        log=log_to_stderr,
    )
    await sim.start()
    try:
        line = json.dumps({"a": sim.a_path, "b": sim.b_path, "control": sim.control_path})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        stopping = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(sim.wait_failed())
        await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failed.cancel()
        log_to_stderr("signal" if stop.is_set() else "relay_stopped")
    finally:
        await sim.aclose()
    return 0


__all__ = [
    "DIRECTIONS",
    "SIDES",
    "ControlError",
    "ImpairmentError",
    "LinkSimulator",
    "Middlebox",
    "PowerChanged",
    "UnknownSide",
    "build_parser",
    "load_isolator",
    "log_to_stderr",
    "main",
]
