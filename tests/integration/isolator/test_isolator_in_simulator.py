"""The isolator in the link simulator's process: ``optogate sim link --isolator``.

Real processes over real ptys: the simulator with the isolator on its line,
``optogate link echo`` as the outer module and ``optogate link test`` as the
inner one.  The technician's link test must pass through the isolator, while
a forged command and garbage written on the outer module's side are dropped
and counted (read back over the simulator's control socket).
"""

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.common.link.kinds import Kind
from firmware.isolator import suite
from firmware.isolator.filtercore import A_TO_B, B_TO_A

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

OPTOGATE = str(Path(sys.executable).with_name("optogate"))
BAUD = 1_000_000
START_TIMEOUT = 30.0


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no line within {timeout} s (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                pytest.fail(f"process exited: {buf!r}")
            buf += chunk
    return buf


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def simulator() -> Iterator[dict[str, Any]]:
    proc = subprocess.Popen(
        [OPTOGATE, "sim", "link", "--baud", str(BAUD), "--isolator"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield json.loads(read_line(proc, START_TIMEOUT))
    finally:
        stop(proc)


def middlebox_stats(control: str) -> dict[str, dict[str, int]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(control)
        s.sendall(b'{"cmd": "stats"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    stats: dict[str, dict[str, int]] = json.loads(buf)["stats"]["middlebox"]
    return stats


def test_link_test_passes_and_forgeries_do_not(simulator: dict[str, Any]) -> None:
    echo = subprocess.Popen(
        [OPTOGATE, "link", "echo", "--port", simulator["a"], "--baud", str(BAUD)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # a compromised outer module: a request (a command) and noise
        forged = suite.data_frame(Kind.FETCH_SERVICE, A_TO_B, b"run this") + b"\x00\x07junk\x00"
        fd = os.open(simulator["a"], os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, forged)
        finally:
            os.close(fd)
        cmd = [OPTOGATE, "link", "test", "--port", simulator["b"], "--baud", str(BAUD)]
        test = subprocess.run(
            [*cmd, "--bytes", "65536", "--json", "--wait", "20"],
            capture_output=True,
            timeout=90,
            check=False,
        )
    finally:
        stop(echo)
    report = json.loads(test.stdout.decode().strip().splitlines()[-1])
    assert report["digest_ok"] is True, test.stderr.decode()[-2000:]
    stats = middlebox_stats(simulator["control"])
    assert stats[A_TO_B]["dropped_kind"] >= 1
    assert stats[A_TO_B]["dropped_cobs"] + stats[A_TO_B]["dropped_short"] >= 1
    assert stats[B_TO_A]["frames_out"] > 10  # the test data went inner -> outer
    assert stats[B_TO_A]["bytes_out"] > 65536
