"""One owner process per database: an advisory ``flock`` on a lock file.

TinyDB has no process safety: two processes that read, modify and write the
same file lose each other's changes.  The daemons therefore take an exclusive
``flock(2)`` on ``<database>.lock`` before they open a database, and keep it
for as long as the database is open.

Why ``flock`` and not a pid file: the kernel drops the lock when the owning
process dies, however it dies (SIGKILL, power cut), so there is never a stale
lock to clean up by hand.  The owner writes its pid into the file only so the
error message can say who holds it; the pid is advice, the lock is the truth.

``flock`` locks belong to an open file description, so a second
:class:`OwnerLock` on the same path conflicts even inside the same process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from firmware.common.errors import StorageError

from .atomic import PRIVATE_MODE


class StoreLocked(StorageError):
    """Another process (or another open handle) owns the database."""


class OwnerLock:
    """An exclusive, non-blocking ownership lock on ``path``.

    ``acquire()`` raises :class:`StoreLocked` at once if someone else holds
    it (never waits: a daemon started twice should fail loudly, not hang),
    and :class:`~firmware.common.errors.StorageError` if the file cannot be
    opened.  Use as a context manager or call ``acquire``/``release``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise StoreLocked naming the current owner."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
        except OSError as e:
            raise StorageError(e.errno, f"cannot open lock file {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            owner = _read_owner(fd)
            os.close(fd)
            raise StoreLocked(
                e.errno,
                f"{self.path} is held by another process"
                + (f" (pid {owner})" if owner else "")
                + ": only one process may own this database",
            ) from e
        except OSError as e:
            os.close(fd)
            raise StorageError(e.errno, f"cannot lock {self.path}: {e.strerror}") from e
        # Advisory only: who owns it, for the next one's error message.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent).  The lock file itself stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> OwnerLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    """The pid the owner wrote into the lock file, or "" if unreadable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
