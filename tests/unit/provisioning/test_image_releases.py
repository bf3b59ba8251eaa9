"""The release table, os-release and dpkg status parsing."""

from __future__ import annotations

import pytest

from provisioning.image.errors import UnknownRelease
from provisioning.image.releases import RELEASES, Release, identify, installed_packages

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def os_release(codename: str) -> str:
    return f'PRETTY_NAME="Debian GNU/Linux ({codename})"\nVERSION_CODENAME={codename}\nID=debian\n'


def issue(date: str) -> str:
    return f"Raspberry Pi reference {date}\nGenerated using pi-gen, x, y, stage2\n"


@pytest.mark.parametrize("release", RELEASES, ids=lambda r: r.name)
def test_every_table_row_is_identified(release: Release) -> None:
    found = identify(os_release(release.codename.name), issue(release.date), force=False)
    assert found is release


def test_python_per_codename() -> None:
    bookworm = identify(os_release("bookworm"), issue("2024-11-19"), force=False)
    trixie = identify(os_release("trixie"), issue("2025-10-01"), force=False)
    assert (bookworm.codename.python, trixie.codename.python) == ("3.11", "3.13")


@pytest.mark.parametrize(
    ("codename", "rpi_issue"),
    [("bookworm", issue("2031-01-01")), ("bookworm", None), ("trixie", issue("2024-11-19"))],
)
def test_unknown_release_refused_unless_forced(codename: str, rpi_issue: str | None) -> None:
    with pytest.raises(UnknownRelease, match="--force"):
        identify(os_release(codename), rpi_issue, force=False)
    forced = identify(os_release(codename), rpi_issue, force=True)
    assert forced not in RELEASES
    assert forced.codename.name == codename


@pytest.mark.parametrize("codename", ["bullseye", "buster", ""])
def test_unknown_debian_refused_even_forced(codename: str) -> None:
    with pytest.raises(UnknownRelease):
        identify(os_release(codename), issue("2024-11-19"), force=True)


def test_installed_packages_only_counts_installed() -> None:
    status = (
        "Package: nftables\nStatus: install ok installed\n\n"
        "Package: python3-rpi-lgpio\nStatus: deinstall ok config-files\n\n"
        "Package: libc6:arm64\nStatus: install ok installed\nVersion: 2.36\n"
    )
    assert installed_packages(status) == {"nftables", "libc6"}
