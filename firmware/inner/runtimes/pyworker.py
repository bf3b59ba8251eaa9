"""The Python worker program and the wire format it speaks with the daemon.

A worker is one process that runs one service's algorithm over and over.  The
daemon (:mod:`firmware.inner.runtimes.python`) starts it as
``python -I -B pyworker.py FD`` where FD is one end of a ``socketpair``; every
other descriptor is closed.  This file imports nothing but the standard
library, so it runs under any Python 3.11+ with nothing installed, and so that
nothing of the project runs inside the sandbox.  The daemon imports the same
file for the codec, so both ends share one definition.

Wire format
-----------
Both directions carry *messages* on a stream socket, each one frame::

    u32 header_len | u32 data_len | header (UTF-8 JSON object) | data (raw bytes)

(lengths big-endian).  The header is compact JSON without NaN or Infinity;
``data`` is the binary section, carried as is: the input of a call, the output
of a reply, otherwise empty.  JSON, not CBOR, because the contract says
parameters and results are JSON-able, so encoding them *is* the validation,
and because decoding JSON from a worker we do not trust cannot build anything
but dicts, lists, strings and numbers.  A receiver knows the largest frame it
accepts and refuses a larger announced length before reading the body.

Every header has ``"t"`` (its type).  The conversation::

    daemon -> worker  {"t": "init", "service_dir", "entry", "memory_mb", "uid", "gid",
                       "isolate_network", "max_result_bytes", "max_message_chars",
                       "parent_pid"}
    worker -> daemon  {"t": "ready", "pid", "uid", "netns", "stdlib_readable"}
                    | {"t": "load_failed", "detail"}            (then the worker exits)
    then calls, each answered in the order they came:
    daemon -> worker  {"t": "call", "id", "params", "timeout_s"}     + data = input
    worker -> daemon  {"t": "ok", "id", "result", "run_us"}         + data = output
                    | {"t": "error", "id", "message", "run_us"}   the algorithm raised ValueError
                    | {"t": "crash", "id", "kind", "detail"}
                                       kind: "exception" | "memory" | "bad_result"
                    | {"t": "too_large", "id", "size", "run_us"}

The daemon may send several calls in one write (a *batch*, when the service's
calls are short and calls are queued): the worker runs them one after the
other and sends each reply as soon as it has it, so the daemon always knows
which call is running (the oldest unanswered one).  ``run_us`` is how long
the algorithm ran, in microseconds: the daemon batches only services whose
calls are short.  After a ``crash`` reply the worker runs nothing more and
exits; calls it had received but not started are the daemon's to run
elsewhere.

``detail`` is for the operator's log only (a traceback); ``message`` is for the
caller.  The daemon ends a worker by closing its end (the worker exits at end
of file) or by SIGKILL to its process group.  Another runtime can reuse the
format unchanged: a worker that speaks it plugs in beside this one.

Confinement, in the order it is applied (the worker starts as the daemon's
user, possibly root, and applies everything before importing the bundle):

1. umask 077; SIGXFSZ ignored so a write past RLIMIT_FSIZE fails with EFBIG
   instead of killing the worker; RLIMIT_CORE 0, RLIMIT_FSIZE 0,
   RLIMIT_NOFILE small.
2. If root and asked: a new, empty network namespace (``unshare(CLONE_NEWNET)``,
   through ``os.unshare`` on 3.12+, otherwise libc).  Best effort: a container
   without CAP_SYS_ADMIN refuses it, and ``ready`` says whether it happened.
3. If root: supplementary groups cleared, setgid, setuid to the configured
   user, and a check that root cannot be regained.  The process also becomes
   non-dumpable, so other workers running as the same user cannot ptrace it.
4. ``PR_SET_NO_NEW_PRIVS`` (no set-uid escalation through exec) and
   ``PR_SET_PDEATHSIG`` = SIGKILL (the worker dies with the daemon; precisely,
   with the daemon thread that started it, the event loop's), then a check
   that the parent is still the daemon.
5. RLIMIT_AS = the manifest's memory limit; per call, RLIMIT_CPU's soft limit
   = CPU used so far + the call's timeout + a grace: a backstop should the
   daemon fail to kill a runaway call (the daemon's wall-clock timeout is the
   real limit; SIGXCPU is reported as a timeout).
6. The bundle is imported from ``service_dir`` (first on ``sys.path``) and the
   entry resolved; then ``ready`` is sent.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

# --------------------------------------------------------------------------- codec

PREFIX = struct.Struct(">II")

# Cap on a frame the worker accepts from the daemon.  The daemon is trusted and
# the LAN API bounds request bodies; this only stops a corrupt length from
# making the worker allocate without bound (RLIMIT_AS would stop it anyway).
MAX_INBOUND_FRAME = 1 << 30

# Room for the header fields around a result or an error message, so that a
# result of exactly max_result_bytes still fits in a frame.
ENVELOPE_BYTES = 64 * 1024

# Operator-facing tracebacks are cut to this many characters: enough for a
# deep stack, not enough to flood the log.  Even if every character needed a
# six-byte JSON escape, a detail fits in ENVELOPE_BYTES.
MAX_DETAIL_CHARS = 8 * 1024

# Bytes read from the socket per recv: large enough that a few MB of input
# arrive in tens of calls, small enough to stay out of the memory limit.
RECV_CHUNK = 256 * 1024


class FrameError(ValueError):
    """A frame is malformed or larger than the receiver accepts."""


class FrameTooLarge(FrameError):
    """A frame announced more bytes than the receiver accepts."""


Message = tuple[dict[str, Any], bytes]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.dumps and json.loads with options build an encoder or a
# decoder on every call, which costs more than coding a small header.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def encode_json(obj: Any) -> bytes:
    """Return ``obj`` as compact UTF-8 JSON.

    Raises TypeError or ValueError if ``obj`` is not JSON-able (NaN included).
    """
    return _ENCODER.encode(obj).encode()


def encode_frame(header: bytes, data: bytes = b"") -> tuple[bytes, bytes]:
    """Return the frame for an encoded header and its binary section, as two buffers.

    The binary section is returned apart so a sender can write it without a copy.
    """
    return PREFIX.pack(len(header), len(data)) + header, data


def encode_message(header: dict[str, Any], data: bytes = b"") -> tuple[bytes, bytes]:
    """Return the frame for a header dict (see :func:`encode_frame`).

    Raises TypeError or ValueError if the header is not JSON-able.
    """
    return encode_frame(encode_json(header), data)


class FrameDecoder:
    """Turn a byte stream into messages; pure, no I/O.

    Feed bytes with :meth:`receive_bytes`, take messages with
    :meth:`next_message`.  A frame whose announced size exceeds ``max_frame``
    raises :class:`FrameError` as soon as its prefix is seen, before the body is
    buffered; so does a header that is not a JSON object.
    """

    def __init__(self, max_frame: int) -> None:
        self._max_frame = max_frame
        self._buf = bytearray()
        self._need: tuple[int, int] | None = None

    @property
    def buffered(self) -> int:
        """Return the number of bytes received but not yet consumed."""
        return len(self._buf)

    def receive_bytes(self, data: bytes) -> None:
        """Append received bytes; raise FrameError if a frame is announced too large."""
        self._buf += data
        self._check_prefix()

    def _check_prefix(self) -> None:
        if self._need is None and len(self._buf) >= PREFIX.size:
            header_len, data_len = PREFIX.unpack_from(self._buf)
            if header_len + data_len > self._max_frame:
                raise FrameTooLarge(
                    f"frame of {header_len + data_len} bytes exceeds {self._max_frame}"
                )
            self._need = (header_len, data_len)

    def next_message(self) -> Message | None:
        """Return the next complete message, or None if more bytes are needed.

        Raises FrameError if the header is not a UTF-8 JSON object.
        """
        if self._need is None:
            return None
        header_len, data_len = self._need
        end = PREFIX.size + header_len + data_len
        if len(self._buf) < end:
            return None
        raw_header = bytes(self._buf[PREFIX.size : PREFIX.size + header_len])
        data = bytes(self._buf[PREFIX.size + header_len : end])
        del self._buf[:end]
        self._need = None
        self._check_prefix()
        try:
            header = _DECODER.decode(raw_header.decode())
        except (ValueError, RecursionError) as e:
            raise FrameError(f"header is not JSON: {e}") from None
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise FrameError("header is not an object with a type")
        return header, data


# --------------------------------------------------------------------------- worker

# Descriptors the algorithm may hold open at once.  Python needs a few for
# imports; an algorithm reading its own data files needs a few more.
MAX_OPEN_FILES = 64

# Bytes the algorithm may write to a regular file: none.  Its only output is
# the reply; the working directory is empty and read-only anyway.
MAX_FILE_BYTES = 0

# CPU seconds granted beyond the call's wall-clock timeout before SIGXCPU: the
# daemon kills at the timeout, so this only fires if the daemon did not.
CPU_BACKSTOP_GRACE_S = 2

# Linux constants not exposed by the os module on 3.11.
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

EXIT_PROTOCOL = 2
EXIT_LOAD_FAILED = 3
EXIT_AFTER_CRASH = 4

# How every crash reply's header starts (see _crash).
CRASH_PREFIX = b'{"t":"crash"'


class _Channel:
    """Blocking message I/O on the worker's end of the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = FrameDecoder(MAX_INBOUND_FRAME)

    def receive(self) -> Message | None:
        """Return the next message, or None at end of file."""
        while True:
            message = self._decoder.next_message()
            if message is not None:
                return message
            chunk = self._sock.recv(RECV_CHUNK)
            if not chunk:
                return None
            self._decoder.receive_bytes(chunk)

    def send(self, head: bytes, data: bytes = b"") -> None:
        # One frame, one system call where the socket takes it all: a call's
        # round trip is a few syscalls, so each one counts.
        sent = self._sock.sendmsg([head, data]) if data else self._sock.send(head)
        if sent < len(head) + len(data):
            self._sock.sendall((head + data)[sent:])


