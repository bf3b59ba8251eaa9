"""Adapters for the host tools: sfdisk, mtools, e2fsprogs.  Only this module and
:mod:`provisioning.image.debugfs` start processes.

Every tool is looked up before the first one runs (:func:`require`), so a
missing one is reported with the Debian package that provides it, before
anything is written.  ``sbin`` directories are searched too: an unprivileged
user's ``PATH`` often lacks them, and none of these tools needs root on an
image file.  Tool failures become :class:`ToolFailed` carrying the tool's
own message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from provisioning.image.errors import HostToolMissing, PartitionTableError, ToolFailed

#: command -> the Debian package that provides it (also the Makefile's SYS_TOOLS).
HOST_TOOLS: Final = {
    "sfdisk": "fdisk",
    "mcopy": "mtools",
    "mdir": "mtools",
    "debugfs": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
}

#: A single tool call on a multi-GB image (a resize2fs, a debugfs session
#: writing thousands of files) stays well inside this on any host; past it,
#: something hangs and the build must fail rather than wait forever.
TOOL_TIMEOUT_S: Final = 1800.0

_SBIN: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def require(command: str) -> str:
    """Return the full path of ``command``; raise HostToolMissing naming its package."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    found = shutil.which(command, path=path)
    if found is None:
        raise HostToolMissing(command, HOST_TOOLS.get(command, command))
    return found


def run(
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a host tool; return the completed process.

    Raises HostToolMissing, and ToolFailed when it times out or (``check``)
    exits non-zero.
    """
    exe = require(argv[0])
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            input=stdin,
            capture_output=True,
            env={**os.environ, **(env or {})},
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ToolFailed(f"{argv[0]} did not finish within {TOOL_TIMEOUT_S:.0f} s") from e
    if check and proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise ToolFailed(f"{argv[0]} failed: {message}")
    return proc


def read_partition_table(image: Path) -> str:
    """Return ``sfdisk --json`` for ``image``; raise PartitionTableError if it has none."""
    proc = run(["sfdisk", "--json", str(image)], check=False)
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip()
        raise PartitionTableError(f"{image.name}: no readable partition table ({why})")
    return proc.stdout.decode(errors="replace")


def grow_partition(image: Path, number: int) -> None:
    """Extend partition ``number`` of ``image`` to the end of the file; raise ToolFailed."""
    run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", str(number), str(image)],
        stdin=b", +\n",
    )


def resize_ext4(image: Path, offset: int, sectors: int) -> None:
    """Grow the ext4 file system at ``offset`` to fill ``sectors`` 512-byte sectors.

    resize2fs cannot be pointed at a file system inside an image: through
    ``?offset=`` it cuts the image file to the file system's own length.  So
    the partition is copied out to a file of its own, resized there, and
    copied back (only the chunks that changed).  Raises ToolFailed.
    """
    size = sectors * 512
    with tempfile.TemporaryDirectory(prefix="optogate-grow-") as tmp:
        part = Path(tmp) / "root.ext4"
        with image.open("rb") as src, part.open("wb") as dst:
            src.seek(offset)
            left = size
            while left > 0:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    break
                if chunk.count(0) == len(chunk):
                    dst.seek(len(chunk), os.SEEK_CUR)
                else:
                    dst.write(chunk)
                left -= len(chunk)
            dst.truncate(size)
        run(["e2fsck", "-f", "-p", str(part)])
        run(["resize2fs", str(part), f"{sectors}s"])
        with part.open("rb") as src, image.open("r+b") as dst:
            position = offset
            while chunk := src.read(_CHUNK):
                dst.seek(position)
                if dst.read(len(chunk)) != chunk:
                    dst.seek(position)
                    dst.write(chunk)
                position += len(chunk)


#: Copy unit of resize_ext4: zero runs of this size stay holes in the copy.
_CHUNK: Final = 4 * 2**20


# -- the FAT boot partition, through mtools ----------------------------------------

#: mtools otherwise refuses FAT file systems whose geometry fields disagree
#: with its idea of a floppy or a disk; image files have no geometry.
_MTOOLS_ENV: Final = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": os.devnull}


def _fat(image: Path, offset: int) -> str:
    return f"{image}@@{offset}"


def fat_check(image: Path, offset: int) -> None:
    """Check that a FAT file system is at ``offset``; raise ToolFailed if mtools cannot read it."""
    run(["mdir", "-i", _fat(image, offset), "::/"], env=_MTOOLS_ENV)


def fat_read(image: Path, offset: int, name: str) -> bytes | None:
    """Return the bytes of ``name`` in the FAT root directory, or None if it does not exist."""
    with tempfile.TemporaryDirectory(prefix="optogate-fat-") as tmp:
        dest = Path(tmp) / "file"
        proc = run(
            ["mcopy", "-n", "-i", _fat(image, offset), f"::/{name}", str(dest)],
            env=_MTOOLS_ENV,
            check=False,
        )
        if proc.returncode != 0:
            if b"not found" in proc.stderr:
                return None
            raise ToolFailed(f"mcopy could not read {name}: {proc.stderr.decode().strip()}")
        return dest.read_bytes()


def fat_write(image: Path, offset: int, name: str, data: bytes) -> None:
    """Write ``name`` in the FAT root directory (replacing it); raise ToolFailed."""
    with tempfile.TemporaryDirectory(prefix="optogate-fat-") as tmp:
        src = Path(tmp) / name
        src.write_bytes(data)
        run(
            ["mcopy", "-o", "-n", "-i", _fat(image, offset), str(src), f"::/{name}"],
            env=_MTOOLS_ENV,
        )


def fat_copy_all(image: Path, offset: int, dest: Path) -> None:
    """Copy the whole FAT file system at ``offset`` into the directory ``dest``."""
    run(["mcopy", "-s", "-n", "-i", _fat(image, offset), "::/*", str(dest)], env=_MTOOLS_ENV)
