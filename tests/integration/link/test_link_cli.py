"""``optogate link echo`` / ``optogate link test`` as real processes.

Over ``optogate sim link`` (paced line, noise, cuts) and over a raw pty pair
with the far end in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from firmware.common.adapters.serial import FdTransport
from firmware.common.link.cli import EchoResponder
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[3]
HAVE_SIM = (REPO / "host_tools" / "sim" / "link.py").exists()
needs_sim = pytest.mark.skipif(not HAVE_SIM, reason="the link simulator is not in this tree yet")

#: Fast enough for short tests, slow enough that the session's pacing and the
#: simulator's line model are what limits the transfer.
BAUD = 460_800
JSON_KEYS = {
    "rtt_ms",
    "bytes",
    "seconds",
    "goodput_Bps",
    "line_rate_Bps",
    "fraction",
    "digest_ok",
    "counters",
}


def optogate(*args: str) -> list[str]:
    return [sys.executable, "-m", "host_tools.cli", *args]


def read_line(stream: Any, timeout: float) -> bytes:
    """One line from a pipe, or what arrived before ``timeout``."""
    fd = stream.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if need be; return the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


@dataclass
class Line:
    """A running simulator with an echo end on side a."""

    sim: subprocess.Popen[bytes]
    echo: subprocess.Popen[bytes]
    a: str
    b: str
    control: str
    echo_log: Path

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.control)
            sock.sendall(json.dumps(cmd).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                assert chunk, "control socket closed"
                reply += chunk
        answer: dict[str, Any] = json.loads(reply)
        assert answer["ok"], answer
        return answer

    def wait_delivered(self, direction: str, nbytes: int, timeout: float = 30) -> None:
        """Wait until the simulator has delivered ``nbytes`` in ``direction``."""
        deadline = time.monotonic() + timeout
        while self.command({"cmd": "stats"})["stats"][direction]["bytes_delivered"] < nbytes:
            assert time.monotonic() < deadline, f"fewer than {nbytes} bytes {direction}"
            time.sleep(0.05)

    def run_test(self, *extra: str, timeout: float = 60) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            optogate("link", "test", "--port", self.b, "--baud", str(BAUD), "--json", *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def line(tmp_path: Path) -> Iterator[Line]:
    sim = subprocess.Popen(
        optogate("sim", "link", "--baud", str(BAUD), "--seed", "7"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    echo = None
    try:
        first = read_line(sim.stdout, 15)
        assert first, "the simulator printed no JSON line"
        info = json.loads(first)
        log = tmp_path / "echo.log"
        with log.open("wb") as err:
            echo = subprocess.Popen(
                optogate("link", "echo", "--port", info["a"], "--baud", str(BAUD), "-v"),
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        yield Line(sim, echo, info["a"], info["b"], info["control"], log)
    finally:
        if echo is not None:
            assert stop(echo) == 0, (tmp_path / "echo.log").read_text()[-2000:]
        stop(sim)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, dict[str, Any], str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        pytest.fail("optogate link test did not finish in time")
    lines = out.decode().splitlines()
    assert len(lines) == 1, out.decode()  # exactly one JSON object
    return proc.returncode, json.loads(lines[0]), err.decode()


@needs_sim
@pytest.mark.timeout(60)
def test_link_test_over_the_simulator(line: Line) -> None:
    code, result, err = finish(line.run_test("--bytes", "200000", "--seed", "3"), 50)
    assert code == 0, err
    assert set(result) == JSON_KEYS
    assert result["digest_ok"] is True
    assert result["bytes"] == 200_000
    assert result["line_rate_Bps"] == BAUD / 10
    assert result["rtt_ms"] > 0
    assert 0 < result["fraction"] <= 1.0  # never faster than the line itself
    assert result["goodput_Bps"] == pytest.approx(result["bytes"] / result["seconds"], rel=0.01)
    assert result["counters"]["sessions_down"] == 0


@needs_sim
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_link_test_through_noise(line: Line) -> None:
    line.command({"cmd": "set", "ber": 1e-5})
    code, result, err = finish(line.run_test("--bytes", "300000"), 80)
    assert code == 0, err
    assert result["digest_ok"] is True
    counters = result["counters"]
    # ~3 million bits at 1e-5: dozens of corrupted frames, all repaired.
    assert counters["retransmits"] > 0


@needs_sim
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_short_cut_is_repaired_by_retransmission(line: Line) -> None:
    proc = line.run_test("--bytes", "400000", "--echoes", "1")
    line.wait_delivered("b->a", 100_000)  # the transfer (~9 s at this rate) is under way
    line.command({"cmd": "cut"})
    time.sleep(1.0)  # shorter than the session's dead_after (4 s)
    line.command({"cmd": "restore"})
    code, result, err = finish(proc, 80)
    assert code == 0, err
    assert result["digest_ok"] is True
    assert result["counters"]["timeouts"] > 0  # the cut was noticed and repaired
    assert result["counters"]["sessions_down"] == 0


@needs_sim
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_long_cut_fails_the_test_with_link_down(line: Line) -> None:
    proc = line.run_test("--bytes", "2000000", "--echoes", "1")
    line.wait_delivered("b->a", 100_000)
    line.command({"cmd": "cut"})
    code, result, _ = finish(proc, 60)
    line.command({"cmd": "restore"})
    assert code == 1
    assert set(result) == JSON_KEYS | {"error"}
    assert result["digest_ok"] is False
    assert "LinkDown" in result["error"]
    assert result["counters"]["sessions_down"] == 1


@needs_sim
@pytest.mark.timeout(60)
def test_echo_end_survives_successive_tests(line: Line) -> None:
    for seed in ("1", "2"):
        code, result, err = finish(line.run_test("--bytes", "30000", "--seed", seed), 40)
        assert code == 0, err
        assert result["digest_ok"] is True


@pytest.mark.timeout(60)
async def test_link_test_process_over_a_raw_pty_pair(tmp_path: Path) -> None:
    """``optogate link test`` in a child process; the echo end in this process."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    server = Link(FdTransport(master, "pty-master"), SessionConfig(Role.SERVER, baud=BAUD))
    serving = asyncio.create_task(server.serve(EchoResponder()))
    proc = await asyncio.create_subprocess_exec(
        *optogate("link", "test", "--port", path, "--baud", str(BAUD), "--bytes", "150000"),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 50)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        # We hold the slave open throughout, so the master never hangs up.
        await server.aclose()
        os.close(slave)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert set(result) == JSON_KEYS
    assert result["digest_ok"] is True
    assert result["bytes"] == 150_000


@pytest.mark.timeout(30)
def test_link_test_without_a_port_fails_cleanly() -> None:
    proc = subprocess.run(
        optogate("link", "test", "--port", "/dev/nonexistent-optogate", "--baud", "9600", "--json"),
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["digest_ok"] is False
    assert "cannot open" in result["error"]


@pytest.mark.timeout(30)
def test_link_usage_errors() -> None:
    proc = subprocess.run(
        optogate("link", "test", "--port", "/dev/null"),
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 2  # --baud is required
    assert b"--baud" in proc.stderr
