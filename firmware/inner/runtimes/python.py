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
replacement, or nothing (filled when a call needs it).  Invocations join one
queue in arrival order; once per turn of the event loop, and whenever a
worker answers its last call, the queue is *dispatched*: each free worker
(no call unanswered) takes the oldest calls.  It takes one call at a time
while the service's calls are long, so N concurrent calls on M workers are
served first come, first served.  While they are short (the run times the
workers report average under ``BATCH_BELOW_S``) one free worker takes up to
``MAX_BATCH_CALLS`` queued calls in a single write, a *batch*, before the
next free worker is used: on a small machine the system calls and process
wake-ups of a round trip per call cost more than a short algorithm, and a
batch pays them once.  The worker runs a batch's calls in order and answers
each as soon as it is done, so the oldest unanswered call of a worker is
always the one running, and its time limit runs from when it started (the
batch was sent, or the call before it was answered).  The daemon end of each
worker's socket is an :class:`asyncio.Protocol`: replies are handled as they
are read, with one timer per worker for the running call.

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

What a reply means (:func:`interpret_reply`):

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
  old one is killed at once (after its exit status is read, for an end of
  file), the calls it had been sent but had not started go back to the head
  of the queue (a worker runs nothing after a crash reply, so none of them
  ran), and a task reaps the old worker and starts a new one in the slot.
  A failure to start it reaches the oldest call left waiting as
  :class:`RuntimeUnavailable` (or the next call that needs the slot, if none
  was waiting; :meth:`PythonRuntime.aclose` collects it if nobody called).
* A cancelled call (the client went away) that is running replaces its
  worker, whose state is then unknown; one still queued is dropped; one sent
  in a batch but not started yet runs, and its reply is dropped.

:meth:`PythonRuntime.aclose` refuses new calls, fails the queued ones and
those in flight (:class:`RuntimeUnavailable`), kills and reaps every worker
and removes the working directory.

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
import functools
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

# Batching.  When calls queue up, a free worker takes up to MAX_BATCH_CALLS of
# them in one write (and at most MAX_BATCH_BYTES of frames; a larger call goes
# alone, since what a worker buffers counts against its memory limit).  It
# saves the system calls and, above all, the process wake-ups of a round trip
# per call: on a busy 2-core machine they cost more than a short algorithm.
MAX_BATCH_CALLS = 16
MAX_BATCH_BYTES = 256 * 1024

# Calls are batched only while the average run time the workers report stays
# below this.  For longer calls the round trip is a small part of the cost,
# and sending calls one at a time keeps a long call from holding up others
# queued behind it on its worker while another worker is free.
BATCH_BELOW_S = 0.002

# Weight of the newest run time in that (exponential moving) average.
RUN_TIME_WEIGHT = 0.2

# A timer of the event loop may fire this much before its deadline; a call
# this close to its deadline is over it.
TIMER_SLACK_S = 0.001

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


class _Call:
    """One invocation on its way: queued, then in a worker's line, then answered.

    ``future`` receives the call's :class:`Verdict`; ``started`` is when it
    became the oldest unanswered call of its worker (the one running).
    """

    __slots__ = ("call_id", "data", "future", "head", "pid", "sent", "started", "worker")

    def __init__(
        self, call_id: int, head: bytes, data: bytes, future: asyncio.Future[Verdict]
    ) -> None:
        self.call_id = call_id
        self.head = head
        self.data = data
        self.future = future
        self.started = 0.0
        self.worker: _Worker | None = None
        self.pid = 0
        self.sent = False

    @property
    def size(self) -> int:
        return len(self.head) + len(self.data)


