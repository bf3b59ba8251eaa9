"""The sandboxed Python runtime: a small pool of warm worker processes per service.

Theory of operation
-------------------
A service's bundle is a directory holding Python files; its manifest names an
entry ``"module:function"``, a function ``run(params: dict, data: bytes) ->
dict | tuple[dict, bytes]``.  Raising ``ValueError`` (or a subclass) refuses the
input with a message for the caller (:class:`AlgorithmError`); any other
exception is a crash (:class:`AlgorithmCrashed`) whose traceback goes to the
operator's log and never to the caller.

:class:`PythonRuntime` keeps ``pool_size`` *slots*.  A slot holds a warm worker
(a process running :mod:`firmware.inner.runtimes.pyworker`, which has already
confined itself and imported the bundle), or the task starting its
replacement, or nothing (filled on first use).  Invocations take slots in
strict arrival order (a FIFO of waiters: N concurrent calls on M workers are
served first come, first served) and give them back when done.

Workers are started with ``asyncio.create_subprocess_exec`` running
``python -I -B -u pyworker.py FD``, not with ``multiprocessing``: ``-I`` keeps
the environment, the user's site directory and the current directory out of
``sys.path``; only the protocol socket is passed (``pass_fds``, everything else
closed); and nothing is ever unpickled from the worker (a ``multiprocessing``
result is a pickle, and unpickling what a sandboxed program wrote would hand
it the daemon).  The worker gets a clean environment, an empty read-only
working directory, its own session (so a kill reaches whatever it forked), and
confines itself before importing the bundle: resource limits, a private
network namespace, and an unprivileged user when the daemon runs as root (the
steps are listed in :mod:`~firmware.inner.runtimes.pyworker`, with the wire
format).

One call is a round trip on the socket under the manifest's ``timeout_s``:

* ``ok`` -> :class:`Outcome`; ``error`` -> :class:`AlgorithmError`; both keep
  the worker.
* ``too_large`` -> :class:`ResultTooLarge`.  The worker measured the encoded
  result (JSON of ``result`` + length of ``data``) *before* sending it, so it
  is not killed: it sent nothing large.  A worker that nevertheless announces
  a frame larger than the limit is killed.
* ``crash`` -> :class:`AlgorithmCrashed` (:class:`MemoryLimitExceeded` when the
  algorithm ran out of its RLIMIT_AS); end of file -> the worker died
  (``os.kill(os.getpid(), 9)``, the kernel's OOM killer): crashed; SIGXCPU ->
  :class:`AlgorithmTimeout`; timeout -> the process group is killed,
  :class:`AlgorithmTimeout`.  In all these cases the worker is replaced: the
  old one is killed at once, and a task reaps it and starts a new one; that
  task stays in the slot, and the next call taking the slot awaits it, so a
  failure to start the replacement reaches that caller as
  :class:`RuntimeUnavailable` (and :meth:`PythonRuntime.aclose` collects it
  if nobody called).
* A cancelled call (the client went away) also replaces its worker, whose
  state is then unknown.

:meth:`PythonRuntime.aclose` refuses new calls, fails the queued ones, kills
every worker, waits for calls in flight to come back (they fail with
:class:`RuntimeUnavailable`), reaps every process and removes the working
directory.

Deployment notes: when the daemon runs as root the workers run as
``PythonRuntimeConfig.user`` (default ``nobody``), so the service directory
and the interpreter's library must be readable by that user (``ready`` reports
whether the library is, and a warning is logged if not).  All services share
that user; they cannot ptrace one another (workers are non-dumpable) but could
signal one another.  When the daemon is not root, workers run as its user, and
no network namespace can be made.  Processes an algorithm forks and moves to
a new session escape the kill of its process group; ``RLIMIT_NPROC`` is
per-user, so it is not set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.common.errors import ConfigError
from firmware.inner.runtimes import pyworker
from firmware.inner.runtimes.base import (
    MAX_ERROR_MESSAGE_CHARS,
    AlgorithmCrashed,
    AlgorithmError,
    AlgorithmTimeout,
    InvalidInvocation,
    Invocation,
    Limits,
    MemoryLimitExceeded,
    Outcome,
    ResultTooLarge,
    RuntimeFailure,
    RuntimeUnavailable,
)

log = logging.getLogger(__name__)

WORKER_PROGRAM = str(Path(pyworker.__file__).resolve())

# Two warm workers: one call can run while another is being answered or a
# crashed worker is being replaced, at the cost of one more idle interpreter
# (about 10 MB resident).  Services that need more set it in the config.
DEFAULT_POOL_SIZE = 2

# Starting a worker includes importing the bundle; a Raspberry Pi 3 takes
# seconds to import a library such as ezdxf from an SD card.
DEFAULT_STARTUP_TIMEOUT_S = 30.0

# After the socket reaches end of file, how long to wait for the exit status
# (to tell SIGXCPU from a crash).  The process is gone or going; this is short.
EXIT_STATUS_WAIT_S = 1.0

# Output an algorithm prints is logged for the operator up to this many bytes
# per worker; the rest is counted, so a chatty algorithm cannot flood the log.
MAX_LOGGED_OUTPUT_BYTES = 64 * 1024

# The worker's whole environment.  -I already ignores PYTHON* variables;
# MALLOC_ARENA_MAX keeps glibc from reserving 64 MB of address space per
# thread, which RLIMIT_AS would count.
WORKER_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "MALLOC_ARENA_MAX": "2"}

_ENTRY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


@dataclass(frozen=True)
class PythonRuntimeConfig:
    """Daemon-side settings of the Python runtime (the manifest gives the limits).

    ``pool_size``: warm workers per service.  ``user``: the account workers run
    as when the daemon is root (never root itself).  ``isolate_network``: give
    each worker an empty network namespace when possible.
    ``startup_timeout_s``: bound on starting a worker and importing the bundle.
    ``python``: the interpreter running the workers.
    """

    pool_size: int = DEFAULT_POOL_SIZE
    user: str = "nobody"
    isolate_network: bool = True
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    python: str = field(default=sys.executable)

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ConfigError(f"pool_size must be >= 1, got {self.pool_size}")
        if not self.startup_timeout_s > 0:
            raise ConfigError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker: its PID, the uid it runs as, whether it has no network."""

    pid: int
    uid: int | None
    netns: bool


