"""The ext4 root partition, edited in place with ``debugfs`` (no mount, no root, no loop device).

debugfs opens the file system inside the image file through its ``?offset=``
I/O option and runs a command file (``-f``), echoing each command to stdout
as ``debugfs: CMD`` before that command's output.  It exits 0 even when a
command fails, printing the failure on stderr, so this adapter

* treats any stderr line other than its version banner as a failure of the
  write session (:class:`ToolFailed`, with the lines), and
* reads everything back afterwards (:meth:`Ext4.verify`): each file's bytes
  (``dump``), each entry's type, mode and owner (``ls -p``), each link's
  target (``stat``), raising :class:`ReadBackMismatch` on any difference.

Listings use ``ls -p``, whose lines are ``/inode/mode/uid/gid/name/size/``
(octal mode), split per directory by the echoed command lines.
"""

from __future__ import annotations

import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from provisioning.image.errors import ReadBackMismatch, ToolFailed
from provisioning.image.plan import Dir, File, Link, RootPlan
from provisioning.image.tools import run

_BANNER = re.compile(r"^debugfs \d+\.\d+")
_ECHO: Final = "debugfs: "
_LINK_DEST = re.compile(r'^Fast link dest: "(.*)"$')
#: Longer targets live in a data block; ``stat`` shows only fast (inline) ones.
MAX_LINK_TARGET: Final = 59


@dataclass(frozen=True)
class Entry:
    """One directory entry as ``ls -p`` shows it."""

    name: str
    mode: int
    uid: int
    gid: int
    size: int

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class FsStats:
    """Free space of the file system."""

    block_size: int
    free_blocks: int
    reserved_blocks: int
    free_inodes: int

    @property
    def available(self) -> int:
        """Bytes an unprivileged daemon could still use."""
        return max(0, self.free_blocks - self.reserved_blocks) * self.block_size


