"""A small process supervisor: start the appliance's processes, watch them, stop them.

Theory of operation
-------------------
:class:`Supervisor` runs each process of a :class:`ProcessSpec` as a child in
its **own process group** (``start_new_session``), so stopping it reaches
whatever it spawned too (the inner module's algorithm workers).  Processes
are started one at a time in the order the caller gives (dependency order)
and each must say it is ready before the next starts:

* the simulators print one JSON line on stdout (their device paths) and log
  on stderr;
* the daemons log one JSON line per event on stdout; a named event
  (``started``, ``ready``) is their readiness signal.

A spec's ``ready`` function sees every stdout line (parsed as JSON when it
is JSON) and returns the process's *info* (ports, device paths) once the
line it waits for has come.  One reader thread per process copies every
stdout line into ``logs/NAME.log`` in the state directory, keeps the last
event for the live display, and notices the end of the stream; a second
thread copies stderr into ``logs/NAME.err`` (the simulators' event lines
count as events too).  When a process exits the reader records how:

* ``stopped``: the supervisor stopped it;
* ``powered off``: it exited with its spec's ``power_exit`` status (the
  daemons exit with a distinct status when their own supply fails, as the
  simulated GPIO tells them), or its supply was cut without warning
  (:meth:`Supervisor.power_off`: the whole group killed at once) - a state,
  not a failure;
* ``died``: anything else.  A death is never hidden: it is kept in
  :attr:`Supervisor.deaths` (with the tail of its stderr) and reported to
  the ``on_change`` callback.

:meth:`Supervisor.stop_all` stops everything in reverse start order:
SIGTERM to the group, SIGKILL after ``grace`` seconds, and a final SIGKILL
to the group for anything it left behind.

What it does not do: restart a process on its own (a power-cycled module is
restarted by its caller through :meth:`Supervisor.restart`, the way power
returning boots a Pi), or limit the resources of its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from firmware.common.errors import OptogateError

#: Seconds a process gets between SIGTERM and SIGKILL: the daemons give calls
#: in flight 5 s to finish, so 8 s lets a clean stop finish cleanly.
DEFAULT_GRACE: Final = 8.0
#: Lines of a dead process's stderr kept for its report: enough for a
#: Python traceback's last frames and the message.
STDERR_TAIL_LINES: Final = 12
#: How long an exit report waits for the rest of stderr: a member of the
#: process group that outlives the leader may hold stderr open.
STDERR_JOIN_S: Final = 5.0
#: Longest stdout line kept for the "last event" column.
MAX_EVENT_TEXT: Final = 200

ReadyFn = Callable[[str, dict[str, Any] | None], dict[str, Any] | None]


class LaunchError(OptogateError):
    """A process could not be started, or did not become ready in time."""


@dataclass(frozen=True)
class ProcessSpec:
    """How to run one process.

    ``ready(line, parsed)`` is called for every stdout line (``parsed`` is the
    line as a JSON object, or None) and returns the process's info once it is
    ready, else None.  ``power_exit`` is the exit status that means "my own
    power failed" (None when the process has no power supply of its own).
    """

    name: str
    argv: Sequence[str]
    ready: ReadyFn
    ready_timeout: float = 30.0
    power_exit: int | None = None
    cwd: Path | None = None
    stop_grace: float = DEFAULT_GRACE


@dataclass
class Managed:
    """A supervised process and what is known about it (read by the live display)."""

    spec: ProcessSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    err_path: Path
    state: str = "starting"
    info: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    last_event: str = ""
    events: int = 0
    exit_code: int | None = None
    restarts: int = 0
    ready_event: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    err_reader: threading.Thread | None = None
    stopping: bool = False
    unpowered: bool = False
    killed: bool = False  # asked to stop, it outlived its grace and was killed

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Return True while the process has not exited."""
        return self.proc.poll() is None


@dataclass(frozen=True)
class Death:
    """A process that exited when nobody asked it to."""

    name: str
    exit_code: int
    stderr_tail: str
    at: float


