"""Synthetic Raspberry Pi OS images, built without root, mounts or loop devices.

The shape of a stock image: an MBR with a FAT32 boot partition (type 0c) at
sector 8192 and an ext4 root partition (type 83) after it; on the boot
partition config.txt and cmdline.txt as Pi OS ships them (serial console
included); on the root, the files the builder reads (os-release, rpi-issue,
the account files, dpkg's status, ``/usr/lib/python3.X``).  The file systems
are made in plain files (``mkfs.fat -C``, ``mkfs.ext4 -d``), copied into the
image with ``dd`` and described with ``sfdisk``.

What it does not model: the kernel, firmware and the rest of the OS; the
files' owners are the test runner's, not root's, except where ``mkfs.ext4 -d``
keeps them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Where the file system tools are, also for a user whose PATH lacks sbin.
TOOL_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
#: Pi OS puts the boot partition at 4 MiB (sector 8192).
BOOT_START = 8192
SECTOR = 512

CONFIG_TXT = """\
# For more options and information see
# http://rptl.io/configtxt
# Some settings may impact device functionality. See link above for details

# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Automatically load overlays for detected cameras
camera_auto_detect=1

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
otg_mode=1

[pi4]
# Run as fast as firmware / board allows
arm_boost=1

[all]
"""

CMDLINE_TXT = (
    "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot "
    "cfg80211.ieee80211_regdom=GB\n"
)

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin
messagebus:x:100:107::/nonexistent:/usr/sbin/nologin
pi:x:1000:1000:,,,:/home/pi:/bin/bash
"""
GROUP = """\
root:x:0:
daemon:x:1:
dialout:x:20:pi
shadow:x:42:
systemd-network:x:998:
messagebus:x:107:
gpio:x:997:pi
pi:x:1000:
"""
SHADOW = """\
root:*:19000:0:99999:7:::
daemon:*:19000:0:99999:7:::
systemd-network:!*:19000::::::
messagebus:!:19000::::::
pi:!:19000:0:99999:7:::
"""
GSHADOW = """\
root:*::
daemon:*::
dialout:*::pi
shadow:*::
systemd-network:!*::
messagebus:!::
gpio:!::pi
pi:!::
"""


@dataclass(frozen=True)
class Flavour:
    """One OS release's shape."""

    codename: str
    version_id: str
    python: str
    rpi_issue_date: str


BOOKWORM = Flavour("bookworm", "12", "3.11", "2024-11-19")
TRIXIE = Flavour("trixie", "13", "3.13", "2025-10-01")

PACKAGES = ("python3", "python3-rpi-lgpio", "nftables", "modemmanager")


def dpkg_status(packages: tuple[str, ...]) -> str:
    """Return a dpkg status file listing ``packages`` as installed."""
    return "".join(
        f"Package: {p}\nStatus: install ok installed\nArchitecture: arm64\nVersion: 1.0\n\n"
        for p in packages
    )


def run(*argv: str, stdin: bytes | None = None) -> None:
    """Run a command; fail the test with its stderr if it fails."""
    exe = shutil.which(argv[0], path=TOOL_PATH)
    assert exe is not None, f"{argv[0]} is missing: run `make sysdeps`"
    proc = subprocess.run(
        [exe, *argv[1:]], input=stdin, capture_output=True, check=False, timeout=60
    )
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr.decode(errors='replace')}"


def root_tree(
    dest: Path, flavour: Flavour, *, packages: tuple[str, ...] = PACKAGES, rpi_issue: bool = True
) -> None:
    """Write the root file system's files into the directory ``dest``."""
    etc = dest / "etc"
    (etc / "systemd" / "system" / "multi-user.target.wants").mkdir(parents=True)
    (etc / "udev" / "rules.d").mkdir(parents=True)
    (dest / f"usr/lib/python{flavour.python}").mkdir(parents=True)
    (dest / "usr/local/lib").mkdir(parents=True)
    (dest / "usr/local/bin").mkdir(parents=True)
    (dest / "usr/bin").mkdir(parents=True)
    (dest / "var/lib/dpkg").mkdir(parents=True)
    (dest / "opt").mkdir()
    (dest / "dev").mkdir()
    (dest / "boot/firmware").mkdir(parents=True)
    (etc / "os-release").write_text(
        f'PRETTY_NAME="Debian GNU/Linux {flavour.version_id} ({flavour.codename})"\n'
        f'NAME="Debian GNU/Linux"\nVERSION_ID="{flavour.version_id}"\n'
        f"VERSION_CODENAME={flavour.codename}\nID=debian\n"
    )
    if rpi_issue:
        (etc / "rpi-issue").write_text(
            f"Raspberry Pi reference {flavour.rpi_issue_date}\n"
            "Generated using pi-gen, https://github.com/RPi-Distro/pi-gen, 0123abcd, stage2\n"
        )
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    (etc / "shadow").write_text(SHADOW)
    (etc / "gshadow").write_text(GSHADOW)
    (etc / "shadow").chmod(0o640)
    (etc / "gshadow").chmod(0o640)
    (etc / "hostname").write_text("raspberrypi\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost\n127.0.1.1\t\traspberrypi\n")
    (etc / "systemd/system/multi-user.target.wants/hciuart.service").symlink_to(
        "/lib/systemd/system/hciuart.service"
    )
    (dest / "var/lib/dpkg/status").write_text(dpkg_status(packages))


def make_image(
    path: Path,
    flavour: Flavour,
    *,
    work: Path,
    boot_mib: int = 40,
    root_mib: int = 48,
    packages: tuple[str, ...] = PACKAGES,
    rpi_issue: bool = True,
    config_txt: str = CONFIG_TXT,
    cmdline_txt: str = CMDLINE_TXT,
) -> Path:
    """Build a Pi-OS-shaped image at ``path``; return it."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    boot, root, tree = work / "boot.fat", work / "root.ext4", work / "tree"
    run(
        "mkfs.fat",
        "-F",
        "32",
        "-S",
        "512",
        "-s",
        "1",
        "-n",
        "BOOTFS",
        "-C",
        str(boot),
        str(boot_mib * 1024),
    )
    for name, text in (
        ("config.txt", config_txt),
        ("cmdline.txt", cmdline_txt),
        ("issue.txt", f"Raspberry Pi reference {flavour.rpi_issue_date}\n"),
    ):
        src = work / name
        src.write_text(text)
        run("mcopy", "-i", str(boot), str(src), f"::/{name}")
    root_tree(tree, flavour, packages=packages, rpi_issue=rpi_issue)
    run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "rootfs",
        "-N",
        "4096",
        "-d",
        str(tree),
        str(root),
        f"{root_mib}M",
    )
    boot_sectors = boot_mib * 2048
    root_start = BOOT_START + boot_sectors
    root_sectors = root_mib * 2048
    with path.open("wb") as f:
        f.truncate((root_start + root_sectors) * SECTOR)
    run(
        "dd",
        f"if={boot}",
        f"of={path}",
        "bs=1M",
        f"seek={BOOT_START * SECTOR // 2**20}",
        "conv=notrunc,sparse",
        "status=none",
    )
    run(
        "dd",
        f"if={root}",
        f"of={path}",
        "bs=1M",
        f"seek={root_start * SECTOR // 2**20}",
        "conv=notrunc,sparse",
        "status=none",
    )
    script = (
        "label: dos\nlabel-id: 0x4e639091\n"
        f"start={BOOT_START}, size={boot_sectors}, type=c\n"
        f"start={root_start}, size={root_sectors}, type=83\n"
    )
    run("sfdisk", "-q", str(path), stdin=script.encode())
    return path
