"""The terminal's side of a conversation with the emulated modem, for the sim tests."""

from __future__ import annotations

import time

import serial


def exchange(port: serial.Serial, command: bytes, expect_end: bytes, timeout: float = 5.0) -> bytes:
    """Write ``command``; return everything read until it ends with ``expect_end``."""
    port.write(command)
    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(expect_end):
        assert time.monotonic() < deadline, f"no {expect_end!r} after {command!r}: {got!r}"
        got += port.read(256)
    return got