def _libc_call(name: str, *args: int) -> None:
    # ctypes is imported at start-up, before privileges are dropped: the
    # interpreter's library may not be readable by the unprivileged user.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _isolate_network() -> bool:
    """Move into a new network namespace; return whether that happened."""
    try:
        unshare = getattr(os, "unshare", None)
        if unshare is not None:  # Python 3.12+
            unshare(CLONE_NEWNET)
        else:
            _libc_call("unshare", CLONE_NEWNET)
    except (OSError, AttributeError):
        return False
    return True


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise OSError("could not drop privileges")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("root could be regained after dropping privileges")


def _set_limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _confine(init: dict[str, Any]) -> dict[str, Any]:
    """Apply the sandbox described in the module docstring; return facts for ``ready``."""
    import ctypes  # noqa: F401  (loaded now, used by _libc_call after the drop)

    os.umask(0o077)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_FSIZE, MAX_FILE_BYTES)
    _set_limit(resource.RLIMIT_NOFILE, MAX_OPEN_FILES)
    is_root = os.geteuid() == 0
    netns = bool(init["isolate_network"]) and is_root and _isolate_network()
    if is_root and init["uid"] is not None:
        _drop_privileges(int(init["uid"]), int(init["gid"]))
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != init["parent_pid"]:
        raise OSError("the daemon exited during start-up")
    memory = int(init["memory_mb"]) * 1024 * 1024
    _set_limit(resource.RLIMIT_AS, memory)
    stdlib = os.path.dirname(os.__file__)
    return {
        "netns": netns,
        "uid": os.getuid(),
        "stdlib_readable": os.access(stdlib, os.R_OK | os.X_OK),
    }


