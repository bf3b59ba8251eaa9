"""Virtual RP2040 ``machine`` module for the virtual board (node/virtualboard.mjs).

UARTs and pins are the fakes of fakeboard.py.  The watchdog ends a "time
slice" of the board loop after ``FEEDS_PER_SLICE`` feeds (see _thread.py);
``reset()`` asks the host bridge to reboot the interpreter and run main.py.

Not modelled: pin electrical behaviour, UART timing, the watchdog's reset.
"""

import fakeboard
import js

#: Loop steps one virtual "thread" runs before handing control back.
FEEDS_PER_SLICE = 25

uarts = {}
pins = {}


class SliceEnd(BaseException):
    """Ends the board loop's slice; not an Exception, so the loop does not catch it."""


class Pin(fakeboard.FakePin):
    """A GPIO: records its mode and pull and registers itself by number."""

    IN = 0
    OUT = 1
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(self, ident, mode=0, pull=0, value=0) -> None:
        super().__init__(value)
        self.mode = mode
        self.pull = pull
        pins[ident] = self


class UART(fakeboard.FakeUart):
    """A UART whose line is a pair of byte buffers, registered by id."""

    def __init__(self, ident, **kwargs) -> None:
        super().__init__()
        self.kwargs = kwargs
        uarts[ident] = self


class WDT(fakeboard.FakeWdt):
    """A watchdog that ends the loop's slice every FEEDS_PER_SLICE feeds."""

    def __init__(self, timeout=5000) -> None:
        super().__init__()
        self.timeout = timeout

    def feed(self) -> None:
        """Count one feed; end the slice every FEEDS_PER_SLICE."""
        super().feed()
        if self.feeds % FEEDS_PER_SLICE == 0:
            raise SliceEnd


def reset() -> None:
    """Reboot the virtual board (the host bridge runs main.py again)."""
    js.virtualBoardReset()