@dataclass(frozen=True)
class Verdict:
    """What one reply from a worker means: an outcome or a failure, and the worker's fate.

    ``log_detail`` is operator-only text (a traceback) or None.
    """

    outcome: Outcome | None
    failure: RuntimeFailure | None
    keep_worker: bool
    log_detail: str | None = None


def _crashed(detail: str) -> Verdict:
    return Verdict(None, AlgorithmCrashed("the algorithm failed unexpectedly"), False, detail)


def interpret_reply(
    header: Mapping[str, Any], data: bytes, call_id: int, limits: Limits
) -> Verdict:
    """Return what a worker's reply to call ``call_id`` means; pure.

    The worker is not trusted: a reply that does not follow the protocol is a
    crash (and the worker is replaced).  Never raises.
    """
    kind = header.get("t")
    if header.get("id") != call_id:
        return _crashed(f"protocol violation: reply {kind!r} for call {header.get('id')!r}")
    if kind == "ok":
        result = header.get("result")
        if not isinstance(result, dict):
            return _crashed("protocol violation: result is not an object")
        try:
            size = len(pyworker.encode_json(result)) + len(data)
        except (TypeError, ValueError, RecursionError):
            return _crashed("protocol violation: result is not JSON-able")
        if size > limits.max_result_bytes:
            failure = ResultTooLarge(_too_large_text(size, limits))
            return Verdict(None, failure, False, "worker sent an oversized result")
        return Verdict(Outcome(result, data), None, True)
    if kind == "error":
        message = header.get("message")
        if not isinstance(message, str):
            return _crashed("protocol violation: error without a message")
        return Verdict(None, AlgorithmError(message), True)
    if kind == "too_large":
        announced = header.get("size")
        if not isinstance(announced, int):
            return _crashed("protocol violation: too_large without a size")
        return Verdict(None, ResultTooLarge(_too_large_text(announced, limits)), True)
    if kind == "crash":
        detail = str(header.get("detail", ""))
        if header.get("kind") == "memory":
            text = f"the algorithm exceeded its memory limit of {limits.memory_mb} MB"
            return Verdict(None, MemoryLimitExceeded(text), False, detail)
        return _crashed(detail)
    return _crashed(f"protocol violation: unexpected reply {kind!r}")


