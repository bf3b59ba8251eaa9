"""Both modules' images, built by the real tool, booted under emulation (``make test-boot``).

The base image is shaped like the stock one (MBR, FAT32 boot partition with
config.txt and cmdline.txt, ext4 root) but its root is plain Debian arm64,
made from Debian's packages with mmdebstrap and qemu-user (update-initramfs
diverted: running it under emulation takes many minutes), and cached under
the checkout's ignored ``.cache/boot/``.  The kernel is Debian's; a small
initramfs built here on the host (busybox and the few modules the root
needs) mounts the root partition.  Being Debian, not Raspberry Pi OS, the
builder needs ``--force``; having no GPIO, ``--gpio none``.

Then, on the host: central with an answering modem, the calling modem whose
pty becomes a USB serial adapter of the outer VM, and both VMs
(``qemu-system-aarch64 -M virt``) with their PL011 UARTs joined by a socket
(the optical link) and their consoles on virtio.  The VMs have no network:
the inner one has only a restricted user-mode forward of the API port to
the host's loopback.  A probe unit in the base image (not written by the
builder) prints the units' states and the daemons' status on the console.

Checks: first boot succeeds offline, both daemons active, the link is up
over the emulated UART, the outer module dialled central through the
emulated modem, an API call from the host returns the service's result,
and a second boot changes no file the builder wrote.

What emulation cannot check (the Pi firmware, /dev/serial0 on the header,
overlays, real GPIO) is step 11 of the hardware acceptance checklist.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pi_image_factory import CMDLINE_TXT, CONFIG_TXT, TOOL_PATH

from central_stub import admin
from central_stub.testing import make_central
from provisioning.image.debugfs import Ext4
from provisioning.image.errors import ToolFailed
from provisioning.image.plan import Dir, File, Link, RootPlan
from provisioning.image.wheelhouse import PROJECT_ROOT, default_wheelhouse, make_wheelhouse
from provisioning.keys_cli import make_gateway

#: mmdebstrap on first use takes a few minutes; two boots of both VMs under
#: TCG about ten more.
pytestmark = [pytest.mark.boot, pytest.mark.slow, pytest.mark.timeout(1500)]

CACHE = PROJECT_ROOT / ".cache" / "boot"
ROOTFS = CACHE / "rootfs-bookworm-arm64"
PACKAGES = "systemd-sysv,udev,dbus,python3,nftables,linux-image-arm64,busybox-static,kmod,iproute2"
#: Modules the initramfs loads to reach the root (the rest load after switch_root).
INITRAMFS_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")
NUMBER = "5551234"
#: Bounds: one boot of either VM under TCG, and the whole scenario once booted.
BOOT_TIMEOUT_S = 420.0
SCENARIO_TIMEOUT_S = 300.0
NOW = int(time.time())


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=TOOL_PATH)


def _prerequisites() -> str | None:
    """Return why the boot test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap in root mode, root-owned files in the image)"
    for tool, package in (
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("qemu-aarch64-static", "qemu-user-static"),
    ):
        if _which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not binfmt.exists() or not binfmt.read_text().startswith("enabled"):
        return "the kernel has no enabled binfmt_misc handler for aarch64 (qemu-user-static)"
    wheelhouse = default_wheelhouse("3.11")
    if not any(wheelhouse.glob("*.whl")):
        try:
            make_wheelhouse(wheelhouse, "3.11")
        except ToolFailed as e:
            return f"no aarch64 wheelhouse, and it cannot be downloaded: {e}"
    return None


def run(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess[bytes]:
    exe = _which(argv[0]) or argv[0]
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv[0]}: {proc.stderr.decode(errors='replace')[-2000:]}"
    return proc


APT_SOURCES = Path("/etc/apt")


