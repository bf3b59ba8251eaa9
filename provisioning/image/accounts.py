"""The daemons' system user, added to the image's account files (pure text in, text out).

The daemons run as an unprivileged system user that is a member of
``dialout`` (the optical UART and the modem are ``root:dialout``) and
``gpio`` (``/dev/gpiomem`` and ``/dev/gpiochip*`` are ``root:gpio`` on Pi OS).
The builder writes the user into ``/etc/passwd``, ``/etc/group``,
``/etc/shadow`` and ``/etc/gshadow`` itself rather than leaving it to a
first-boot ``useradd``, so the uid is known when the key files are written
and their owner is set, and read back, on the host.

The uid is chosen as ``systemd-sysusers`` would choose one: the highest free
id in the system range, counting down from 999, with the same number for the
user's own group when that is free too.  Adding a user that exists changes
only its missing memberships, so a re-run keeps the uid the key files
already carry.  A group the image lacks (``gpio`` on a plain Debian root) is
created as a system group, so membership never silently fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from provisioning.image.errors import ImageInputError

#: The system id range of Debian's adduser and of systemd-sysusers.
SYSTEM_IDS: Final = range(100, 1000)
#: The user the units run as.
SERVICE_USER: Final = "optogate"
#: dialout: the UART and the modem; gpio: the power-sense lines and LEDs.
SERVICE_GROUPS: Final = ("dialout", "gpio")
#: A system user's home: its state directory; it never logs in.
SERVICE_HOME: Final = "/var/lib/optogate"
NOLOGIN: Final = "/usr/sbin/nologin"


@dataclass(frozen=True)
class AccountFiles:
    """The four account files, as text."""

    passwd: str
    group: str
    shadow: str
    gshadow: str


@dataclass(frozen=True)
class ServiceAccount:
    """The result: the edited files and the user's uid and primary gid."""

    files: AccountFiles
    uid: int
    gid: int


def _rows(text: str, fields: int, name: str) -> list[list[str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = line.split(":")
        if len(row) != fields:
            raise ImageInputError(f"the image's {name} line {number} is malformed")
        rows.append(row)
    return rows


def _ids(rows: list[list[str]], name: str) -> set[int]:
    try:
        return {int(row[2]) for row in rows}
    except ValueError as e:
        raise ImageInputError(f"the image's {name} has a non-numeric id") from e


def _free_id(used: set[int], prefer: int | None = None) -> int:
    if prefer is not None and prefer not in used:
        return prefer
    for candidate in reversed(SYSTEM_IDS):
        if candidate not in used:
            return candidate
    raise ImageInputError("the image has no free system user or group id (100-999)")


def _join(rows: list[list[str]]) -> str:
    return "".join(":".join(row) + "\n" for row in rows)


def _add_member(row: list[str], user: str) -> None:
    members = [m for m in row[3].split(",") if m]
    if user not in members:
        members.append(user)
    row[3] = ",".join(members)


def add_service_user(
    files: AccountFiles,
    user: str = SERVICE_USER,
    groups: tuple[str, ...] = SERVICE_GROUPS,
) -> ServiceAccount:
    """Return ``files`` with ``user`` (and its own group) present and in ``groups``.

    Raises ImageInputError when a file is malformed or no system id is free.
    """
    passwd = _rows(files.passwd, 7, "/etc/passwd")
    group = _rows(files.group, 4, "/etc/group")
    shadow = _rows(files.shadow, 9, "/etc/shadow")
    gshadow = _rows(files.gshadow, 4, "/etc/gshadow")
    used_uids, used_gids = _ids(passwd, "/etc/passwd"), _ids(group, "/etc/group")

    group_names = {row[0] for row in group}
    for extra in groups:
        if extra not in group_names:
            gid = _free_id(used_gids | used_uids)
            used_gids.add(gid)
            group.append([extra, "x", str(gid), ""])
            group_names.add(extra)
    gshadow_names = {row[0] for row in gshadow}

    existing = next((row for row in passwd if row[0] == user), None)
    if existing is not None:
        uid, gid = int(existing[2]), int(existing[3])
    else:
        own = next((row for row in group if row[0] == user), None)
        if own is not None:
            gid = int(own[2])
            uid = _free_id(used_uids, prefer=gid)
        else:
            uid = _free_id(used_uids | used_gids)
            gid = uid
            group.append([user, "x", str(gid), ""])
        passwd.append([user, "x", str(uid), str(gid), "optogate daemons", SERVICE_HOME, NOLOGIN])
    if user not in {row[0] for row in group}:
        group.append([user, "x", str(gid), ""])
    if user not in {row[0] for row in shadow}:
        shadow.append([user, "!", "", "", "", "", "", "", ""])
    for name in (user, *groups):
        if name not in gshadow_names:
            gshadow.append([name, "!", "", ""])
    for rows in (group, gshadow):
        for row in rows:
            if row[0] in groups:
                _add_member(row, user)
    return ServiceAccount(
        AccountFiles(_join(passwd), _join(group), _join(shadow), _join(gshadow)), uid, gid
    )
