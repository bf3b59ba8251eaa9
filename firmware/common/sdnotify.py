"""systemd's readiness and watchdog protocol, never blocking the event loop.

systemd passes ``NOTIFY_SOCKET`` (a datagram socket path; a leading ``@``
means the abstract namespace) to a ``Type=notify`` service; the service sends
``READY=1`` once it serves, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds, and ``STOPPING=1`` when it shuts down.  Without the variable
(not under systemd) every call does nothing.

The send is non-blocking (``MSG_DONTWAIT``): a Unix datagram socket whose
reader has fallen behind holds only ``net.unix.max_dgram_qlen`` (10)
messages, and a blocking send would then freeze the daemon's event loop,
optical link included.  A message that does not fit is dropped and counted
(``counters["dropped"]``); the next watchdog ping follows within half a period.
"""

from __future__ import annotations

import os
import socket

#: ``dropped``: notifications that could not be sent (reader gone or behind).
counters: dict[str, int] = {"dropped": 0}


def notify(state: str) -> bool:
    """Send ``state`` to systemd; return True if sent, False if not under systemd or not sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, address)
    except OSError:
        counters["dropped"] += 1
        return False
    return True


def watchdog_interval() -> float | None:
    """Return the watchdog period in seconds for this process, or None if none is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
