"""Atomic, durable file replacement: the primitive every persistent write uses.

A power cut at any instant must leave either the old or the new content, never
a mixture or an empty file.  POSIX gives that through rename(2) over an
existing name, provided the new content reached the disk first and the
directory entry is made durable afterwards:

1. write the new content to a temporary file in the same directory,
2. fsync the temporary file,
3. rename it over the target (atomic on POSIX file systems),
4. fsync the directory, so the rename itself survives a power cut.

If any step fails the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from firmware.common.errors import StorageError

#: Default mode: everything we persist is the gateway's private state.
PRIVATE_MODE = 0o600


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with file ``mode``.

    Raises StorageError (an OSError) when the write fails, for example on a
    full disk; the previous content of ``path`` is then intact.  The one
    exception is a failure of the final directory fsync: the rename has then
    happened, so ``path`` already shows the new content, but the error is
    still raised because a power cut could undo it.

    The temporary file is ``.<name>.<pid>.tmp`` beside ``path``; a process
    killed mid-write leaves it behind, and the owner of ``path`` may remove
    it (``firmware.common.store.tinystore.Store`` does on open).
    """
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_directory(directory)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(e.errno, f"cannot write {target}: {e.strerror or e}") from e
