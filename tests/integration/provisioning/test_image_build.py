"""``optogate image build`` end to end on synthetic Pi OS images, through the real tools.

The images (Bookworm-like and Trixie-like: MBR, FAT32 boot, ext4 root) are
built once per module by :mod:`pi_image_factory` without loop devices.  Every
check reads the result back with the tools directly (sfdisk, debugfs, mtools,
e2fsck, fsck.fat), independently of the builder's own read-back.  These tests
leave the application out (``--skip-app``); test_image_app.py installs it
from a real aarch64 wheelhouse.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pi_image_factory import BOOKWORM, TRIXIE, Flavour, make_image

from provisioning.image import tools
from provisioning.image.bootconfig import BEGIN_MARKER
from provisioning.image_cli import main as image_main
from provisioning.keys_cli import main as keys_main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SBIN = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
PROG = "optogate image"


def sh(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv,
        capture_output=True,
        check=False,
        timeout=60,
        env={"PATH": SBIN, "MTOOLS_SKIP_CHECK": "1"},
    )


@dataclass(frozen=True)
class Env:
    root: Path
    central_ca: Path
    gateways: dict[str, Path]
    bookworm: Path
    trixie: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    for tool in ("sfdisk", "mcopy", "debugfs", "mkfs.fat", "mkfs.ext4", "fsck.fat", "e2fsck"):
        if shutil.which(tool, path=SBIN) is None:
            pytest.fail(f"{tool} is missing: run `make sysdeps`")
    root = tmp_path_factory.mktemp("image")
    assert keys_main(["init-central", str(root / "central")], "optogate keys") == 0
    gateways = {}
    for name in ("gw-a", "gw-b"):
        out = root / name
        assert (
            keys_main(
                [
                    "gateway",
                    name,
                    "--out",
                    str(out),
                    "--central-pub",
                    str(root / "central" / "central.pub"),
                ],
                "optogate keys",
            )
            == 0
        )
        gateways[name] = out
    ca = root / "central-ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return Env(
        root,
        ca,
        gateways,
        make_image(root / "bookworm.img", BOOKWORM, work=root / "w-bookworm"),
        make_image(root / "trixie.img", TRIXIE, work=root / "w-trixie"),
    )


def build(env: Env, base: Path, role: str, out: Path, *extra: str, gateway: str = "gw-a") -> int:
    args = [
        "build",
        "--base",
        str(base),
        "--role",
        role,
        "--gateway",
        str(env.gateways[gateway]),
        "--out",
        str(out),
        "--skip-app",
        *extra,
    ]
    if role == "outer" and "--dial" not in extra:
        args += ["--central", "central.example.com:7443", "--central-ca", str(env.central_ca)]
    return image_main(args, PROG)


def layout(image: Path) -> dict[str, int]:
    doc = json.loads(sh("sfdisk", "--json", str(image)).stdout)["partitiontable"]
    parts = doc["partitions"]
    return {
        "boot": parts[0]["start"] * 512,
        "root": parts[1]["start"] * 512,
        "root_size": parts[1]["size"] * 512,
        "boot_size": parts[0]["size"] * 512,
    }


def fat_file(image: Path, name: str) -> bytes:
    out = sh("mtype", "-i", f"{image}@@{layout(image)['boot']}", f"::/{name}")
    assert out.returncode == 0, out.stderr
    return out.stdout


def root_listing(image: Path, directory: str) -> dict[str, tuple[int, int, int]]:
    out = sh("debugfs", "-R", f"ls -p {directory}", f"{image}?offset={layout(image)['root']}")
    entries = {}
    for line in out.stdout.decode().splitlines():
        parts = line.split("/")
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            entries[parts[5]] = (int(parts[2], 8), int(parts[3]), int(parts[4]))
    return entries


def root_file(image: Path, path: str) -> bytes:
    out = sh("debugfs", "-R", f"cat {path}", f"{image}?offset={layout(image)['root']}")
    return out.stdout


def manifest(image: Path) -> dict[str, object]:
    return json.loads(image.with_name(image.name + ".manifest.json").read_text())


def nothing_written(directory: Path, before: set[str]) -> bool:
    return {p.name for p in directory.iterdir()} == before


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_outer_bookworm_image(env: Env, outdir: Path) -> None:
    out = outdir / "outer.img"
    assert (
        build(
            env,
            env.bookworm,
            "outer",
            out,
            "--dial",
            "5551234",
            "--central",
            "central.example.com:7443",
            "--central-ca",
            str(env.central_ca),
        )
        == 0
    )
    assert out.stat().st_mode & 0o777 == 0o600
    # the partition table is the base image's, unchanged
    assert sh("sfdisk", "--json", str(out)).stdout.replace(str(out).encode(), b"") == sh(
        "sfdisk", "--json", str(env.bookworm)
    ).stdout.replace(str(env.bookworm).encode(), b"")
    doc = manifest(out)
    assert doc["base"]["sha256"] == hashlib.sha256(env.bookworm.read_bytes()).hexdigest()  # type: ignore[index]
    assert doc["release"] == {"name": "2024-11-19 bookworm", "python": "3.11", "known": True}
    # every file in the manifest reads back byte for byte, with its mode and owner
    entries = doc["entries"]
    assert isinstance(entries, list)
    root_files = [e for e in entries if e["partition"] == "root" and e["type"] == "file"]
    assert len(root_files) >= 15
    for e in root_files:
        data = root_file(out, e["path"])
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e["path"]
        parent, name = e["path"].rsplit("/", 1)
        mode, uid, gid = root_listing(out, parent)[name]
        assert (mode & 0o7777, uid, gid) == (int(e["mode"], 8), e["uid"], e["gid"]), e["path"]
    keys = root_listing(out, "/etc/optogate/keys/outer")
    assert keys["signing.key"] == (0o100600, 999, 999)  # the outer daemon's user
    assert set(keys) == {p.name for p in (env.gateways["gw-a"] / "outer").iterdir()}
    assert root_listing(out, "/etc/optogate/keys")["outer"][0] == 0o040700
    for e in entries:
        if e["partition"] == "boot":
            assert hashlib.sha256(fat_file(out, e["path"][1:])).hexdigest() == e["sha256"]
    # the key files are the gateway directory's
    assert (
        root_file(out, "/etc/optogate/keys/outer/signing.key")
        == (env.gateways["gw-a"] / "outer" / "signing.key").read_bytes()
    )
    assert "hpke.key" not in root_listing(out, "/etc/optogate/keys/outer")
    assert root_listing(out, "/etc/optogate/keys").keys() == {"outer"}
    # the service user, in dialout and gpio
    group = root_file(out, "/etc/group").decode()
    assert "dialout:x:20:pi,optogate" in group
    assert "gpio:x:997:pi,optogate" in group
    # units enabled by their links; hciuart and ModemManager masked
    wants = root_listing(out, "/etc/systemd/system/multi-user.target.wants")
    assert wants["optogate-outer.service"][0] == 0o120777
    system = root_listing(out, "/etc/systemd/system")
    assert system["ModemManager.service"][0] == 0o120777
    assert system["hciuart.service"][0] == 0o120777
    toml = root_file(out, "/etc/optogate/outer.toml").decode()
    assert 'order = ["internet", "dialup"]' in toml
    # boot files
    config = fat_file(out, "config.txt").decode()
    assert config.count(BEGIN_MARKER) == 1
    assert config.splitlines()[-4:-1] == ["[all]", "enable_uart=1", "dtoverlay=disable-bt"]
    assert config.startswith(fat_file(env.bookworm, "config.txt").decode().rstrip("\n"))
    cmdline = fat_file(out, "cmdline.txt").decode()
    assert cmdline.count("\n") == 1
    assert "serial0" not in cmdline
    assert cmdline.split() == [
        w
        for w in fat_file(env.bookworm, "cmdline.txt").decode().split()
        if not w.startswith("console=serial0")
    ]
    assert_clean(out, outdir)
    assert_no_private_key_on_fat(out, outdir)


def assert_clean(image: Path, work: Path) -> None:
    where = layout(image)
    fsck = sh("e2fsck", "-fn", f"{image}?offset={where['root']}")
    assert fsck.returncode == 0, fsck.stdout
    boot = work / "boot.part"
    with image.open("rb") as src, boot.open("wb") as dst:
        src.seek(where["boot"])
        dst.write(src.read(where["boot_size"]))
    fat = sh("fsck.fat", "-n", str(boot))
    assert fat.returncode == 0, fat.stdout
    boot.unlink()


def assert_no_private_key_on_fat(image: Path, work: Path) -> None:
    dest = work / "fat-copy"
    dest.mkdir()
    tools.fat_copy_all(image, layout(image)["boot"], dest)
    names = [p for p in dest.rglob("*") if p.is_file()]
    assert {p.name for p in names} >= {"config.txt", "cmdline.txt"}
    for p in names:
        assert b"PRIVATE KEY" not in p.read_bytes(), p
    shutil.rmtree(dest)


def test_inner_trixie_image(env: Env, outdir: Path) -> None:
    out = outdir / "inner.img"
    assert build(env, env.trixie, "inner", out, "--board", "pi5", "--api-port", "9443") == 0
    doc = manifest(out)
    assert doc["release"] == {"name": "2025-10-01 trixie", "python": "3.13", "known": True}
    keys = root_listing(out, "/etc/optogate/keys/inner")
    assert {n for n, (mode, _, _) in keys.items() if mode & 0o777 == 0o600} == {
        "hpke.key",
        "signing.key",
        "tls.key",
    }
    assert root_listing(out, "/etc/optogate/keys").keys() == {"inner"}
    assert {(uid, gid) for _, uid, gid in keys.values()} == {(0, 0)}  # the inner daemon is root
    rules = root_file(out, "/etc/optogate/inner-firewall.nft").decode()
    assert "tcp dport 9443 accept" in rules
    sysinit = root_listing(out, "/etc/systemd/system/sysinit.target.wants")
    assert {"optogate-firewall.service", "optogate-firstboot.service"} <= sysinit.keys()
    inner_toml = root_file(out, "/etc/optogate/inner.toml").decode()
    assert 'device = "/dev/ttyAMA0"' in inner_toml
    assert "dtparam=uart0=on" in fat_file(out, "config.txt").decode()
    assert "ModemManager.service" not in root_listing(out, "/etc/systemd/system")
    assert root_file(out, "/etc/hostname") == b"gw-a-inner\n"
    assert_clean(out, outdir)
    assert_no_private_key_on_fat(out, outdir)


def test_rebuild_from_a_built_image_changes_nothing(env: Env, outdir: Path) -> None:
    first, second = outdir / "first.img", outdir / "second.img"
    assert build(env, env.bookworm, "inner", first) == 0
    assert build(env, first, "inner", second) == 0
    for name in ("config.txt", "cmdline.txt"):
        assert fat_file(second, name) == fat_file(first, name)
    assert fat_file(second, "config.txt").count(BEGIN_MARKER.encode()) == 1

    def comparable(image: Path) -> list[dict[str, object]]:
        return [e for e in manifest(image)["entries"] if e["path"] != "/etc/optogate/image.json"]  # type: ignore[union-attr]

    assert comparable(second) == comparable(first)
    for path in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/hosts"):
        assert root_file(second, path) == root_file(first, path)
    assert_clean(second, outdir)


def test_two_gateways_get_distinct_identities(env: Env, outdir: Path) -> None:
    a, b = outdir / "a.img", outdir / "b.img"
    assert build(env, env.bookworm, "inner", a, gateway="gw-a") == 0
    assert build(env, env.bookworm, "inner", b, gateway="gw-b") == 0
    for path in ("hpke.key", "signing.key", "tls.key", "tls.crt", "identity.json"):
        full = f"/etc/optogate/keys/inner/{path}"
        assert root_file(a, full) != root_file(b, full), path
        assert root_file(b, full) == (env.gateways["gw-b"] / "inner" / path).read_bytes()
    assert root_file(a, "/etc/hostname") != root_file(b, "/etc/hostname")


def test_xz_base_image(env: Env, outdir: Path) -> None:
    xz = outdir / "base.img.xz"
    xz.write_bytes(lzma.compress(env.bookworm.read_bytes(), preset=0))
    out = outdir / "outer.img"
    assert build(env, xz, "outer", out) == 0
    base = manifest(out)["base"]
    assert base == {
        "file": "base.img.xz",
        "sha256": hashlib.sha256(xz.read_bytes()).hexdigest(),
        "image_sha256": hashlib.sha256(env.bookworm.read_bytes()).hexdigest(),
    }
    assert out.stat().st_size == env.bookworm.stat().st_size
    assert_clean(out, outdir)


def test_grow_when_the_root_is_too_small(
    env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = make_image(outdir / "small.img", BOOKWORM, work=outdir / "w", root_mib=24)
    before = {p.name for p in outdir.iterdir()}
    out = outdir / "grown.img"
    assert build(env, small, "inner", out) == 1
    assert "--grow" in capsys.readouterr().err
    assert nothing_written(outdir, before)
    assert build(env, small, "inner", out, "--grow") == 0
    grown, base = layout(out), layout(small)
    assert (grown["boot"], grown["boot_size"], grown["root"]) == (
        base["boot"],
        base["boot_size"],
        base["root"],
    )
    assert grown["root_size"] > base["root_size"]
    assert manifest(out)["grown"] is True
    assert_clean(out, outdir)


# -- refusals: a typed error, exit 1, and nothing written -------------------------------


def refused(
    env: Env,
    base: Path,
    outdir: Path,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    role: str = "inner",
    match: str,
) -> None:
    before = {p.name for p in outdir.iterdir()}
    assert build(env, base, role, outdir / "x.img", *extra) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert nothing_written(outdir, before)


def variant(outdir: Path, flavour: Flavour = BOOKWORM, **kwargs: object) -> Path:
    return make_image(outdir.parent / "variant.img", flavour, work=outdir.parent / "wv", **kwargs)  # type: ignore[arg-type]


def test_corrupt_mbr(env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = outdir.parent / "bad.img"
    shutil.copyfile(env.bookworm, bad)
    with bad.open("r+b") as f:
        f.write(b"\0" * 512)
    refused(env, bad, outdir, capsys, match="partition table")


def test_truncated_image(env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = outdir.parent / "cut.img"
    with env.bookworm.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(60 * 2**20))
    refused(env, cut, outdir, capsys, match="truncated")


def test_not_an_image(env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = outdir.parent / "junk.img.xz"
    junk.write_bytes(b"not xz at all" * 100)
    refused(env, junk, outdir, capsys, match="not a valid .xz")


def test_root_partition_not_ext4(
    env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = outdir.parent / "noext4.img"
    shutil.copyfile(env.bookworm, bad)
    with bad.open("r+b") as f:
        f.seek(layout(bad)["root"])
        f.write(b"\xff" * 8192)
    refused(env, bad, outdir, capsys, match="not ext4")


def test_unknown_release_refused_unless_forced(
    env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = variant(outdir, rpi_issue=False)
    refused(env, plain, outdir, capsys, match="--force")
    assert build(env, plain, "inner", outdir / "forced.img", "--force") == 0
    assert manifest(outdir / "forced.img")["release"]["known"] is False  # type: ignore[index]


def test_unknown_debian_refused_even_forced(
    env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = variant(outdir, Flavour("bullseye", "11", "3.9", "2023-05-03"))
    refused(env, old, outdir, capsys, "--force", match="bullseye")


def test_missing_os_packages(env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = variant(outdir, packages=("python3",))
    refused(env, bare, outdir, capsys, match="python3-rpi-lgpio")
    refused(env, bare, outdir, capsys, "--gpio", "none", match="nftables")
    assert build(env, bare, "outer", outdir / "o.img", "--gpio", "none") == 0


def test_bad_boot_files(env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(
        env,
        variant(outdir, config_txt=f"a=1\n{BEGIN_MARKER}\nenable_uart=1\n"),
        outdir,
        capsys,
        match="no end marker",
    )
    refused(
        env,
        variant(outdir, cmdline_txt="root=x\nquiet\n"),
        outdir,
        capsys,
        match="more than one line",
    )


def test_bad_gateway_and_options(
    env: Env, outdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name for p in outdir.iterdir()}
    args = ["build", "--base", str(env.bookworm), "--out", str(outdir / "x.img"), "--skip-app"]
    assert image_main([*args, "--role", "inner", "--gateway", str(outdir)], PROG) == 1
    assert "not a gateway directory" in capsys.readouterr().err
    assert image_main([*args, "--role", "outer", "--gateway", str(env.gateways["gw-a"])], PROG) == 1
    assert "--central HOST:PORT" in capsys.readouterr().err
    assert (
        image_main(
            [*args, "--role", "inner", "--gateway", str(env.gateways["gw-a"]), "--dial", "123"],
            PROG,
        )
        == 1
    )
    assert "outer module" in capsys.readouterr().err
    assert (
        image_main(
            [*args, "--role", "inner", "--gateway", str(env.gateways["gw-a"]), "--baud", "0"], PROG
        )
        == 1
    )
    assert "baud" in capsys.readouterr().err
    assert nothing_written(outdir, before)


def test_missing_host_tool(
    env: Env, outdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PATH with every tool but debugfs, and no sbin fallback.
    bindir = outdir.parent / "bin"
    bindir.mkdir()
    for tool in ("sfdisk", "mcopy", "mdir", "mtype", "e2fsck"):
        found = shutil.which(tool, path=SBIN)
        assert found is not None
        (bindir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(tools, "_SBIN", ())
    refused(env, env.bookworm, outdir, capsys, match="apt-get install e2fsprogs")
