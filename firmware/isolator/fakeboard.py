"""In-process fakes of the ``machine`` objects the pump drives (MicroPython and CPython).

:class:`FakeUart` holds bytes "received" by the board until :meth:`read`,
and records what is written, accepting at most ``write_limit`` bytes a call
to imitate a full transmit FIFO.  :class:`FakePin` records its level history.
:class:`FakeWdt` counts feeds.

What they do not model: baud-rate timing, receive FIFO overruns, framing
errors on the wire, pin electrical behaviour and the watchdog's reset.
"""

# MicroPython has neither typing nor contextlib, and never evaluates annotations
try:  # noqa: SIM105
    from typing import Any
except ImportError:
    pass


class FakeUart:
    """A UART whose line is a pair of byte buffers."""

    def __init__(self, write_limit: int | None = None) -> None:
        self.incoming = bytearray()
        self.written = bytearray()
        self.write_limit = write_limit

    def inject(self, data: bytes) -> None:
        """Make ``data`` arrive on the receive line."""
        self.incoming += data

    def read(self) -> bytes | None:
        """Return everything received so far, or None (like machine.UART.read)."""
        if not self.incoming:
            return None
        data = bytes(self.incoming)
        self.incoming = bytearray()
        return data

    def write(self, data: bytes) -> int:
        """Accept up to ``write_limit`` bytes of ``data``; return how many."""
        n = len(data) if self.write_limit is None else min(len(data), self.write_limit)
        self.written += data[:n]
        return n

    def take(self) -> bytes:
        """Return and forget what has been written."""
        data = bytes(self.written)
        self.written = bytearray()
        return data


class FakePin:
    """A GPIO with a level and a history of the levels written."""

    def __init__(self, level: int = 0) -> None:
        self.level = level
        self.history: list[int] = []

    def value(self, level: Any = None) -> int | None:
        """Read the level, or set it (recording the change)."""
        if level is None:
            return self.level
        self.level = 1 if level else 0
        self.history.append(self.level)
        return None


class FakeWdt:
    """A watchdog that counts feeds."""

    def __init__(self) -> None:
        self.feeds = 0

    def feed(self) -> None:
        """Count one feed."""
        self.feeds += 1
