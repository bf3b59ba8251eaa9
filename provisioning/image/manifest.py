"""The build manifest: every file the builder wrote, and what it was built from.

Written beside the image as ``FILE.img.manifest.json``.  It holds no secret
(a SHA-256 of a 256-bit key reveals nothing usable), so it can be filed with
the customer's records and compared later against a module's card
(``sha256sum`` of the files it lists).  Layout (format 1)::

    {
      "format": 1,
      "tool": "optogate 0.1.0",
      "created": "2026-01-01T00:00:00+00:00",
      "gateway": "gw-7", "role": "outer", "board": "pi4",
      "release": {"name": "2024-11-19 bookworm", "python": "3.11", "known": true},
      "base": {"file": "...img.xz", "sha256": "<of the file given>",
               "image_sha256": "<of the uncompressed image>"},
      "partitions": [{"number": 1, "start": 8192, "sectors": 1048576, "type": "c"}, ...],
      "grown": false,
      "entries": [
        {"partition": "root", "path": "/etc/optogate/keys/outer/signing.key", "type": "file",
         "size": 119, "sha256": "...", "mode": "0600", "uid": 999, "gid": 999,
         "owner": "optogate:optogate"},
        {"partition": "root", "path": "/etc/systemd/system/hciuart.service", "type": "link",
         "target": "/dev/null", ...},
        {"partition": "boot", "path": "/config.txt", "type": "file", "size": ..., "sha256": ...,
         "mode": null, "owner": null}          FAT has no modes or owners
      ]
    }
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from provisioning.image.partitions import PiLayout
from provisioning.image.plan import RootPlan
from provisioning.image.releases import Release

MANIFEST_FORMAT: Final = 1


@dataclass(frozen=True)
class BaseImage:
    """The base image given: its file name and digests."""

    file: str
    sha256: str
    image_sha256: str


def _owner(uid: int, gid: int, names: Mapping[int, str], groups: Mapping[int, str]) -> str:
    return f"{names.get(uid, str(uid))}:{groups.get(gid, str(gid))}"


def build_manifest(
    *,
    tool: str,
    created: str,
    gateway: str,
    role: str,
    board: str,
    release: Release,
    release_known: bool,
    base: BaseImage,
    layout: PiLayout,
    grown: bool,
    plan: RootPlan,
    boot_files: Mapping[str, bytes],
    users: Mapping[int, str],
    groups: Mapping[int, str],
) -> dict[str, object]:
    """Return the manifest document (see the module docstring)."""
    entries: list[dict[str, object]] = []
    for d in plan.dirs:
        entries.append(
            {
                "partition": "root",
                "path": d.path,
                "type": "dir",
                "mode": f"{d.mode:04o}",
                "uid": d.uid,
                "gid": d.gid,
                "owner": _owner(d.uid, d.gid, users, groups),
            }
        )
    for f in plan.files:
        entries.append(
            {
                "partition": "root",
                "path": f.path,
                "type": "file",
                "size": len(f.data),
                "sha256": hashlib.sha256(f.data).hexdigest(),
                "mode": f"{f.mode:04o}",
                "uid": f.uid,
                "gid": f.gid,
                "owner": _owner(f.uid, f.gid, users, groups),
            }
        )
    for link in plan.links:
        entries.append(
            {
                "partition": "root",
                "path": link.path,
                "type": "link",
                "target": link.target,
                "mode": "0777",
                "uid": 0,
                "gid": 0,
                "owner": _owner(0, 0, users, groups),
            }
        )
    for name, data in sorted(boot_files.items()):
        entries.append(
            {
                "partition": "boot",
                "path": f"/{name}",
                "type": "file",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "mode": None,
                "owner": None,
            }
        )
    return {
        "format": MANIFEST_FORMAT,
        "tool": tool,
        "created": created,
        "gateway": gateway,
        "role": role,
        "board": board,
        "release": {
            "name": release.name,
            "python": release.codename.python,
            "known": release_known,
        },
        "base": {"file": base.file, "sha256": base.sha256, "image_sha256": base.image_sha256},
        "partitions": [
            {"number": p.number, "start": p.start, "sectors": p.sectors, "type": p.type}
            for p in layout.partitions
        ],
        "grown": grown,
        "entries": entries,
    }


def manifest_bytes(doc: Mapping[str, object]) -> bytes:
    """Return the manifest as stable, indented JSON."""
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()


def id_names(text: str) -> dict[int, str]:
    """Return id -> name from /etc/passwd or /etc/group text (malformed lines skipped)."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            names.setdefault(int(fields[2]), fields[0])
    return names
