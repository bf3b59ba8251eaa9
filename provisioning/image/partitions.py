"""The base image's partition table, as ``sfdisk --json`` reports it.

A Raspberry Pi OS image is an MBR ("dos") disk with two primary partitions:
a FAT32 boot partition (type ``0c``, mounted at ``/boot/firmware``) and an
ext4 root partition (type ``83``) after it, which is also the last one, so
``--grow`` can extend it in place.  The builder never assumes offsets: it asks
``sfdisk`` and checks the answer here, purely, so every malformed table is a
typed :class:`PartitionTableError` before anything is written.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Final

from provisioning.image.errors import PartitionTableError

#: MBR type codes of FAT partitions the Pi firmware boots from (FAT32 LBA,
#: FAT32 CHS, FAT16 LBA: older images used 0c, some tools write 0b or 0e).
FAT_TYPES: Final = frozenset({"c", "b", "e"})
#: The Linux native partition type, which Pi OS gives its ext4 root.
LINUX_TYPE: Final = "83"
#: The only sector size MBR images are made with.
SECTOR_SIZE: Final = 512


@dataclass(frozen=True)
class Partition:
    """One partition: its number (1-based), first sector, length in sectors, MBR type."""

    number: int
    start: int
    sectors: int
    type: str

    @property
    def offset(self) -> int:
        """Byte offset of the partition in the image."""
        return self.start * SECTOR_SIZE

    @property
    def size(self) -> int:
        """Length of the partition in bytes."""
        return self.sectors * SECTOR_SIZE

    @property
    def end(self) -> int:
        """Byte offset just past the partition."""
        return self.offset + self.size


@dataclass(frozen=True)
class PiLayout:
    """The checked table: the disk id, the boot and the root partition, all partitions."""

    disk_id: str
    boot: Partition
    root: Partition
    partitions: tuple[Partition, ...]


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if type(value) is not int or value < 0:
        raise PartitionTableError(f"partition table: {key} is not a sector number")
    return value


def parse_sfdisk_json(text: str, image_size: int) -> PiLayout:
    """Return the Pi layout described by ``sfdisk --json`` output ``text``.

    ``image_size`` is the image file's length in bytes: a partition that ends
    past it means a truncated image.  Raises PartitionTableError when the
    output is not JSON, the table is not an MBR with 512-byte sectors, the
    partitions overlap or run past the end, or there is no FAT boot partition
    followed by a Linux root partition that is the last one on the disk.
    """
    try:
        doc = json.loads(text)
        table = doc["partitiontable"]
        raw_parts = table["partitions"]
    except (ValueError, KeyError, TypeError) as e:
        raise PartitionTableError("sfdisk did not report a partition table") from e
    if table.get("label") != "dos":
        raise PartitionTableError(
            f"the image has a {table.get('label')!r} partition table; Pi OS images use MBR (dos)"
        )
    if table.get("sectorsize", SECTOR_SIZE) != SECTOR_SIZE:
        raise PartitionTableError("the image's sector size is not 512 bytes")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise PartitionTableError("the image's partition table is empty")
    parts: list[Partition] = []
    for index, raw in enumerate(raw_parts, start=1):
        if not isinstance(raw, dict):
            raise PartitionTableError("partition table: malformed entry")
        node = str(raw.get("node", ""))
        digits = node[len(node.rstrip("0123456789")) :]
        number = int(digits) if digits else index
        part = Partition(number, _int(raw, "start"), _int(raw, "size"), str(raw.get("type", "")))
        if part.sectors == 0 or part.start == 0:
            raise PartitionTableError(f"partition {number} is empty or overlaps the MBR")
        if part.end > image_size:
            raise PartitionTableError(
                f"partition {number} ends at byte {part.end} but the image has only "
                f"{image_size} bytes: the image is truncated"
            )
        parts.append(part)
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.end:
            raise PartitionTableError(f"partitions {a.number} and {b.number} overlap")
    boot = next((p for p in ordered if p.type.lower() in FAT_TYPES), None)
    root = next((p for p in ordered if p.type == LINUX_TYPE), None)
    if boot is None:
        raise PartitionTableError("no FAT boot partition (type 0c) in the image")
    if root is None:
        raise PartitionTableError("no Linux root partition (type 83) in the image")
    if root.start < boot.start or root is not ordered[-1]:
        raise PartitionTableError("the root partition is not the last one after the boot one")
    return PiLayout(str(table.get("id", "")), boot, root, tuple(parts))