def _too_large_text(size: int, limits: Limits) -> str:
    return f"the result of {size} bytes exceeds the limit of {limits.max_result_bytes} bytes"


def _timeout_text(limits: Limits) -> str:
    return f"the algorithm did not finish within {limits.timeout_s:g} s"


class _WorkerGone(Exception):
    """The worker's socket reached end of file or broke."""


class _Worker:
    """One worker process and its socket (adapter; created by PythonRuntime._spawn)."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int,
        service: str,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.facts: dict[str, Any] = {}
        self._reader = reader
        self._writer = writer
        self._decoder = pyworker.FrameDecoder(max_frame)
        self._service = service
        assert process.stdout is not None
        self._output = asyncio.create_task(self._log_output(process.stdout))

    async def send(self, head: bytes, data: bytes = b"") -> None:
        """Send one frame; raise _WorkerGone if the worker is gone."""
        try:
            # One write per frame: the transport sends at once when its buffer
            # is empty, so two writes would cost two system calls.
            self._writer.write(head + data if data else head)
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise _WorkerGone(str(e)) from e

    async def receive(self) -> pyworker.Message:
        """Return the next message; raise _WorkerGone at end of file, FrameError if bad."""
        while True:
            message = self._decoder.next_message()
            if message is not None:
                return message
            try:
                chunk = await self._reader.read(pyworker.RECV_CHUNK)
            except (ConnectionError, OSError) as e:
                raise _WorkerGone(str(e)) from e
            if not chunk:
                raise _WorkerGone("end of file")
            self._decoder.receive_bytes(chunk)

    def kill(self) -> None:
        """SIGKILL the worker's process group (it leads its own session)."""
        # The group outlives its leader while anything the algorithm forked is
        # alive, and Linux does not reuse a PID still used as a group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def exit_status(self, wait_s: float) -> int | None:
        """Return the exit status if the process ends within ``wait_s``, else None."""
        try:
            async with asyncio.timeout(wait_s):
                return await self.process.wait()
        except TimeoutError:
            return None

    async def reap(self) -> None:
        """Kill the worker and wait until the process and its output pipe are done."""
        self.kill()
        self._writer.close()
        await self.process.wait()
        await self._output
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _log_output(self, stream: asyncio.StreamReader) -> None:
        logged = dropped = 0
        while chunk := await stream.read(4096):
            if logged < MAX_LOGGED_OUTPUT_BYTES:
                text = chunk[: MAX_LOGGED_OUTPUT_BYTES - logged].decode(errors="replace")
                log.info("worker_output service=%s pid=%d text=%r", self._service, self.pid, text)
                logged += len(chunk)
            else:
                dropped += len(chunk)
        if dropped:
            log.warning(
                "worker_output_dropped service=%s pid=%d bytes=%d", self._service, self.pid, dropped
            )


@dataclass
class _Slot:
    """A place for one worker: warm, being replaced (``pending``), or empty."""

    worker: _Worker | None = None
    pending: asyncio.Task[_Worker] | None = None