def host_debian_mirror(apt: Path = APT_SOURCES) -> str | None:
    """Return the Debian mirror this host's apt already uses for its main suite.

    Reads deb822 ``*.sources`` files and one-line ``sources.list`` entries and
    returns the first URI that is not a security or updates archive, or None.
    The root is built from the same mirror the host installs from, so the test
    needs no address of its own.
    """
    candidates: list[str] = []
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        stanza_uris: list[str] = []
        for raw in [*path.read_text(errors="replace").splitlines(), ""]:
            line = raw.strip()
            if not line:
                candidates += stanza_uris
                stanza_uris = []
            elif line.lower().startswith("uris:"):
                stanza_uris += line.split(":", 1)[1].split()
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append(words[1])
    for uri in candidates:
        if uri.startswith(("http://", "https://")) and "security" not in uri:
            return uri
    return None


def rootfs() -> Path:
    """Return the cached arm64 Debian root, building it with mmdebstrap on first use."""
    done = ROOTFS / ".optogate-complete"
    if done.exists():
        return ROOTFS
    shutil.rmtree(ROOTFS, ignore_errors=True)
    ROOTFS.parent.mkdir(parents=True, exist_ok=True)
    hook = (
        'chroot "$1" dpkg-divert --local --rename --add /usr/sbin/update-initramfs && '
        'printf "#!/bin/sh\\nexit 0\\n" > "$1/usr/sbin/update-initramfs" && '
        'chmod 755 "$1/usr/sbin/update-initramfs"'
    )
    argv = ["--architectures=arm64", "--variant=apt", "--mode=root", f"--include={PACKAGES}"]
    mirror = host_debian_mirror()
    if mirror is None:
        pytest.skip("the host's apt has no Debian mirror configured to build the arm64 root from")
    argv += [f"--essential-hook={hook}", "bookworm", str(ROOTFS), mirror]
    proc = subprocess.run(
        [_which("mmdebstrap") or "mmdebstrap", *argv],
        capture_output=True,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(ROOTFS, ignore_errors=True)
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        pytest.skip(
            "cannot build the arm64 Debian root (Debian's archive unreachable?): "
            + " | ".join(tail)
        )
    done.write_text("ok\n")
    return ROOTFS


# -- the initramfs ----------------------------------------------------------------

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod /lib/modules/$m; done
i=0
while [ ! -b /dev/vda2 ] && [ $i -lt 300 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda2 /newroot || /bin/busybox poweroff -f
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs(root: Path, dest: Path) -> tuple[Path, Path]:
    """Write kernel and initramfs for ``root`` under ``dest``; return their paths."""
    kernel = sorted(root.glob("boot/vmlinuz-*"))[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    mods = root / "lib" / "modules" / version
    deps: dict[str, list[str]] = {}
    for line in (mods / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def add(path: str) -> None:
        for dep in deps.get(path, []):
            add(dep)
        if path not in order:
            order.append(path)

    for name in INITRAMFS_MODULES:
        if name in by_name:
            add(by_name[name])
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""),
        ("lib", 0o40755, b""),
        ("lib/modules", 0o40755, b""),
        ("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()),
        ("init", 0o100755, INIT.encode()),
    ]
    names = []
    for path in order:
        data = (mods / path).read_bytes()
        if path.endswith(".xz"):
            data = lzma.decompress(data)
        name = Path(path).name.removesuffix(".xz")
        entries.append((f"lib/modules/{name}", 0o100644, data))
        names.append(name)
    entries.append(("modules.order", 0o100644, ("\n".join(names) + "\n").encode()))
    target = dest / "initrd.gz"
    target.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
    shutil.copyfile(kernel, dest / "vmlinuz")
    return dest / "vmlinuz", target


# -- the stock-shaped base image ----------------------------------------------------

PROBE = """#!/bin/sh
# test probe (part of the base image, not of the builder's output): reports
# on the console, and powers off cleanly when the host asks on its control port
ctl=/dev/virtio-ports/org.optogate.ctl
(
  while :; do
    if [ -e $ctl ] && read -r cmd < $ctl && [ "$cmd" = poweroff ]; then systemctl poweroff; fi
    sleep 2
  done
) &
while :; do
  s="firstboot=$(systemctl is-active optogate-firstboot.service)"
  s="$s outer=$(systemctl is-active optogate-outer.service)"
  s="$s inner=$(systemctl is-active optogate-inner.service)"
  s="$s system=$(systemctl is-system-running)"
  echo "PROBE $s" > /dev/hvc0
  for role in outer inner; do
    c=/etc/optogate/$role.toml
    if [ -f $c ]; then
      j=$(/usr/local/bin/optogate $role status --config $c --json 2>/dev/null | tr -d '\\n')
      echo "STATUS $role $j" > /dev/hvc0
    fi
  done
  sleep 5
done
"""
PROBE_UNIT = """[Unit]
Description=boot test probe
After=multi-user.target
[Service]
ExecStart=/usr/local/sbin/boot-probe
[Install]
WantedBy=multi-user.target
"""


def base_image(path: Path, work: Path) -> Path:
    """Assemble a stock-shaped image from the cached root; return it."""
    root = rootfs()
    work.mkdir(parents=True, exist_ok=True)
    boot, ext4 = work / "boot.fat", work / "root.ext4"
    run("mkfs.fat", "-F", "32", "-S", "512", "-s", "1", "-n", "BOOTFS", "-C", str(boot), "65536")
    for name, text in (("config.txt", CONFIG_TXT), ("cmdline.txt", CMDLINE_TXT)):
        (work / name).write_text(text)
        run("mcopy", "-i", str(boot), str(work / name), f"::/{name}")
    used = int(run("du", "-sbx", str(root)).stdout.split()[0])
    root_mib = used // 2**20 + 400
    run("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(root), str(ext4), f"{root_mib}M")
    extras = RootPlan(
        dirs=(Dir("/boot/firmware", 0o755), Dir("/etc/systemd/network", 0o755)),
        files=(
            # what Raspberry Pi OS's udev rules do for the PL011 on the header
            File(
                "/etc/udev/rules.d/99-serial0.rules",
                b'KERNEL=="ttyAMA0", SYMLINK+="serial0", GROUP="dialout", MODE="0660"\n',
                0o644,
            ),
            File(
                "/etc/systemd/network/50-lan.network",
                b"[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\n",
                0o644,
            ),
            File("/etc/hostname", b"debian\n", 0o644),
            File("/etc/hosts", b"127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n", 0o644),
            File("/usr/local/sbin/boot-probe", PROBE.encode(), 0o755),
            File("/etc/systemd/system/boot-probe.service", PROBE_UNIT.encode(), 0o644),
        ),
        links=(
            Link(
                "/etc/systemd/system/multi-user.target.wants/boot-probe.service",
                "/etc/systemd/system/boot-probe.service",
            ),
            Link(
                "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
                "/lib/systemd/system/systemd-networkd.service",
            ),
        ),
    )
    fs = Ext4(ext4, 0)
    fs.apply(extras, work)
    fs.verify(extras)
    boot_start, boot_sectors = 8192, 65536 * 2
    root_start, root_sectors = boot_start + boot_sectors, root_mib * 2048
    with path.open("wb") as f:
        f.truncate((root_start + root_sectors) * 512)
    for part, start in ((boot, boot_start), (ext4, root_start)):
        run(
            "dd",
            f"if={part}",
            f"of={path}",
            "bs=1M",
            f"seek={start // 2048}",
            "conv=notrunc,sparse",
            "status=none",
        )
    script = (
        f"label: dos\nstart={boot_start}, size={boot_sectors}, type=c\n"
        f"start={root_start}, size={root_sectors}, type=83\n"
    )
    subprocess.run(
        [_which("sfdisk") or "sfdisk", "-q", str(path)],
        input=script.encode(),
        check=True,
        capture_output=True,
        timeout=60,
    )
    boot.unlink()
    ext4.unlink()
    return path


# -- processes on the host ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Host processes of the scenario; every one is stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], *, stdout_pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        err = (self.logs / f"{name}.err").open("wb")
        out = subprocess.PIPE if stdout_pipe else (self.logs / f"{name}.out").open("wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))
        return proc

    def stop(self, name: str, timeout: float = 60) -> None:
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def stop_all(self) -> None:
        for name, _ in reversed(self.procs):
            self.stop(name, timeout=30)


def first_line_json(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the simulator exited before it was ready"
    doc = json.loads(line)
    assert isinstance(doc, dict)
    return doc


OPTOGATE = [sys.executable, "-m", "host_tools.cli"]


class Vm:
    """One qemu-system-aarch64 -M virt machine and its console log."""

    def __init__(
        self, procs: Processes, name: str, image: Path, kernel: Path, initrd: Path, extra: list[str]
    ) -> None:
        self.name = name
        self.console = procs.logs / f"{name}.console"
        self.control = procs.logs / f"{name}.ctl"
        self.console.unlink(missing_ok=True)
        argv = [
            _which("qemu-system-aarch64") or "qemu-system-aarch64",
            "-M",
            "virt",
            "-cpu",
            "cortex-a57",
            "-smp",
            "2",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            "root=/dev/vda2 rw console=hvc0 panic=-1 net.ifnames=0",
            "-drive",
            f"file={image},format=raw,if=none,id=disk",
            "-device",
            "virtio-blk-device,drive=disk",
            "-device",
            "virtio-serial-device",
            "-chardev",
            f"file,id=con,path={self.console}",
            "-device",
            "virtconsole,chardev=con",
            "-chardev",
            f"socket,id=ctl,path={self.control},server=on,wait=off",
            "-device",
            "virtserialport,chardev=ctl,name=org.optogate.ctl",
            *extra,
        ]
        self.proc = procs.start(name, argv)

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.text()[-3000:]}"
            time.sleep(2)
        pytest.fail(f"{self.name}: no {pattern!r} within {timeout:.0f} s:\n{self.text()[-4000:]}")

    def last_status(self, role: str) -> dict[str, object]:
        found = re.findall(rf"STATUS {role} (\{{.*\}})", self.text())
        return json.loads(found[-1]) if found else {}

    def power_down(self, timeout: float = 180) -> None:
        """Ask the guest to power off over its control port; wait for qemu to exit."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.control))
            # the connection stays open: a guest reading a port whose host end
            # is closed sees end of file, not data
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    s.sendall(b"poweroff\n")
                time.sleep(2)
        try:
            self.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not power off:\n{self.text()[-3000:]}")


def digests(image: Path) -> dict[str, str | None]:
    """Return sha256 of every file the builder wrote, and of firstboot.done, read from ``image``."""
    doc = json.loads(image.with_name(image.name + ".manifest.json").read_text())
    paths = [e["path"] for e in doc["entries"] if e["partition"] == "root" and e["type"] == "file"]
    paths.append("/var/lib/optogate/firstboot.done")
    table = json.loads(run("sfdisk", "--json", str(image)).stdout)["partitiontable"]
    fs = Ext4(image, table["partitions"][1]["start"] * 512)
    return {
        p: (hashlib.sha256(d).hexdigest() if d is not None else None)
        for p, d in fs.read_files(paths).items()
    }


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def test_both_modules_boot_link_dial_and_serve(tmp_path: Path, procs: Processes) -> None:
    why = _prerequisites()
    if why:
        pytest.skip(why)
    base = base_image(tmp_path / "debian-base.img", tmp_path / "base-work")
    kernel, initrd = initramfs(ROOTFS, tmp_path)

    # central, with the echo service, a licence and a client key; our gateway registered
    central = make_central(tmp_path / "central", now=NOW, gateways=0)
    gw = tmp_path / "gw-boot"
    make_gateway(
        "gw-boot",
        gw,
        central.root / "keys" / "central.pub",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
    )
    admin.register_gateway(
        central.repo,
        (gw / "gateway.json").read_bytes(),
        "acme",
        central_key_id=central.key.key_id,
        now=NOW,
        actor="test",
    )
    api_key = next(iter(central.api_keys.values()))

    # the builder, as an operator runs it
    images = {}
    for role, extra in (("outer", ["--dial", NUMBER, "--modem", "/dev/ttyUSB0"]), ("inner", [])):
        out = tmp_path / f"{role}.img"
        run(
            *OPTOGATE,
            "image",
            "build",
            "--base",
            str(base),
            "--role",
            role,
            "--gateway",
            str(gw),
            "--out",
            str(out),
            "--force",
            "--gpio",
            "none",
            "--grow",
            *extra,
        )
        images[role] = out
    base.unlink()

    answering = procs.start(
        "modem-central",
        [*OPTOGATE, "sim", "modem", "--answer", "--listen", "127.0.0.1:0", "--speed", "115200"],
        stdout_pipe=True,
    )
    answer = first_line_json(answering)
    listen = answer["listen"]
    host, port = listen.rsplit(":", 1) if isinstance(listen, str) else listen  # type: ignore[union-attr]
    toml = tmp_path / "central.toml"
    toml.write_text(
        f'[central]\nstate_dir = "{central.config.state_dir}"\nsync_expiry = "7d"\n\n'
        f'[[serial]]\nport = "{answer["port"]}"\n'
    )
    procs.start("central", [*OPTOGATE, "central", "--config", str(toml), "run"])
    calling = procs.start(
        "modem-outer",
        [
            *OPTOGATE,
            "sim",
            "modem",
            "--phonebook",
            f"{NUMBER}={host}:{port}",
            "--speed",
            "115200",
            "--dial-delay",
            "0.5",
        ],
        stdout_pipe=True,
    )
    modem_pty = first_line_json(calling)["port"]

    link_port, api_port = free_port(), free_port()
    digests_after: list[dict[str, str | None]] = []
    for boot in (1, 2):
        outer = Vm(
            procs,
            f"outer-{boot}",
            images["outer"],
            kernel,
            initrd,
            [
                "-serial",
                f"tcp:127.0.0.1:{link_port},server=on,wait=off",
                "-device",
                "qemu-xhci",
                "-chardev",
                f"serial,id=modem,path={modem_pty}",
                "-device",
                "usb-serial,chardev=modem",
                "-nic",
                "none",
            ],
        )
        time.sleep(1)
        inner = Vm(
            procs,
            f"inner-{boot}",
            images["inner"],
            kernel,
            initrd,
            [
                "-serial",
                f"tcp:127.0.0.1:{link_port},reconnect=1",
                "-netdev",
                f"user,id=lan,restrict=on,hostfwd=tcp:127.0.0.1:{api_port}-:8443",
                "-device",
                "virtio-net-device,netdev=lan",
            ],
        )
        # first boot: the first-boot unit ran; later boots: it is skipped (inactive)
        first = "active" if boot == 1 else "inactive"
        outer.wait_for(rf"PROBE firstboot={first} outer=active inner=\S+", BOOT_TIMEOUT_S)
        inner.wait_for(rf"PROBE firstboot={first} outer=\S+ inner=active", BOOT_TIMEOUT_S)
        # the link handshakes over the emulated UART
        inner.wait_for(r'STATUS inner \{.*"state": "up"', SCENARIO_TIMEOUT_S)
        if boot == 1:
            # an API call from the host reaches the inner module; the outer dials central
            result = subprocess.run(
                [
                    *OPTOGATE,
                    "call",
                    "echo",
                    "--param",
                    "text=hello",
                    "--json",
                    "--url",
                    f"https://127.0.0.1:{api_port}",
                    "--api-key",
                    api_key,
                    "--ca",
                    str(gw / "ca" / "ca.crt"),
                    "--max-wait",
                    str(SCENARIO_TIMEOUT_S),
                ],
                capture_output=True,
                timeout=SCENARIO_TIMEOUT_S + 60,
                check=False,
            )
            answer_doc = json.loads(result.stdout or b"{}")
            assert answer_doc.get("ok") is True, (
                result.stdout,
                result.stderr,
                inner.text()[-3000:],
                outer.text()[-3000:],
            )
            assert answer_doc["result"] == {"params": {"text": "hello"}}
            status = outer.last_status("outer")
            assert status.get("last_call.transport") == "dialup", status
        inner.power_down()
        outer.power_down()
        digests_after.append(
            digests(images["outer"])
            | {f"inner:{k}": v for k, v in digests(images["inner"]).items()}
        )
    # first boot finished; a second boot changed nothing the builder wrote
    assert all(digest is not None for digest in digests_after[0].values()), digests_after[0]
    assert digests_after[1] == digests_after[0]
