"""``optogate sim modem`` as a process: stdout contract, conformance over the pty, SIGTERM."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import serial
from modem_dte import exchange

pytestmark = [pytest.mark.integration]


def read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the emulator printed nothing"
    line = proc.stdout.readline()
    return json.loads(line)  # type: ignore[no-any-return]


@pytest.fixture
def emulator() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, object]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "sim", "modem", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc, read_json_line(proc, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.timeout(30)
def test_contract_conformance_and_sigterm(
    emulator: tuple[subprocess.Popen[bytes], dict[str, object]],
) -> None:
    proc, ready = emulator
    path = ready["port"]
    assert isinstance(path, str)
    assert path.startswith("/dev/pts/")
    assert isinstance(ready["listen"], str)
    with serial.Serial(path, 115200, timeout=0.1, exclusive=True) as port:
        assert exchange(port, b"AT\r", b"OK\r\n") == b"AT\r\r\nOK\r\n"
        # factory register defaults
        for register, value in ((0, b"000"), (2, b"043"), (7, b"050"), (12, b"050")):
            reply = exchange(port, f"ATS{register}?\r".encode(), b"OK\r\n")
            assert reply == f"ATS{register}?\r".encode() + b"\r\n" + value + b"\r\n\r\nOK\r\n"
        # chained commands, echo off, numeric results
        assert exchange(port, b"ATE0V1Q0S0=0&C1&D2\r", b"OK\r\n").endswith(b"\r\nOK\r\n")
        assert exchange(port, b"ATS7=45S7?\r", b"OK\r\n") == b"\r\n045\r\n\r\nOK\r\n"
        assert exchange(port, b"ATV0\r", b"0\r") == b"0\r"
        assert exchange(port, b"ATQ9\r", b"4\r") == b"4\r"
        assert exchange(port, b"ATZ\r", b"OK\r\n").endswith(b"\r\nOK\r\n")  # V1 again
        assert exchange(port, b"ATD\r", b"\r\n", timeout=5).endswith(b"NO ANSWER\r\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.timeout(30)
def test_bad_arguments_exit_2() -> None:
    for args in (["--phonebook", "5551234"], ["--answer"], ["--ber", "3"]):
        result = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", "sim", "modem", *args],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 2, args
        assert result.stdout == b""
        assert b"error" in result.stderr


@pytest.mark.timeout(30)
def test_stdout_is_one_line_only(
    emulator: tuple[subprocess.Popen[bytes], dict[str, object]],
) -> None:
    proc, _ = emulator
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stdout is not None
    assert proc.stdout.read() == b""


@pytest.mark.timeout(30)
def test_listen_address_in_use_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        result = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", "sim", "modem", "--listen", f"{host}:{port}"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"error" in result.stderr