class PythonRuntime:
    """Runs one service's Python algorithm in a pool of sandboxed worker processes.

    Implements :class:`firmware.inner.runtimes.base.Runtime`.  The constructor
    only validates (ConfigError on a bad entry, a missing directory, an unknown
    or root user); processes start in :meth:`start` or on first use.
    """

    def __init__(
        self,
        service_dir: str | os.PathLike[str],
        entry: str,
        limits: Limits,
        config: PythonRuntimeConfig | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self._config = config or PythonRuntimeConfig()
        self._service_dir = Path(service_dir).resolve()
        if not self._service_dir.is_dir():
            raise ConfigError(f"service directory {self._service_dir} does not exist")
        if not _ENTRY.fullmatch(entry):
            raise ConfigError(f"entry {entry!r} is not of the form 'module:function'")
        self._entry = entry
        self._limits = limits
        self._name = name or self._service_dir.name
        self._uid, self._gid = _resolve_user(self._config.user)
        self._slots = [_Slot() for _ in range(self._config.pool_size)]
        self._idle: deque[_Slot] = deque(self._slots)
        self._waiters: deque[asyncio.Future[_Slot]] = deque()
        self._busy = 0
        self._drained: asyncio.Event | None = None
        self._live: set[_Worker] = set()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._next_id = 0
        self._workdir: Path | None = None
        self._stats = dict.fromkeys(
            ("calls", "ok", "errors", "crashes", "timeouts", "too_large", "spawned"), 0
        )

    # ------------------------------------------------------------------ public

    async def start(self) -> None:
        """Start every worker of the pool (each confined, with the bundle imported).

        Raises RuntimeUnavailable if a worker cannot start or load the bundle
        (the operator's log says why); the runtime stays usable and retries on
        the next call.
        """
        if self._closed:
            raise RuntimeUnavailable("the runtime is closed")
        started: list[tuple[_Slot, asyncio.Task[_Worker]]] = []
        for slot in self._slots:
            if slot.worker is None and slot.pending is None:
                slot.pending = asyncio.create_task(self._spawn())
                started.append((slot, slot.pending))
        failures: list[BaseException] = []
        for slot, task in started:
            try:
                await asyncio.shield(task)
            except RuntimeFailure as e:
                failures.append(e)
                if slot.pending is task:
                    slot.pending = None
        if failures:
            raise RuntimeUnavailable(f"the service {self._name} could not be started")

    async def invoke(self, inv: Invocation) -> Outcome:
        """Run the algorithm once on a warm worker and return its outcome.

        Raises InvalidInvocation (nothing run), AlgorithmError, AlgorithmTimeout,
        AlgorithmCrashed / MemoryLimitExceeded, ResultTooLarge, or
        RuntimeUnavailable (closed, or no worker could be started).
        """
        self._next_id += 1
        call_id = self._next_id
        head, data = self._encode_call(call_id, inv)
        slot = await self._acquire()
        keep = False
        try:
            worker = await self._ensure_worker(slot)
            verdict = await self._exchange(worker, call_id, head, data)
            keep = verdict.keep_worker
        finally:
            self._release(slot, keep)
        return self._settle(verdict, worker)

    async def aclose(self) -> None:
        """Kill and reap every worker, fail queued calls, remove the work directory.

        Idempotent; concurrent calls wait for the same close.
        """
        if self._closing is None:
            self._closing = asyncio.create_task(self._close())
        await asyncio.shield(self._closing)

    def statistics(self) -> dict[str, int]:
        """Return counters: calls, ok, errors, crashes, timeouts, too_large, spawned, alive."""
        return {**self._stats, "alive": len(self._live)}

    def workers(self) -> list[WorkerInfo]:
        """Return what is known of each live, started worker (for status and tests)."""
        return sorted(
            (
                WorkerInfo(w.pid, w.facts.get("uid"), bool(w.facts.get("netns")))
                for w in self._live
                if w.facts
            ),
            key=lambda info: info.pid,
        )

    # ---------------------------------------------------------------- the pool

    async def _acquire(self) -> _Slot:
        if self._closed:
            raise RuntimeUnavailable("the runtime is closed")
        if self._idle:
            self._busy += 1
            return self._idle.popleft()
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result(), keep=True)  # handed over as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self, slot: _Slot, keep: bool) -> None:
        if not keep and slot.worker is not None:
            old, slot.worker = slot.worker, None
            old.kill()
            slot.pending = asyncio.create_task(self._replace(old))
        self._busy -= 1
        while self._waiters and not self._closed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy += 1
                waiter.set_result(slot)
                return
        self._idle.append(slot)
        if self._busy == 0 and self._drained is not None:
            self._drained.set()

    async def _ensure_worker(self, slot: _Slot) -> _Worker:
        if slot.worker is not None and slot.worker.process.returncode is not None:
            # Died while idle (the OOM killer, a thread the algorithm left behind):
            # replace it rather than fail an innocent call.
            log.warning("worker_died_idle service=%s pid=%d", self._name, slot.worker.pid)
            old, slot.worker = slot.worker, None
            slot.pending = asyncio.create_task(self._replace(old))
        if slot.worker is None and slot.pending is None:
            # Through the slot, so a concurrent start() sees a spawn in progress.
            slot.pending = asyncio.create_task(self._spawn())
        task = slot.pending
        if task is not None:
            try:
                worker = await asyncio.shield(task)
            except RuntimeFailure:
                if slot.pending is task:
                    slot.pending = None
                raise
            if slot.pending is task:
                slot.pending = None
                slot.worker = worker
        if slot.worker is None:
            raise RuntimeUnavailable("no worker could be started")
        return slot.worker

    async def _replace(self, old: _Worker) -> _Worker:
        await self._retire(old)
        return await self._spawn()

    async def _retire(self, worker: _Worker) -> None:
        await worker.reap()
        self._live.discard(worker)

    # ---------------------------------------------------------------- workers

    async def _spawn(self) -> _Worker:
        if self._closed:
            raise RuntimeUnavailable("the runtime is closed")
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                self._config.python,
                "-I",
                "-B",
                "-u",  # unbuffered: what the algorithm prints reaches the log even if it is killed
                WORKER_PROGRAM,
                str(child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(child.fileno(),),
                cwd=self._work_directory(),
                env={**WORKER_ENV, "HOME": str(self._work_directory())},
                start_new_session=True,
            )
        except OSError as e:
            parent.close()
            log.error("worker_spawn_failed service=%s error=%r", self._name, e)
            raise RuntimeUnavailable("a Python worker could not be started") from e
        finally:
            child.close()
        worker: _Worker | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent)
            max_frame = self._limits.max_result_bytes + pyworker.ENVELOPE_BYTES
            worker = _Worker(process, reader, writer, max_frame, self._name)
            self._live.add(worker)
            self._stats["spawned"] += 1
            async with asyncio.timeout(self._config.startup_timeout_s):
                await self._handshake(worker)
            if self._closed:
                raise RuntimeUnavailable("the runtime is closed")
        except BaseException as e:
            if worker is None:
                parent.close()
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            else:
                await self._retire(worker)
            if isinstance(e, RuntimeFailure | asyncio.CancelledError):
                raise
            log.error("worker_start_failed service=%s error=%r", self._name, e)
            raise RuntimeUnavailable(f"the service {self._name} could not be started") from e
        return worker

    async def _handshake(self, worker: _Worker) -> None:
        init = {
            "t": "init",
            "service_dir": str(self._service_dir),
            "entry": self._entry,
            "memory_mb": self._limits.memory_mb,
            "uid": self._uid,
            "gid": self._gid,
            "isolate_network": self._config.isolate_network,
            "max_result_bytes": self._limits.max_result_bytes,
            "max_message_chars": MAX_ERROR_MESSAGE_CHARS,
            "parent_pid": os.getpid(),
        }
        await worker.send(*pyworker.encode_message(init))
        header, _ = await worker.receive()
        if header["t"] == "load_failed":
            log.error(
                "service_load_failed service=%s pid=%d detail=%r",
                self._name,
                worker.pid,
                header.get("detail"),
            )
            raise RuntimeUnavailable(f"the service {self._name} could not be loaded")
        if header["t"] != "ready":
            raise RuntimeUnavailable(f"worker answered {header['t']!r} instead of 'ready'")
        worker.facts = header
        log.info(
            "worker_ready service=%s pid=%d uid=%s netns=%s",
            self._name,
            worker.pid,
            header.get("uid"),
            header.get("netns"),
        )
        if header.get("stdlib_readable") is False:
            log.warning(
                "worker_stdlib_unreadable service=%s pid=%d: the interpreter's library is not"
                " readable by the worker's user, so the algorithm can import only modules"
                " already loaded",
                self._name,
                worker.pid,
            )

    def _work_directory(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="optogate-work-"))
            # Read-only and empty: the workers may enter it, nobody may write.
            self._workdir.chmod(0o555)
        return self._workdir

    # ---------------------------------------------------------------- one call

    def _encode_call(self, call_id: int, inv: Invocation) -> tuple[bytes, bytes]:
        if not isinstance(inv.params, dict):
            raise InvalidInvocation("params must be a dict")
        if not isinstance(inv.data, bytes | bytearray | memoryview):
            raise InvalidInvocation("data must be bytes")
        header = {
            "t": "call",
            "id": call_id,
            "params": inv.params,
            "timeout_s": self._limits.timeout_s,
        }
        try:
            return pyworker.encode_message(header, bytes(inv.data))
        except (TypeError, ValueError, RecursionError) as e:
            raise InvalidInvocation(f"params are not JSON-able: {e}") from None

    async def _exchange(self, worker: _Worker, call_id: int, head: bytes, data: bytes) -> Verdict:
        self._stats["calls"] += 1
        try:
            async with asyncio.timeout(self._limits.timeout_s):
                await worker.send(head, data)
                header, output = await worker.receive()
        except TimeoutError:
            worker.kill()
            return Verdict(None, AlgorithmTimeout(_timeout_text(self._limits)), False, "killed")
        except _WorkerGone:
            status = await worker.exit_status(EXIT_STATUS_WAIT_S)
            if status == -signal.SIGXCPU:
                timeout = AlgorithmTimeout(_timeout_text(self._limits))
                return Verdict(None, timeout, False, "CPU time limit (SIGXCPU)")
            return _crashed(f"worker died, exit status {status}")
        except pyworker.FrameTooLarge as e:
            too_large = ResultTooLarge(
                f"the result exceeds the limit of {self._limits.max_result_bytes} bytes"
            )
            return Verdict(None, too_large, False, str(e))
        except pyworker.FrameError as e:
            return _crashed(f"protocol violation: {e}")
        return interpret_reply(header, output, call_id, self._limits)

    def _settle(self, verdict: Verdict, worker: _Worker) -> Outcome:
        if verdict.outcome is not None:
            self._stats["ok"] += 1
            return verdict.outcome
        failure = verdict.failure
        assert failure is not None
        if self._closed and not verdict.keep_worker:
            raise RuntimeUnavailable("the runtime was closed during the call")
        counter = {
            AlgorithmError: "errors",
            AlgorithmTimeout: "timeouts",
            ResultTooLarge: "too_large",
        }.get(type(failure), "crashes")
        self._stats[counter] += 1
        if not isinstance(failure, AlgorithmError):
            log.warning(
                "algorithm_failed service=%s pid=%d failure=%s replaced=%s detail=%r",
                self._name,
                worker.pid,
                type(failure).__name__,
                not verdict.keep_worker,
                verdict.log_detail,
            )
        raise failure

    # ----------------------------------------------------------------- closing

    async def _close(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeUnavailable("the runtime is closed"))
        for worker in list(self._live):
            worker.kill()
        if self._busy:
            self._drained = asyncio.Event()
            await self._drained.wait()
        pending = [slot.pending for slot in self._slots if slot.pending is not None]
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, RuntimeFailure):
                log.error("worker_replace_failed service=%s error=%r", self._name, result)
        for slot in self._slots:
            slot.worker = slot.pending = None
        await asyncio.gather(*(self._retire(worker) for worker in list(self._live)))
        if self._workdir is not None:
            self._workdir.chmod(0o700)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        log.info("runtime_closed service=%s stats=%s", self._name, self._stats)


def _resolve_user(user: str) -> tuple[int | None, int | None]:
    """Return (uid, gid) to drop to, or (None, None) when the daemon is not root.

    Raises ConfigError if the user is unknown or is root.
    """
    if os.geteuid() != 0:
        return None, None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"worker user {user!r} does not exist") from None
    if entry.pw_uid == 0:
        raise ConfigError("workers must not run as root")
    return entry.pw_uid, entry.pw_gid