def _load(service_dir: str, entry: str) -> Callable[..., Any]:
    """Import the bundle and return its entry function."""
    import importlib

    module_name, _, function_name = entry.partition(":")
    sys.path.insert(0, service_dir)
    module = importlib.import_module(module_name)
    function = getattr(module, function_name)
    if not callable(function):
        raise TypeError(f"{entry} is not callable")
    return function  # type: ignore[no-any-return]


def _arm_cpu_backstop(timeout_s: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    soft = int(used + timeout_s) + 1 + CPU_BACKSTOP_GRACE_S
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _micros_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1_000_000)


def _crash(call_id: int, kind: str, detail: str) -> tuple[bytes, bytes]:
    header = {"t": "crash", "id": call_id, "kind": kind, "detail": _cap(detail, MAX_DETAIL_CHARS)}
    return encode_message(header)


def run_call(
    function: Callable[..., Any],
    call_id: int,
    params: Any,
    data: bytes,
    max_result_bytes: int,
    max_message_chars: int,
) -> tuple[bytes, bytes]:
    """Run the algorithm once; return the encoded reply frame (head, data).

    Never raises for anything the algorithm does: every outcome is a reply.
    """
    started = time.perf_counter()
    try:
        try:
            returned = function(params, data)
        except ValueError as e:
            message = _cap(str(e) or type(e).__name__, max_message_chars)
            run_us = _micros_since(started)
            reply = {"t": "error", "id": call_id, "message": message, "run_us": run_us}
            return encode_message(reply)
        run_us = _micros_since(started)
        if isinstance(returned, dict):
            result, output = returned, b""
        elif (
            isinstance(returned, tuple)
            and len(returned) == 2
            and isinstance(returned[0], dict)
            and isinstance(returned[1], (bytes, bytearray, memoryview))
        ):
            result, output = returned[0], bytes(returned[1])
        else:
            kind = type(returned).__name__
            return _crash(
                call_id, "bad_result", f"run() returned {kind}, not dict or (dict, bytes)"
            )
        del returned
        try:
            result_json = encode_json(result)
        except (TypeError, ValueError, RecursionError) as e:
            return _crash(call_id, "bad_result", f"result is not JSON-able: {e}")
        size = len(result_json) + len(output)
        if size > max_result_bytes:
            reply = {"t": "too_large", "id": call_id, "size": size, "run_us": run_us}
            return encode_message(reply)
        head = b'{"t":"ok","id":%d,"run_us":%d,"result":%s}' % (call_id, run_us, result_json)
        return encode_frame(head, output)
    except MemoryError:
        # Leaving the except clause above dropped the traceback, and with it the
        # frames holding what the algorithm allocated, so this reply fits.
        pass
    except BaseException:  # SystemExit and KeyboardInterrupt are crashes too
        return _crash(call_id, "exception", traceback.format_exc())
    return _crash(call_id, "memory", "MemoryError")