def json_object(line: str) -> dict[str, Any] | None:
    """Return ``line`` parsed as a JSON object, or None if it is not one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def first_json_line(*keys: str) -> ReadyFn:
    """Return a ready function for the simulators: the first JSON object with ``keys``."""

    def ready(line: str, parsed: dict[str, Any] | None) -> dict[str, Any] | None:
        del line
        if parsed is not None and all(k in parsed for k in keys):
            return parsed
        return None

    return ready


def log_event(name: str) -> ReadyFn:
    """Return a ready function for the daemons: the first log line whose event is ``name``."""

    def ready(line: str, parsed: dict[str, Any] | None) -> dict[str, Any] | None:
        del line
        if parsed is not None and parsed.get("event") == name:
            return parsed
        return None

    return ready


def tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file ("" if unreadable)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Start, watch and stop the appliance's processes; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        *,
        on_change: Callable[[Managed], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, Managed] = {}
        self.order: list[str] = []
        self.deaths: list[Death] = []
        self._on_change = on_change or (lambda m: None)
        self._lock = threading.Lock()
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    # -- starting ------------------------------------------------------------------------------

    def start(self, spec: ProcessSpec) -> Managed:
        """Start ``spec`` and wait until it is ready; return it.

        Raises LaunchError (with the exit status and stderr tail) if it exits
        or stays silent past ``spec.ready_timeout``; the process is stopped then.
        """
        if spec.name in self.processes and self.processes[spec.name].alive():
            raise LaunchError(f"{spec.name} is already running")
        managed = self._spawn(spec)
        restarts = self.processes[spec.name].restarts + 1 if spec.name in self.processes else 0
        managed.restarts = restarts
        with self._lock:
            self.processes[spec.name] = managed
            if spec.name not in self.order:
                self.order.append(spec.name)
        self._on_change(managed)
        deadline = time.monotonic() + spec.ready_timeout
        while not managed.ready_event.wait(0.05):
            if not managed.alive() and not (managed.reader and managed.reader.is_alive()):
                break
            if time.monotonic() > deadline:
                self.stop(spec.name)
                raise LaunchError(
                    f"{spec.name} did not become ready within {spec.ready_timeout:g} s; "
                    f"its log: {managed.log_path}\n{tail(managed.err_path)}"
                )
        if not managed.ready_event.is_set():
            code = managed.proc.wait()
            raise LaunchError(
                f"{spec.name} exited with status {code} before it was ready; "
                f"its log: {managed.log_path}\n{tail(managed.err_path)}"
            )
        return managed

    def restart(self, name: str) -> Managed:
        """Start ``name`` again with its spec (it must have exited); return it."""
        old = self.processes[name]
        if old.alive():
            raise LaunchError(f"{name} is still running")
        return self.start(old.spec)

    def _spawn(self, spec: ProcessSpec) -> Managed:
        log_path = self.log_dir / f"{spec.name}.log"
        err_path = self.log_dir / f"{spec.name}.err"
        try:
            proc = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=spec.cwd,
                env=self._env,
                start_new_session=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot start {spec.name}: {e}") from e
        managed = Managed(spec, proc, log_path, err_path)
        # stderr first: the stdout reader joins it before it reports an exit,
        # so a death's report carries the whole of its stderr.
        managed.err_reader = threading.Thread(
            target=self._read_stderr, args=(managed,), name=f"launcher-{spec.name}-err", daemon=True
        )
        managed.err_reader.start()
        reader = threading.Thread(
            target=self._read, args=(managed,), name=f"launcher-{spec.name}", daemon=True
        )
        managed.reader = reader
        reader.start()
        return managed

    # -- watching ------------------------------------------------------------------------------

    def _read(self, managed: Managed) -> None:
        stream = managed.proc.stdout
        assert stream is not None
        with managed.log_path.open("ab") as log:
            self._copy(managed, stream, log)
        stream.close()
        code = managed.proc.wait()
        if managed.err_reader is not None:
            managed.err_reader.join(STDERR_JOIN_S)
        managed.exit_code = code
        if managed.stopping:
            managed.state = "stopped"
        elif managed.unpowered or (
            managed.spec.power_exit is not None and code == managed.spec.power_exit
        ):
            managed.state = "powered off"
        else:
            managed.state = "died"
            with self._lock:
                self.deaths.append(
                    Death(managed.spec.name, code, tail(managed.err_path), time.time())
                )
        self._on_change(managed)

    def _read_stderr(self, managed: Managed) -> None:
        stream = managed.proc.stderr
        assert stream is not None
        with managed.err_path.open("ab") as log:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                _note_event(managed, json_object(raw.decode("utf-8", "replace")))
        stream.close()

    def _copy(self, managed: Managed, stream: IO[bytes], log: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            parsed = json_object(line)
            _note_event(managed, parsed)
            if not managed.ready_event.is_set():
                info = managed.spec.ready(line, parsed)
                if info is not None:
                    managed.info = info
                    managed.state = "running"
                    managed.ready_event.set()
                    self._on_change(managed)

    def wait_exit(self, name: str, timeout: float) -> int:
        """Wait until ``name`` has exited and its exit is recorded; return its status.

        Raises LaunchError if it is still running after ``timeout`` seconds.
        """
        managed = self.processes[name]
        deadline = time.monotonic() + timeout
        while managed.alive() or (managed.reader is not None and managed.reader.is_alive()):
            if time.monotonic() > deadline:
                raise LaunchError(f"{name} still running after {timeout:g} s")
            time.sleep(0.05)
        assert managed.exit_code is not None
        return managed.exit_code

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, name: str, grace: float | None = None) -> int | None:
        """Stop ``name`` (SIGTERM, then SIGKILL after ``grace``, by default its spec's
        ``stop_grace``); return its exit status."""
        managed = self.processes[name]
        grace = managed.spec.stop_grace if grace is None else grace
        managed.stopping = True
        pgid = managed.pid
        if managed.alive():
            _signal_group(pgid, signal.SIGTERM)
            try:
                managed.proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {grace:g} s: killing it", file=sys.stderr)
                managed.killed = True
                _signal_group(pgid, signal.SIGKILL)
                managed.proc.wait()
        # Whatever the process left in its group (workers) goes with it.
        _signal_group(pgid, signal.SIGKILL)
        if managed.reader is not None:
            managed.reader.join(5.0)
        return managed.proc.returncode

    def kill(self, name: str) -> None:
        """SIGKILL ``name``'s whole group at once (a fault to inject); it counts as a death."""
        _signal_group(self.processes[name].pid, signal.SIGKILL)

    def power_off(self, name: str) -> None:
        """Cut ``name``'s supply with no warning: SIGKILL its whole group at once.

        Nothing it has not yet written reaches the disk, as on a Pi whose
        plug is pulled; the exit is recorded as ``powered off``, not a death.
        """
        managed = self.processes[name]
        if managed.spec.power_exit is None:
            raise LaunchError(f"{name} has no power supply of its own")
        managed.unpowered = True
        _signal_group(managed.pid, signal.SIGKILL)

    def stop_all(self, grace: float | None = None) -> None:
        """Stop every process in reverse start order."""
        for name in reversed(self.order):
            self.stop(name, grace)


def _note_event(managed: Managed, parsed: dict[str, Any] | None) -> None:
    """Keep a structured log line as the process's last event (for the live display)."""
    if parsed is None or "event" not in parsed:
        return
    managed.events += 1
    extra = {k: v for k, v in parsed.items() if k not in ("ts", "event")}
    text = f"{parsed['event']} {json.dumps(extra, default=str)}" if extra else ""
    managed.last_event = (text or str(parsed["event"]))[:MAX_EVENT_TEXT]


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