class _Worker(asyncio.Protocol):
    """One worker process and its socket (adapter; created by PythonRuntime._spawn).

    The socket is driven as a protocol: every complete reply is handed to the
    runtime from ``data_received``, with no task in between.  ``line`` holds
    the calls sent and not yet answered, oldest first; the worker runs them
    in that order, so ``line[0]`` is the one running.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        max_frame: int,
        service: str,
        runtime: PythonRuntime,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.facts: dict[str, Any] = {}
        self.line: deque[_Call] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.slot: _Slot | None = None
        self.retired = False
        self._runtime = runtime
        self._decoder = pyworker.FrameDecoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._broken = False
        self._greeting: asyncio.Future[pyworker.Message] = (
            asyncio.get_running_loop().create_future()
        )
        self._service = service
        assert process.stdout is not None
        self._output = asyncio.create_task(self._log_output(process.stdout))

    # asyncio.Protocol

    @property
    def connected(self) -> bool:
        """Return whether the socket has been handed to the event loop."""
        return self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            self._decoder.receive_bytes(data)
            while (message := self._decoder.next_message()) is not None:
                if not self._greeting.done():
                    self._greeting.set_result(message)
                elif not self.retired:
                    self._runtime._replied(self, *message)
        except pyworker.FrameError as e:
            self._broken = True
            if not self._greeting.done():
                self._greeting.set_exception(e)
            elif not self.retired:
                self._runtime._broke(self, e)

    def eof_received(self) -> bool:
        self._gone("end of file")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(str(exc) if exc else "end of file")

    def _gone(self, why: str) -> None:
        if not self._greeting.done():
            self._greeting.set_exception(_WorkerGone(why))
        elif not self.retired and not self._broken:
            self._broken = True
            self._runtime._lost(self)

    # used by the runtime

    async def greeting(self) -> pyworker.Message:
        """Return the worker's first message; raise _WorkerGone or FrameError."""
        return await self._greeting

    def send(self, frames: list[bytes]) -> None:
        """Write frames in one go (the transport buffers what the socket does not take)."""
        assert self._transport is not None
        if not self._transport.is_closing():
            # One write per batch: the transport sends at once when its buffer
            # is empty, so every separate write would cost a system call.
            self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

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
        self.retired = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.kill()
        if self._transport is not None:
            self._transport.close()
        await self.process.wait()
        await self._output

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
    """A place for one worker: warm, being (re)placed (``pending``), or empty.

    ``failure`` is why the last start in this slot failed, kept for the next
    call that needs the slot when no call was waiting.
    """

    worker: _Worker | None = None
    pending: asyncio.Task[_Worker] | None = None
    failure: RuntimeFailure | None = None


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
        self._queue: deque[_Call] = deque()
        self._dispatch_soon = False
        self._run_average: float | None = None
        self._live: set[_Worker] = set()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._next_id = 0
        self._workdir: Path | None = None
        self._stats = dict.fromkeys(
            ("calls", "ok", "errors", "crashes", "timeouts", "too_large", "spawned", "batches"), 0
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
                started.append((slot, self._fill(slot)))
        failures: list[BaseException] = []
        for slot, task in started:
            try:
                await asyncio.shield(task)
            except RuntimeFailure as e:
                failures.append(e)
                if slot.failure is e:  # reported here, not to the next call
                    slot.failure = None
        if failures:
            raise RuntimeUnavailable(f"the service {self._name} could not be started")

    async def invoke(self, inv: Invocation) -> Outcome:
        """Run the algorithm once on a warm worker and return its outcome.

        Raises InvalidInvocation (nothing run), AlgorithmError, AlgorithmTimeout,
        AlgorithmCrashed / MemoryLimitExceeded, ResultTooLarge, or
        RuntimeUnavailable (closed, or no worker could be started).
        """
        if self._closed:
            raise RuntimeUnavailable("the runtime is closed")
        self._next_id += 1
        head, data = self._encode_call(self._next_id, inv)
        call = _Call(self._next_id, head, data, asyncio.get_running_loop().create_future())
        self._queue.append(call)
        self._dispatch_later()
        try:
            verdict = await call.future
        except asyncio.CancelledError:
            self._cancel(call)
            raise
        return self._settle(verdict, call.pid)

    async def aclose(self) -> None:
        """Kill and reap every worker, fail queued calls, remove the work directory.

        Idempotent; concurrent calls wait for the same close.
        """
        if self._closing is None:
            self._closing = asyncio.create_task(self._close())
        await asyncio.shield(self._closing)

    def statistics(self) -> dict[str, int]:
        """Return counters: calls, ok, errors, crashes, timeouts, too_large, spawned,
        batches (writes that carried more than one call), alive."""
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

    # ------------------------------------------------------------ dispatching

    def _dispatch_later(self) -> None:
        # Once per turn of the event loop, so calls that arrive together can
        # leave together.
        if not self._dispatch_soon:
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _batching(self) -> bool:
        return self._run_average is not None and self._run_average < BATCH_BELOW_S

    def _dispatch(self) -> None:
        """Send queued calls to free workers; start workers queued calls need."""
        self._dispatch_soon = False
        if self._closed or not self._queue:
            return
        free: list[_Worker] = []
        for slot in self._slots:
            worker = slot.worker
            if worker is None or worker.line:
                continue
            if worker.process.returncode is not None:
                # Died while idle (the OOM killer, a thread the algorithm left
                # behind): replace it rather than fail an innocent call.
                log.warning("worker_died_idle service=%s pid=%d", self._name, worker.pid)
                self._drop(worker)
                continue
            free.append(worker)
        if free:
            # Short calls fill one worker before the next is woken: a wake-up
            # costs more than running a few short calls one after the other.
            per = MAX_BATCH_CALLS if self._batching() else 1
            for worker in free:
                if not self._queue:
                    break
                self._send(worker, per)
        if not self._queue:
            return
        # Calls still wait: every slot should hold a worker or be getting one.
        for slot in self._slots:
            if slot.worker is not None or slot.pending is not None:
                continue
            if slot.failure is not None:
                # The last start in this slot failed and nobody was told: the
                # oldest waiting call is, as if it had taken the slot.
                failure, slot.failure = slot.failure, None
                call = self._queue.popleft()
                call.future.set_exception(failure)
                if not self._queue:
                    return
            self._fill(slot)

    def _send(self, worker: _Worker, most: int) -> None:
        """Send the oldest queued calls (up to ``most``, within MAX_BATCH_BYTES) to ``worker``."""
        calls: list[_Call] = []
        frames: list[bytes] = []
        size = 0
        while self._queue and len(calls) < most:
            call = self._queue[0]
            if calls and size + call.size > MAX_BATCH_BYTES:
                break
            self._queue.popleft()
            calls.append(call)
            size += call.size
            frames.append(call.head)
            if call.data:
                frames.append(call.data)
            call.worker = worker
            call.pid = worker.pid
            if not call.sent:
                call.sent = True
                self._stats["calls"] += 1
        if len(calls) > 1:
            self._stats["batches"] += 1
        calls[0].started = asyncio.get_running_loop().time()
        worker.line.extend(calls)
        worker.send(frames)
        self._arm(worker)

    def _arm(self, worker: _Worker) -> None:
        if worker.timer is None and worker.line:
            deadline = worker.line[0].started + self._limits.timeout_s
            worker.timer = asyncio.get_running_loop().call_at(deadline, self._check_time, worker)

    def _check_time(self, worker: _Worker) -> None:
        # One timer per worker, moved lazily: a reply only changes which call
        # is running, and the timer looks at that call when it fires.
        worker.timer = None
        if worker.retired or not worker.line:
            return
        call = worker.line[0]
        deadline = call.started + self._limits.timeout_s
        loop = asyncio.get_running_loop()
        if deadline > loop.time() + TIMER_SLACK_S:
            worker.timer = loop.call_at(deadline, self._check_time, worker)
            return
        worker.line.popleft()
        timeout = AlgorithmTimeout(_timeout_text(self._limits))
        self._drop(worker, call, Verdict(None, timeout, False, "killed"))

    # ----------------------------------------------------- what workers say

    def _replied(self, worker: _Worker, header: dict[str, Any], data: bytes) -> None:
        if not worker.line:
            log.warning("worker_unsolicited service=%s pid=%d", self._name, worker.pid)
            self._drop(worker)
            return
        call = worker.line.popleft()
        verdict = interpret_reply(header, data, call.call_id, self._limits)
        run_us = header.get("run_us")
        if type(run_us) is int and run_us >= 0:
            seconds = run_us / 1_000_000
            average = self._run_average
            self._run_average = (
                seconds if average is None else average + RUN_TIME_WEIGHT * (seconds - average)
            )
        if not verdict.keep_worker:
            self._drop(worker, call, verdict)
            return
        self._deliver(call, verdict)
        if worker.line:
            worker.line[0].started = asyncio.get_running_loop().time()
        elif self._queue:
            self._dispatch()

    def _broke(self, worker: _Worker, error: pyworker.FrameError) -> None:
        call = worker.line.popleft() if worker.line else None
        if isinstance(error, pyworker.FrameTooLarge):
            too_large = ResultTooLarge(
                f"the result exceeds the limit of {self._limits.max_result_bytes} bytes"
            )
            verdict = Verdict(None, too_large, False, str(error))
        else:
            verdict = _crashed(f"protocol violation: {error}")
        self._drop(worker, call, verdict)

    def _lost(self, worker: _Worker) -> None:
        if self._closed:
            return  # killed by aclose(), which answers its calls
        if worker.line:
            # The exit status tells a crash from the CPU backstop; the
            # replacement reads it before killing anything.
            self._drop(worker, worker.line.popleft(), None)
        else:
            log.warning("worker_died_idle service=%s pid=%d", self._name, worker.pid)
            self._drop(worker)

    def _deliver(self, call: _Call, verdict: Verdict) -> None:
        call.worker = None
        if not call.future.done():  # a cancelled caller is not told
            call.future.set_result(verdict)

    def _drop(
        self, worker: _Worker, call: _Call | None = None, verdict: Verdict | None = None
    ) -> None:
        """Retire ``worker``: answer ``call`` (the one it was running), queue the calls
        it had not started again (first in line), and start its replacement.

        With a call and no verdict, the verdict comes from the exit status.
        """
        worker.retired = True
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        for waiting in reversed(worker.line):
            waiting.worker = None
            if not waiting.future.done():
                self._queue.appendleft(waiting)
        worker.line.clear()
        if call is not None:
            call.worker = None
        if call is None or verdict is not None:
            worker.kill()
            if call is not None and verdict is not None:
                self._deliver(call, verdict)
        slot = worker.slot
        if slot is not None and slot.worker is worker:
            slot.worker = None
            if not self._closed:
                self._fill(slot, worker, call if verdict is None else None)
        self._dispatch_later()

    def _cancel(self, call: _Call) -> None:
        """The caller of ``call`` went away."""
        worker = call.worker
        if worker is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(call)
            return
        if not worker.retired and worker.line and worker.line[0] is call:
            # It is running and its worker's state is unknown: replace the worker.
            worker.line.popleft()
            self._drop(worker)
        # Otherwise it has not started: the worker runs it and the reply is dropped.

    # ------------------------------------------------------------ the pool

    def _fill(
        self, slot: _Slot, old: _Worker | None = None, call: _Call | None = None
    ) -> asyncio.Task[_Worker]:
        """Start a worker in ``slot`` (after retiring ``old``, answering ``call`` from its
        exit status); return the task, which installs the worker when it is ready."""
        task = asyncio.create_task(self._spawn() if old is None else self._replace(old, call))
        slot.pending = task
        task.add_done_callback(functools.partial(self._filled, slot))
        return task

    def _filled(self, slot: _Slot, task: asyncio.Task[_Worker]) -> None:
        if slot.pending is not task:
            return
        slot.pending = None
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            worker = task.result()
            worker.slot = slot
            slot.worker = worker
        elif isinstance(error, RuntimeFailure):
            slot.failure = error
        else:
            log.error("worker_replace_failed service=%s error=%r", self._name, error)
            slot.failure = RuntimeUnavailable("no worker could be started")
        if self._queue:
            self._dispatch_later()

    async def _replace(self, old: _Worker, call: _Call | None) -> _Worker:
        if call is not None:
            status = await old.exit_status(EXIT_STATUS_WAIT_S)
            if status == -signal.SIGXCPU:
                timeout = AlgorithmTimeout(_timeout_text(self._limits))
                self._deliver(call, Verdict(None, timeout, False, "CPU time limit (SIGXCPU)"))
            else:
                self._deliver(call, _crashed(f"worker died, exit status {status}"))
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
            max_frame = self._limits.max_result_bytes + pyworker.ENVELOPE_BYTES
            worker = _Worker(process, max_frame, self._name, self)
            self._live.add(worker)
            self._stats["spawned"] += 1
            made = worker
            await asyncio.get_running_loop().create_unix_connection(lambda: made, sock=parent)
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
                if not worker.connected:
                    parent.close()
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
        head, _ = pyworker.encode_message(init)
        worker.send([head])
        header, _ = await worker.greeting()
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

    def _settle(self, verdict: Verdict, pid: int) -> Outcome:
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
                pid,
                type(failure).__name__,
                not verdict.keep_worker,
                verdict.log_detail,
            )
        raise failure

    # ----------------------------------------------------------------- closing

    async def _close(self) -> None:
        self._closed = True
        waiting = list(self._queue)
        self._queue.clear()
        for call in waiting:
            if not call.future.done():
                call.future.set_exception(RuntimeUnavailable("the runtime is closed"))
        for worker in list(self._live):
            worker.kill()
            for call in worker.line:
                if not call.future.done():
                    closed = RuntimeUnavailable("the runtime was closed during the call")
                    call.future.set_exception(closed)
        pending = [slot.pending for slot in self._slots if slot.pending is not None]
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, RuntimeFailure):
                log.error("worker_replace_failed service=%s error=%r", self._name, result)
        for slot in self._slots:
            slot.worker = slot.pending = None
            slot.failure = None
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