def serve(sock: socket.socket) -> int:
    """Run the worker on a connected socket; return the process exit status."""
    channel = _Channel(sock)
    first = channel.receive()
    if first is None or first[0]["t"] != "init":
        return EXIT_PROTOCOL
    init = first[0]
    try:
        facts = _confine(init)
        function = _load(str(init["service_dir"]), str(init["entry"]))
    except BaseException:
        detail = _cap(traceback.format_exc(), MAX_DETAIL_CHARS)
        channel.send(*encode_message({"t": "load_failed", "detail": detail}))
        return EXIT_LOAD_FAILED
    channel.send(*encode_message({"t": "ready", "pid": os.getpid(), **facts}))
    max_result_bytes = int(init["max_result_bytes"])
    max_message_chars = int(init["max_message_chars"])
    while True:
        message = channel.receive()
        if message is None:
            return 0
        header, data = message
        if header["t"] != "call":
            return EXIT_PROTOCOL
        _arm_cpu_backstop(float(header["timeout_s"]))
        reply = run_call(
            function, int(header["id"]), header["params"], data, max_result_bytes, max_message_chars
        )
        del data, message
        channel.send(*reply)
        if reply[0].startswith(CRASH_PREFIX, PREFIX.size):
            # The daemon replaces a worker that crashed: run none of the calls
            # that may already be buffered (the daemon runs them elsewhere).
            return EXIT_AFTER_CRASH


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``pyworker.py FD``; return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: pyworker.py FD", file=sys.stderr)
        return EXIT_PROTOCOL
    sock = socket.socket(fileno=int(args[0]))
    try:
        return serve(sock)
    except (OSError, FrameError) as e:
        print(f"worker: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_PROTOCOL
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
