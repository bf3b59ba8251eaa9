"""``build``: one SD image for one module of one gateway, from a stock Pi OS image.

The steps, each of which can refuse with a typed error before the output
exists (the image is assembled under a temporary name beside ``--out`` and
renamed only when everything has been written and read back):

1. Check the host tools, the gateway directory and the site settings.
2. Copy the base image (decompressing ``.img.xz``) to the temporary file,
   mode 0600, hashing both the given file and the image, skipping zero
   blocks so the copy stays sparse.
3. Read the MBR with ``sfdisk`` and check it is a Pi OS layout.
4. Read config.txt and cmdline.txt with mtools and compute their edits.
5. Read the root partition with debugfs: release, Python, packages,
   account files; choose the service user's uid.
6. Install the application for the image's Python from the wheelhouse
   (unless ``skip_app``), and plan every file of the root partition.
7. Check the free space; with ``grow``, extend the image, the root
   partition and its file system first.
8. Write the plan with debugfs and read all of it back; write the boot
   files with mtools and read them back; check that the partition table is
   unchanged (or only the root partition grew) and ``e2fsck -fn`` is clean.
9. Write the manifest, then rename the image into place.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import lzma
import os
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from firmware.common.errors import ConfigError
from provisioning.gateway_file import GatewayFileError, read_gateway_description
from provisioning.image import bootconfig, releases, tools
from provisioning.image.accounts import AccountFiles, add_service_user
from provisioning.image.debugfs import Ext4
from provisioning.image.errors import (
    BootFileError,
    ImageError,
    ImageInputError,
    NoSpace,
    PartitionTableError,
    ReadBackMismatch,
    ToolFailed,
)
from provisioning.image.manifest import BaseImage, build_manifest, id_names, manifest_bytes
from provisioning.image.partitions import PiLayout, parse_sfdisk_json
from provisioning.image.plan import (
    ROLES,
    AppTree,
    GatewayKeys,
    RootPlan,
    Site,
    config_tables,
    root_plan,
    toml_document,
)
from provisioning.image.wheelhouse import default_wheelhouse, install_app

#: Files every key directory must hold for its daemon to start.
REQUIRED_KEYS: Final = {
    "outer": ("signing.key", "central.pub", "identity.json"),
    "inner": ("hpke.key", "signing.key", "tls.key", "tls.crt", "central.pub", "identity.json"),
}
#: Left free on the root partition after writing: the first boot's journal,
#: byte-compiled modules and the daemons' first state must still fit.
SPACE_MARGIN: Final = 32 * 2**20
#: ``--grow`` adds what is missing plus this, rounded up to a MiB, so the
#: next re-run on the output does not need to grow again.
GROW_HEADROOM: Final = 64 * 2**20
#: Copy and hash in chunks of this size: large enough for throughput,
#: and the unit in which zero runs are skipped to keep the copy sparse.
CHUNK: Final = 4 * 2**20
#: Marks of a private key: no file with one may reach the FAT partition.
PRIVATE_MARKS: Final = (b"PRIVATE KEY", b"PRIVATE-KEY")

Progress = Callable[[str], None]
CopyProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class BuildRequest:
    """What ``optogate image build`` was asked to do."""

    base: Path
    role: str
    gateway_dir: Path
    out: Path
    site: Site = field(default_factory=Site)
    wheelhouse: Path | None = None
    skip_app: bool = False
    force: bool = False
    grow: bool = False


@dataclass(frozen=True)
class BuildResult:
    """What was built: the image, its manifest, and the manifest's content."""

    image: Path
    manifest: Path
    document: dict[str, object]


def _quiet(_: str) -> None:
    pass


