"""Errors of the modem layer, beside the code that raises them.

::

    ModemError                              (firmware.common.errors)
    ├── ModemCommandError                   the modem answered ERROR to a command
    ├── Busy                                the called line was busy
    ├── NoCarrier(ConnectionError)          no carrier: the call failed or the line dropped
    ├── NoDialtone                          no dial tone on the line (unplugged?)
    ├── NoAnswer                            the called side never picked up
    ├── ModemTimeout(TimeoutError)          the modem did not answer in time
    ├── CallLimitReached                    the calls-per-hour cap forbids another call
    └── CallAbandoned                       we hung up before the call connected

Call failures are *reported* by the dialler core as ``CallAttemptFailed`` /
``CallFailed`` events carrying one of these instances; the asyncio adapter
raises them.
"""

from __future__ import annotations

from firmware.common.errors import ModemError


class ModemCommandError(ModemError):
    """The modem answered ERROR to a command (bad init string, unsupported command)."""


class Busy(ModemError):
    """The called number was busy."""


class NoCarrier(ModemError, ConnectionError):
    """No carrier: the remote modem did not train up, or the connection dropped."""


class NoDialtone(ModemError):
    """The modem heard no dial tone: the phone line is unplugged or dead."""


class NoAnswer(ModemError):
    """The called side rang but never answered."""


class ModemTimeout(ModemError, TimeoutError):
    """The modem did not produce the expected result before the deadline."""


class CallLimitReached(ModemError):
    """The configured cap on calls per hour forbids another call until ``retry_at``."""

    def __init__(self, retry_at: float) -> None:
        super().__init__(f"calls-per-hour cap reached; next call allowed at t={retry_at:.1f}")
        self.retry_at = retry_at


class CallAbandoned(ModemError):
    """The local side hung up (or cancelled) before the call connected."""


__all__ = [
    "Busy",
    "CallAbandoned",
    "CallLimitReached",
    "ModemCommandError",
    "ModemError",
    "ModemTimeout",
    "NoAnswer",
    "NoCarrier",
    "NoDialtone",
]
