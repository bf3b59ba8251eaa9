"""systemd's readiness and watchdog protocol, in a few lines and no dependency.

systemd passes ``NOTIFY_SOCKET`` (a datagram socket path; a leading ``@``
means the abstract namespace) to a ``Type=notify`` service; the service sends
``READY=1`` once it serves, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds, and ``STOPPING=1`` when it shuts down.  Without the variable
(not under systemd) every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` to systemd; return True if sent, False if not under systemd or it failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Never block the event loop: a receiver that stopped reading (a full
        # queue) loses this datagram instead of freezing the daemon.
        sock.setblocking(False)
        sock.sendto(state.encode(), address)
        return True
    return False


def watchdog_interval() -> float | None:
    """Return the watchdog period in seconds for this process, or None if none is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