def _read_keys(request: BuildRequest) -> tuple[str, GatewayKeys]:
    if request.role not in ROLES:
        raise ImageInputError(f"--role must be outer or inner, not {request.role!r}")
    try:
        desc = read_gateway_description(request.gateway_dir / "gateway.json")
    except GatewayFileError as e:
        raise ImageInputError(f"{request.gateway_dir} is not a gateway directory: {e}") from e
    key_dir = request.gateway_dir / request.role
    missing = [n for n in REQUIRED_KEYS[request.role] if not (key_dir / n).is_file()]
    if missing:
        raise ImageInputError(f"{key_dir} lacks {', '.join(missing)}: run `optogate keys gateway`")
    files: dict[str, bytes] = {}
    for path in sorted(key_dir.iterdir()):
        if not path.is_file() or path.is_symlink():
            raise ImageInputError(f"{path} is not a regular file")
        files[path.name] = path.read_bytes()
    return desc.gateway, GatewayKeys(desc.gateway, request.role, files)


def _check_config(role: str, site: Site) -> None:
    """Check the generated TOML with the daemon's own loader; raise ImageInputError."""
    parsed = tomllib.loads(toml_document(config_tables(role, site)))
    try:
        if role == "outer":
            from firmware.outer.config import parse_config as parse_outer

            parse_outer(parsed, Path("/etc/optogate"))
        else:
            from firmware.inner.config import parse_config as parse_inner

            parse_inner(parsed, Path("/etc/optogate"))
    except ConfigError as e:
        raise ImageInputError(f"the {role}.toml these options give is invalid: {e}") from e


def _copy_base(base: Path, dest: Path, progress: CopyProgress) -> BaseImage:
    """Copy (and decompress) ``base`` into the new file ``dest``; return its digests."""
    file_hash, image_hash = hashlib.sha256(), hashlib.sha256()
    total = base.stat().st_size
    done = 0
    compressed = base.name.endswith(".xz")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with base.open("rb") as raw, os.fdopen(fd, "wb") as out:
            decoder = lzma.LZMADecompressor() if compressed else None
            size = 0
            while chunk := raw.read(CHUNK):
                file_hash.update(chunk)
                done += len(chunk)
                if decoder is not None:
                    try:
                        chunk = decoder.decompress(chunk)
                    except lzma.LZMAError as e:
                        raise ImageInputError(f"{base.name} is not a valid .xz file: {e}") from e
                image_hash.update(chunk)
                for i in range(0, len(chunk), CHUNK):
                    piece = chunk[i : i + CHUNK]
                    if piece.count(0) == len(piece):
                        out.seek(len(piece), os.SEEK_CUR)
                    else:
                        out.write(piece)
                    size += len(piece)
                progress(done, total)
            if decoder is not None and not decoder.eof:
                raise ImageInputError(f"{base.name} is truncated: the .xz stream does not end")
            out.truncate(size)
    except OSError as e:
        raise ImageInputError(f"cannot copy {base}: {e}") from e
    if size == 0:
        raise PartitionTableError(f"{base.name} is empty")
    return BaseImage(base.name, file_hash.hexdigest(), image_hash.hexdigest())