def _sections(stdout: str) -> list[tuple[str, list[str]]]:
    sections: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        if line.startswith(_ECHO):
            sections.append((line[len(_ECHO) :], []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def parse_listing(lines: Iterable[str]) -> dict[str, Entry]:
    """Return the entries (without ``.`` and ``..``) of ``ls -p`` output lines."""
    entries: dict[str, Entry] = {}
    for line in lines:
        parts = line.split("/")
        if len(parts) < 7 or parts[0] != "":
            continue
        _, _inode, mode, uid, gid, name, size = parts[:7]
        if name in (".", ".."):
            continue
        entries[name] = Entry(name, int(mode, 8), int(uid), int(gid), int(size or 0))
    return entries


class Ext4:
    """The ext4 file system at ``offset`` bytes into ``image``."""

    def __init__(self, image: Path, offset: int) -> None:
        self.image = image
        self.offset = offset

    @property
    def spec(self) -> str:
        """The device argument debugfs, e2fsck and resize2fs take."""
        return f"{self.image}?offset={self.offset}"

    def session(self, commands: list[str], *, write: bool = False) -> tuple[str, list[str]]:
        """Run ``commands``; return stdout and the stderr lines other than the banner.

        A write session raises ToolFailed when any command printed an error.
        """
        with tempfile.NamedTemporaryFile("w", prefix="optogate-debugfs-", suffix=".cmd") as f:
            f.write("\n".join(commands) + "\n")
            f.flush()
            argv = ["debugfs", *(["-w"] if write else []), "-f", f.name, self.spec]
            proc = run(argv, check=False)
        errors = [
            line
            for line in proc.stderr.decode(errors="replace").splitlines()
            if line.strip() and not _BANNER.match(line)
        ]
        if proc.returncode != 0 or (write and errors):
            shown = "; ".join(errors[:5]) or f"exit status {proc.returncode}"
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise ToolFailed(f"debugfs failed on the root partition: {shown}{more}")
        return proc.stdout.decode(errors="replace"), errors

    def check_open(self) -> None:
        """Raise ToolFailed unless an ext4 file system can be opened at the offset."""
        _, errors = self.session(["stats -h"])
        if errors:
            raise ToolFailed(f"no ext4 file system on the root partition: {errors[0]}")

    def stats(self) -> FsStats:
        """Return the file system's free space; raise ToolFailed."""
        out, errors = self.session(["stats -h"])
        if errors:
            raise ToolFailed(f"cannot read the root file system: {errors[0]}")
        fields: dict[str, int] = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip().split(" ")[0].isdigit():
                fields[key.strip()] = int(value.strip().split(" ")[0])
        try:
            return FsStats(
                fields["Block size"],
                fields["Free blocks"],
                fields.get("Reserved block count", 0),
                fields["Free inodes"],
            )
        except KeyError as e:
            raise ToolFailed(f"debugfs stats lack {e}") from e

    def list_dirs(self, dirs: Iterable[str]) -> dict[str, dict[str, Entry] | None]:
        """Return each directory's entries, or None for one that does not exist."""
        wanted = sorted(set(dirs))
        out, _ = self.session([f'ls -p "{d}"' for d in wanted])
        result: dict[str, dict[str, Entry] | None] = dict.fromkeys(wanted)
        for command, lines in _sections(out):
            path = command[len('ls -p "') : -1]
            if path in result and any(line.startswith("/") for line in lines):
                result[path] = parse_listing(lines)
        return result

    def read_files(self, paths: list[str]) -> dict[str, bytes | None]:
        """Return the bytes of each file, or None for one that cannot be read."""
        result: dict[str, bytes | None] = {}
        with tempfile.TemporaryDirectory(prefix="optogate-readback-") as tmp:
            commands = [f'dump "{p}" "{tmp}/{i}"' for i, p in enumerate(paths)]
            if commands:
                self.session(commands)
            for i, p in enumerate(paths):
                dumped = Path(tmp) / str(i)
                result[p] = dumped.read_bytes() if dumped.exists() else None
        return result

    def link_targets(self, paths: list[str]) -> dict[str, str | None]:
        """Return the target of each (fast) symbolic link, or None."""
        out, _ = self.session([f'stat "{p}"' for p in paths]) if paths else ("", [])
        result: dict[str, str | None] = dict.fromkeys(paths)
        for command, lines in _sections(out):
            path = command[len('stat "') : -1]
            for line in lines:
                m = _LINK_DEST.match(line.strip())
                if m and path in result:
                    result[path] = m.group(1)
        return result

    def tree(self, root: str) -> tuple[list[str], list[str], int]:
        """Return (files and links, directories, their bytes) under ``root``, deepest first."""
        size = 0
        files: list[str] = []
        dirs: list[str] = []
        frontier = [root]
        while frontier:
            listing = self.list_dirs(frontier)
            frontier = []
            for d, entries in listing.items():
                if entries is None:
                    continue
                dirs.append(d)
                for name, entry in entries.items():
                    child = f"{d}/{name}"
                    (frontier if entry.is_dir else files).append(child)
                    size += entry.size
        dirs.sort(key=lambda p: p.count("/"), reverse=True)
        return files, dirs, size

    def reclaimed(self, plan: RootPlan) -> int:
        """Return the bytes the plan frees: the trees it replaces and the files it overwrites."""
        total = sum(self.tree(t)[2] for t in plan.replace_trees)
        return total + sum(e.size for e in self.existing(plan).values() if not e.is_dir)

    # -- carrying out a plan -----------------------------------------------------

    def existing(self, plan: RootPlan) -> dict[str, Entry]:
        """Return what already exists at the plan's paths (outside the trees it replaces)."""
        paths = plan.paths()
        parents = {str(PurePosixPath(p).parent) for p in paths}
        listing = self.list_dirs(parents)
        found: dict[str, Entry] = {}
        for p in paths:
            if _inside(p, plan.replace_trees):
                continue
            entries = listing.get(str(PurePosixPath(p).parent))
            if entries and PurePosixPath(p).name in entries:
                found[p] = entries[PurePosixPath(p).name]
        return found

    def apply(self, plan: RootPlan, staging: Path) -> None:
        """Write ``plan``: remove the replaced trees, then create everything; raise ToolFailed.

        ``staging`` is an empty host directory for the files' bytes.
        """
        commands: list[str] = []
        for tree in plan.replace_trees:
            files, dirs, _ = self.tree(tree)
            commands += [f'rm "{p}"' for p in files]
            commands += [f'rmdir "{d}"' for d in dirs]
        found = self.existing(plan)
        for d in sorted(plan.dirs, key=lambda d: d.path.count("/")):
            entry = found.get(d.path)
            if entry is not None and not entry.is_dir:
                raise ToolFailed(f"{d.path} exists on the image and is not a directory")
            if entry is None:
                commands.append(f'mkdir "{d.path}"')
            commands += _owner(d.path, stat.S_IFDIR | d.mode, d.uid, d.gid)
        for i, f in enumerate(plan.files):
            entry = found.get(f.path)
            if entry is not None:
                if entry.is_dir:
                    raise ToolFailed(f"{f.path} exists on the image and is a directory")
                commands.append(f'rm "{f.path}"')
            host = staging / str(i)
            host.write_bytes(f.data)
            commands.append(f'write "{host}" "{f.path}"')
            commands += _owner(f.path, stat.S_IFREG | f.mode, f.uid, f.gid)
        for link in plan.links:
            if len(link.target) > MAX_LINK_TARGET:
                raise ToolFailed(f"link target of {link.path} is too long to verify")
            entry = found.get(link.path)
            if entry is not None:
                if entry.is_dir:
                    raise ToolFailed(f"{link.path} exists on the image and is a directory")
                commands.append(f'rm "{link.path}"')
            commands.append(f'symlink "{link.path}" "{link.target}"')
        self.session(commands, write=True)

    def verify(self, plan: RootPlan) -> None:
        """Read the plan back from the image; raise ReadBackMismatch on any difference."""
        wanted: dict[str, tuple[int, int, int]] = {}
        for d in plan.dirs:
            wanted[d.path] = (stat.S_IFDIR | d.mode, d.uid, d.gid)
        for f in plan.files:
            wanted[f.path] = (stat.S_IFREG | f.mode, f.uid, f.gid)
        for link in plan.links:
            wanted[link.path] = (stat.S_IFLNK | 0o777, 0, 0)
        listing = self.list_dirs({str(PurePosixPath(p).parent) for p in wanted})
        for path, (mode, uid, gid) in wanted.items():
            entries = listing.get(str(PurePosixPath(path).parent)) or {}
            entry = entries.get(PurePosixPath(path).name)
            if entry is None:
                raise ReadBackMismatch(f"{path} is missing from the image after writing")
            if (entry.mode, entry.uid, entry.gid) != (mode, uid, gid):
                raise ReadBackMismatch(
                    f"{path} reads back as mode {entry.mode:o} owner {entry.uid}:{entry.gid}, "
                    f"expected {mode:o} {uid}:{gid}"
                )
        contents = self.read_files([f.path for f in plan.files])
        for f in plan.files:
            if contents[f.path] != f.data:
                raise ReadBackMismatch(f"{f.path} does not read back byte for byte")
        targets = self.link_targets([link.path for link in plan.links])
        for link in plan.links:
            if targets[link.path] != link.target:
                raise ReadBackMismatch(
                    f"{link.path} points to {targets[link.path]!r}, not {link.target!r}"
                )


def _inside(path: str, trees: tuple[str, ...]) -> bool:
    return any(path == t or path.startswith(t + "/") for t in trees)


def _owner(path: str, mode: int, uid: int, gid: int) -> list[str]:
    return [
        f'sif "{path}" mode 0{mode:o}',
        f'sif "{path}" uid {uid}',
        f'sif "{path}" gid {gid}',
    ]


__all__ = ["Dir", "Entry", "Ext4", "File", "FsStats", "Link", "parse_listing"]
