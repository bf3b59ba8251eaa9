"""Run the board's Python under real MicroPython on the host (its WebAssembly port).

The isolator's filter core must behave identically under CPython (the
simulator, the unit tests) and under MicroPython (the RP2040 board).  A board
is not always at hand, but MicroPython's WebAssembly port is: the npm package
``@micropython/micropython-webassembly-pyscript``, installed by
``make isolator-node`` into firmware/isolator/node/, run by Node.js.

:class:`MicroPythonServer` starts ``node mpyserve.mjs`` once, loads the given
modules into the interpreter's /lib, and then answers :meth:`call` with
``module.function(line)`` for one text line at a time, so hundreds of calls
share one interpreter start.  Every read has a deadline; :meth:`close` ends
the process and waits for it.
"""

import contextlib
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from firmware.isolator.errors import IsolatorError

NODE_DIR = Path(__file__).with_name("node")
SERVER_SCRIPT = NODE_DIR / "mpyserve.mjs"
PACKAGE_DIR = NODE_DIR / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"

#: Loading the interpreter takes ~0.1 s; a vector a few ms.  30 s covers a
#: heavily loaded test machine without letting a hung interpreter stall a run.
DEFAULT_TIMEOUT_S = 30.0
#: Read size for the answer pipe.
_READ_CHUNK = 65536


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Close the process's input, wait for it (killing it after ``timeout``), close its pipes."""
    if proc.stdin is not None and not proc.stdin.closed:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class MicroPythonUnavailable(IsolatorError):
    """Node.js or the MicroPython WebAssembly package is not installed."""


class MicroPythonCallError(IsolatorError):
    """The MicroPython side raised, answered late, or died."""


def missing() -> str | None:
    """Return why MicroPython cannot run here (what to install), or None when it can."""
    if shutil.which("node") is None:
        return "Node.js is missing: install the nodejs package (make sysdeps)"
    if not (PACKAGE_DIR / "micropython.mjs").exists():
        return "the MicroPython WebAssembly package is missing: run make isolator-node"
    return None


class MicroPythonServer:
    """One MicroPython interpreter serving ``module.function(line) -> str`` calls."""

    def __init__(
        self,
        module: str,
        function: str,
        files: list[Path],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        why = missing()
        if why is not None:
            raise MicroPythonUnavailable(why)
        self._timeout = timeout
        self._buf = b""
        self._proc = subprocess.Popen(
            ["node", str(SERVER_SCRIPT), module, function, *(str(f) for f in files)],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def call(self, line: str) -> str:
        """Return ``module.function(line)`` computed by MicroPython.

        Raises MicroPythonCallError when the Python code raised, or the
        interpreter died or did not answer within the timeout.
        """
        if "\n" in line:
            raise ValueError("a call is one line")
        proc = self._proc
        assert proc.stdin is not None
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError as e:
            raise MicroPythonCallError(f"interpreter exited: {self._stderr()}") from e
        answer = self._readline().decode()
        if answer.startswith("!error "):
            raise MicroPythonCallError(answer[len("!error ") :])
        return answer

    def _readline(self) -> bytes:
        proc = self._proc
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self._timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MicroPythonCallError(f"no answer within {self._timeout} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                raise MicroPythonCallError(f"interpreter exited: {self._stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _stderr(self) -> str:
        proc = self._proc
        try:
            proc.wait(timeout=self._timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        return proc.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        """End the interpreter (closing its input) and wait for the process."""
        _stop(self._proc, self._timeout)

    def __enter__(self) -> "MicroPythonServer":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


VIRTUAL_BOARD_SCRIPT = NODE_DIR / "virtualboard.mjs"
VIRTUAL_DIR = Path(__file__).with_name("virtual")
#: What the virtual board preloads: its ``machine`` and ``_thread`` and their fakes.
VIRTUAL_FILES = (
    VIRTUAL_DIR / "machine.py",
    VIRTUAL_DIR / "_thread.py",
    Path(__file__).with_name("fakeboard.py"),
)


class VirtualBoard:
    """A MicroPython console on a local TCP port that mpremote can flash and query.

    ``url`` (``socket://127.0.0.1:PORT``) goes where a serial device would.
    The board runs MicroPython's WebAssembly port with virtual hardware
    (firmware/isolator/virtual/); see node/virtualboard.mjs for what it does
    not model.  :meth:`close` ends the process and waits for it.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        why = missing()
        if why is not None:
            raise MicroPythonUnavailable(why)
        self._proc = subprocess.Popen(
            ["node", str(VIRTUAL_BOARD_SCRIPT), *(str(f) for f in VIRTUAL_FILES)],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            self.url = f"socket://127.0.0.1:{self._read_port(timeout)}"
        except BaseException:
            self.close()
            raise

    def _read_port(self, timeout: float) -> int:
        proc = self._proc
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MicroPythonCallError("the virtual board did not start listening")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    raise MicroPythonCallError("the virtual board exited at start")
                buf += chunk
        word, _, port = buf.partition(b"\n")[0].decode().partition(" ")
        if word != "listening" or not port.isdigit():
            raise MicroPythonCallError(f"unexpected start line {buf!r}")
        return int(port)

    def close(self) -> None:
        """Stop the board (closing its input) and wait for the process."""
        _stop(self._proc, DEFAULT_TIMEOUT_S)

    def __enter__(self) -> "VirtualBoard":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