def _read_root(fs: Ext4, paths: list[str]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for path, data in fs.read_files(paths).items():
        texts[path] = "" if data is None else data.decode("utf-8", errors="replace")
    return texts


def _space_needed(plan: RootPlan, block: int) -> int:
    blocks = len(plan.dirs) + len(plan.links)
    for f in plan.files:
        blocks += -(-len(f.data) // block) + 1  # data plus, for large files, extent blocks
    return blocks * block


def _grow(image: Path, layout: PiLayout, fs: Ext4, missing: int, progress: Progress) -> PiLayout:
    extra = -(-(missing + GROW_HEADROOM) // 2**20) * 2**20
    progress(f"growing the root partition by {extra // 2**20} MiB")
    with image.open("r+b") as f:
        f.truncate(max(image.stat().st_size, layout.root.end) + extra)
    tools.grow_partition(image, layout.root.number)
    grown = parse_sfdisk_json(tools.read_partition_table(image), image.stat().st_size)
    tools.resize_ext4(image, fs.offset, grown.root.sectors)
    return grown


def build(
    request: BuildRequest,
    *,
    progress: Progress = _quiet,
    copy_progress: CopyProgress | None = None,
    now: datetime.datetime | None = None,
) -> BuildResult:
    """Build the image ``request`` describes; return where it and its manifest are.

    Raises an :class:`ImageError` subclass (nothing is left at ``request.out``
    or beside it): ImageInputError, PartitionTableError, BootFileError,
    UnknownRelease, NoSpace, HostToolMissing, ToolFailed, ReadBackMismatch.
    """
    commands = ["sfdisk", "mcopy", "mdir", "debugfs", "e2fsck"]
    for command in [*commands, *(["resize2fs"] if request.grow else [])]:
        tools.require(command)
    if not request.base.is_file():
        raise ImageInputError(f"no base image at {request.base}")
    out = request.out
    if not out.parent.is_dir():
        raise ImageInputError(f"{out.parent} is not a directory")
    if out.resolve() == request.base.resolve():
        raise ImageInputError("--out must not be the base image")
    gateway, keys = _read_keys(request)
    _check_config(request.role, request.site)

    manifest_path = out.with_name(out.name + ".manifest.json")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        progress(f"copying {request.base.name}")
        base = _copy_base(request.base, tmp, copy_progress or (lambda _d, _t: None))
        document = _build_into(tmp, request, gateway, keys, base, progress, now)
        progress("writing the manifest")
        manifest_tmp = manifest_path.with_name(manifest_path.name + ".partial")
        manifest_tmp.write_bytes(manifest_bytes(document))
        manifest_tmp.chmod(0o644)
        os.replace(manifest_tmp, manifest_path)
        tmp.chmod(0o600)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        manifest_path.with_name(manifest_path.name + ".partial").unlink(missing_ok=True)
        raise
    return BuildResult(out, manifest_path, document)


def _build_into(
    image: Path,
    request: BuildRequest,
    gateway: str,
    keys: GatewayKeys,
    base: BaseImage,
    progress: Progress,
    now: datetime.datetime | None,
) -> dict[str, object]:
    progress("reading the partition table")
    table_before = tools.read_partition_table(image)
    layout = parse_sfdisk_json(table_before, image.stat().st_size)

    progress("reading the boot partition")
    try:
        tools.fat_check(image, layout.boot.offset)
    except ToolFailed as e:
        raise PartitionTableError(f"partition {layout.boot.number} is not a FAT file system") from e
    boot_old: dict[str, bytes] = {}
    for name in ("config.txt", "cmdline.txt"):
        data = tools.fat_read(image, layout.boot.offset, name)
        if data is None:
            raise BootFileError(f"the boot partition has no {name}: not a Raspberry Pi OS image")
        boot_old[name] = data
    boot_new = {
        "config.txt": bootconfig.edit_config_txt(boot_old["config.txt"], request.site.board),
        "cmdline.txt": bootconfig.edit_cmdline_txt(boot_old["cmdline.txt"]),
    }
    for name, data in boot_new.items():
        if any(mark in data for mark in PRIVATE_MARKS):
            raise BootFileError(f"{name} would carry a private key onto the FAT partition")

    progress("reading the root partition")
    fs = Ext4(image, layout.root.offset)
    try:
        fs.check_open()
    except ToolFailed as e:
        raise PartitionTableError(f"partition {layout.root.number} is not ext4: {e}") from e
    etc = _read_root(
        fs,
        [
            "/etc/os-release",
            "/usr/lib/os-release",
            "/etc/rpi-issue",
            "/etc/passwd",
            "/etc/group",
            "/etc/shadow",
            "/etc/gshadow",
            "/etc/hosts",
            "/var/lib/dpkg/status",
        ],
    )
    os_release = etc["/etc/os-release"] or etc["/usr/lib/os-release"]
    release = releases.identify(os_release, etc["/etc/rpi-issue"] or None, force=request.force)
    known = release in releases.RELEASES
    python = release.codename.python
    usr_lib = fs.list_dirs(["/usr/lib"])["/usr/lib"] or {}
    if f"python{python}" not in usr_lib:
        raise ImageInputError(
            f"{release.name} should ship Python {python}, but /usr/lib/python{python} is missing"
        )
    installed = releases.installed_packages(etc["/var/lib/dpkg/status"])
    needed: list[tuple[str, ...]] = []
    if request.site.gpio_backend == "rpigpio":
        needed.append(releases.GPIO_PACKAGES)
    if request.role == "inner":
        needed.append((releases.FIREWALL_PACKAGE,))
    for alternatives in needed:
        if not installed.intersection(alternatives):
            raise ImageInputError(
                f"the base image lacks {' or '.join(alternatives)}; use a Raspberry Pi OS image "
                "that includes it (Lite does)"
            )
    if not etc["/etc/passwd"] or not etc["/etc/group"]:
        raise ImageInputError("the base image has no /etc/passwd or /etc/group")
    account = add_service_user(
        AccountFiles(etc["/etc/passwd"], etc["/etc/group"], etc["/etc/shadow"], etc["/etc/gshadow"])
    )
    shadow_gid = next(
        (gid for gid, name in id_names(account.files.group).items() if name == "shadow"), 0
    )

    app: AppTree | None = None
    if not request.skip_app:
        wheelhouse = request.wheelhouse or default_wheelhouse(python)
        progress(f"installing the application for Python {python} (aarch64) from {wheelhouse}")
        app = install_app(wheelhouse, python)

    when = (now or datetime.datetime.now(datetime.UTC)).replace(microsecond=0)
    tool = f"optogate {_version()}"
    build_info = {
        "gateway": gateway,
        "role": request.role,
        "board": request.site.board,
        "release": release.name,
        "base_sha256": base.sha256,
        "built": when.isoformat(),
        "tool": tool,
        "application": app is not None,
    }
    plan = root_plan(
        keys=keys,
        site=request.site,
        account=account,
        shadow_gid=shadow_gid,
        hosts=etc["/etc/hosts"],
        build_info=build_info,
        app=app,
    )

    progress("checking free space")
    stats = fs.stats()
    needed_bytes = _space_needed(plan, stats.block_size) + SPACE_MARGIN - fs.reclaimed(plan)
    inodes = len(plan.dirs) + len(plan.files) + len(plan.links)
    grown = False
    if needed_bytes > stats.available or inodes > stats.free_inodes:
        missing = needed_bytes - stats.available
        if not request.grow:
            raise NoSpace(
                f"the root partition has {stats.available // 2**20} MiB free and "
                f"{stats.free_inodes} inodes; this build needs {needed_bytes // 2**20} MiB and "
                f"{inodes} inodes: pass --grow to enlarge the image"
            )
        layout = _grow(image, layout, fs, max(missing, 0), progress)
        grown = True
        stats = fs.stats()
        if needed_bytes > stats.available or inodes > stats.free_inodes:
            raise NoSpace("the root file system is still too small after growing")

    progress(f"writing {len(plan.files)} files to the root partition")
    with tempfile.TemporaryDirectory(prefix="optogate-stage-") as staging:
        fs.apply(plan, Path(staging))
    progress("reading the root partition back")
    fs.verify(plan)

    progress("writing config.txt and cmdline.txt")
    for name, data in boot_new.items():
        tools.fat_write(image, layout.boot.offset, name, data)
        if tools.fat_read(image, layout.boot.offset, name) != data:
            raise ReadBackMismatch(f"{name} does not read back byte for byte")

    progress("checking the result")
    after = parse_sfdisk_json(tools.read_partition_table(image), image.stat().st_size)
    if not grown and after != layout:
        raise ReadBackMismatch("the partition table changed")
    if grown and (after.boot != layout.boot or after.root.start != layout.root.start):
        raise ReadBackMismatch("growing moved a partition")
    proc = tools.run(["e2fsck", "-fn", fs.spec], check=False)
    if proc.returncode != 0:
        raise ToolFailed(f"e2fsck found errors on the written root file system: {proc.stdout!r}")

    return build_manifest(
        tool=tool,
        created=when.isoformat(),
        gateway=gateway,
        role=request.role,
        board=request.site.board,
        release=release,
        release_known=known,
        base=base,
        layout=after,
        grown=grown,
        plan=plan,
        boot_files=boot_new,
        users=id_names(account.files.passwd),
        groups=id_names(account.files.group),
    )


def _version() -> str:
    try:
        return importlib.metadata.version("optogate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__all__ = ["BuildRequest", "BuildResult", "ImageError", "build"]
