"""Hanging up an answered call leaves the emulator's stderr free of tracebacks.

The hang-up cancels the task serving the incoming TCP call; it must end
quietly, not surface as a cancelled connection callback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tty

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _wait_for(fd: int, word: bytes, seconds: float) -> bool:
    buf = b""
    end = time.monotonic() + seconds
    os.set_blocking(fd, False)
    while time.monotonic() < end and word not in buf:
        try:
            buf += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.05)
    return word in buf


def test_answered_call_hung_up_by_the_modem_side_logs_no_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "sim", "modem", "--answer",
         "--listen", "127.0.0.1:0", "--ring-interval", "0.2", "--answer-delay", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    fd = -1
    caller = None
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        fd = os.open(ready["port"], os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        host, port = ready["listen"].rsplit(":", 1)
        caller = socket.create_connection((host, int(port)))
        assert _wait_for(fd, b"RING", 5)
        os.write(fd, b"ATA\r")
        assert _wait_for(fd, b"CONNECT", 5)
        time.sleep(1.2)  # the escape's guard time (S12 = 1 s)
        os.write(fd, b"+++")
        assert _wait_for(fd, b"OK", 5)
        os.write(fd, b"ATH0\r")
        assert _wait_for(fd, b"OK", 5)
        time.sleep(0.3)
    finally:
        if caller is not None:
            caller.close()
        if fd >= 0:
            os.close(fd)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in err
