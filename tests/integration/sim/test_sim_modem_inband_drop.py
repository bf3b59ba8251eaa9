"""``optogate sim modem --no-carrier-after N`` as a process: how a drop looks on the pty.

The dialler tells a real NO CARRIER from framed data that contains the text by
what follows it: a modem that dropped carrier sends nothing of its own, and in
command state it echoes what the DTE types (so the dialler holds its writes
while it confirms).  A ``+++`` typed in command state is echoed, not answered;
ATH0 is.  These tests pin that behaviour of the emulator process.
"""

from __future__ import annotations

import json
import select
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import serial
from modem_dte import exchange

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

NO_CARRIER = b"\r\nNO CARRIER\r\n"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server for the phone book; its threads end with each call."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, name="echo server")
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads
        thread.join(5)


@pytest.fixture
def modem(echo_port: int) -> Iterator[str]:
    """The emulator process, dropping each call after 40 data bytes; yields its pty."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "host_tools.cli",
            "sim",
            "modem",
            "--phonebook",
            f"5551234=127.0.0.1:{echo_port}",
            "--dial-delay",
            "0.1",
            "--no-carrier-after",
            "40",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the emulator printed nothing"
        path = json.loads(proc.stdout.readline())["port"]
        assert isinstance(path, str)
        yield path
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_drop_is_no_carrier_then_only_the_echo_of_what_we_type(modem: str) -> None:
    with serial.Serial(modem, 115200, timeout=0.1, exclusive=True) as port:
        assert exchange(port, b"ATS12=10\r", b"OK\r\n").endswith(b"\r\nOK\r\n")
        exchange(port, b"ATD5551234\r", b"\r\nCONNECT 33600\r\n")
        frame = b"\x00" + b"x" * 60 + b"\x00"
        got = exchange(port, frame, NO_CARRIER)
        data = got[: -len(NO_CARRIER)]
        assert frame.startswith(data)  # what came back before the line went
        assert len(data) < 40  # the 40 bytes count both ways
        # after NO CARRIER, nothing of the modem's own: the next bytes are the
        # echo of what we type now, as the dialler expects
        ours = b"\x00\x03ab\x00"
        assert exchange(port, ours, ours) == ours
        # +++ in command state is only typed characters; ATH0 gets its OK
        assert exchange(port, b"+++ATH0\r", b"OK\r\n") == b"+++ATH0\r\r\nOK\r\n"
