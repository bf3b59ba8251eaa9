"""Which Raspberry Pi OS release a base image is, and whether the builder knows it.

An image names itself twice on its root partition: ``/etc/rpi-issue`` starts
with ``Raspberry Pi reference YYYY-MM-DD`` (the pi-gen build date, which is
also the date in the published file name, e.g.
``2024-11-19-raspios-bookworm-arm64-lite.img.xz``), and ``/etc/os-release``
gives the Debian codename.  :data:`RELEASES` lists the releases whose layout
the builder is written against: where the boot partition is mounted, which
Python the OS ships (the wheelhouse must match it), and which packages must
already be in the image because the builder relies on them instead of
installing them (RPi.GPIO comes from the OS's own package, never from a
wheel; the inner module's firewall needs ``nft``).

An image that is not in the table is refused unless ``--force``: a new
release may move a path the units rely on, and a failure on the Pi is much
harder to diagnose than a refusal here.  With ``--force`` the Debian codename
still has to be one the builder knows, since it decides the Python version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from provisioning.image.errors import UnknownRelease


@dataclass(frozen=True)
class Codename:
    """What a Debian codename fixes for the image: its Python and its boot mount."""

    name: str
    debian: str
    python: str
    boot_mount: str


#: Debian releases Pi OS is built on, with the Python each ships.
CODENAMES: Final = {
    "bookworm": Codename("bookworm", "12", "3.11", "/boot/firmware"),
    "trixie": Codename("trixie", "13", "3.13", "/boot/firmware"),
}


@dataclass(frozen=True)
class Release:
    """One Raspberry Pi OS (arm64) release in the table."""

    date: str
    codename: Codename

    @property
    def name(self) -> str:
        """The release as the published file names it, e.g. ``2024-11-19 bookworm``."""
        return f"{self.date} {self.codename.name}"


#: The arm64 Pi OS releases the builder is written against (Lite and desktop
#: share the layout the builder touches): their Debian base, Python, boot
#: mount point and packages as published.  The test suite exercises them
#: through synthetic images of the same shape; a real card of each passes
#: step 11 of the hardware acceptance checklist (docs/hardware.md) before a
#: customer's gateway is built from it.  Add a row the same way.
RELEASES: Final = (
    Release("2024-07-04", CODENAMES["bookworm"]),
    Release("2024-11-19", CODENAMES["bookworm"]),
    Release("2025-05-13", CODENAMES["bookworm"]),
    Release("2025-10-01", CODENAMES["trixie"]),
)

#: RPi.GPIO's API from the OS: rpi-lgpio (Bookworm onward, works on a Pi 5)
#: or the classic RPi.GPIO package (Pi 3 / Pi 4 only).
GPIO_PACKAGES: Final = ("python3-rpi-lgpio", "python3-rpi.gpio")
#: The inner module's firewall is an nftables rule set.
FIREWALL_PACKAGE: Final = "nftables"

_ISSUE_RE = re.compile(r"^Raspberry Pi reference (\d{4}-\d{2}-\d{2})\b")


def parse_os_release(text: str) -> dict[str, str]:
    """Return the KEY=value pairs of an os-release file (quotes removed)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            fields[key] = value.strip().strip("\"'")
    return fields


def identify(os_release: str, rpi_issue: str | None, *, force: bool) -> Release:
    """Return the release of an image from its os-release and rpi-issue texts.

    Raises UnknownRelease when the codename is not Debian 12 or 13, or (unless
    ``force``) when the image is not Raspberry Pi OS or its date is not in
    :data:`RELEASES`.
    """
    fields = parse_os_release(os_release)
    code = fields.get("VERSION_CODENAME", "")
    codename = CODENAMES.get(code)
    if codename is None:
        known = ", ".join(sorted(CODENAMES))
        raise UnknownRelease(
            f"the image's OS is {fields.get('PRETTY_NAME', code or 'unknown')!r}; "
            f"the builder knows only the Debian releases {known}"
        )
    match = _ISSUE_RE.match(rpi_issue or "")
    date = match.group(1) if match else ""
    for release in RELEASES:
        if release.date == date and release.codename is codename:
            return release
    if not force:
        tested = ", ".join(r.name for r in RELEASES)
        what = f"Raspberry Pi OS {date} {code}" if date else f"{code} (not Raspberry Pi OS)"
        raise UnknownRelease(
            f"{what} is not a release the builder was written against ({tested}); "
            "pass --force to build anyway"
        )
    return Release(date or "unknown", codename)


def installed_packages(dpkg_status: str) -> set[str]:
    """Return the names of the installed packages in a dpkg ``status`` file."""
    installed: set[str] = set()
    for stanza in dpkg_status.split("\n\n"):
        name = status = ""
        for line in stanza.splitlines():
            if line.startswith("Package:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Status:"):
                status = line.split(":", 1)[1].strip()
        if name and status.endswith(" installed"):
            installed.add(name.split(":", 1)[0])
    return installed
