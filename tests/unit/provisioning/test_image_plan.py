"""The root partition's plan: configuration, keys, units, links, per role."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from firmware.inner.config import parse_config as parse_inner
from firmware.outer.config import parse_config as parse_outer
from provisioning.image.accounts import AccountFiles, ServiceAccount
from provisioning.image.errors import ImageInputError
from provisioning.image.manifest import BaseImage, build_manifest
from provisioning.image.partitions import parse_sfdisk_json
from provisioning.image.plan import (
    AppTree,
    GatewayKeys,
    RootPlan,
    Site,
    config_tables,
    firewall_rules,
    hosts_with_name,
    root_plan,
    toml_document,
)
from provisioning.image.releases import RELEASES

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ACCOUNT = ServiceAccount(AccountFiles("p\n", "g\n", "s\n", "gs\n"), 999, 998)
SITE = Site(central_host="central.example.com", central_ca=b"CA", dial_number="5551234")
OUTER_KEYS = {
    "signing.key": b"-----BEGIN PRIVATE KEY-----",
    "signing.pub": b"pub",
    "central.pub": b"c",
    "identity.json": b"{}",
}
INNER_KEYS = {
    "hpke.key": b"h",
    "hpke.pub": b"hp",
    "signing.key": b"s",
    "tls.key": b"t",
    "tls.crt": b"tc",
    "tls-ca.crt": b"ca",
    "central.pub": b"c",
    "identity.json": b"{}",
}


def plan(role: str, site: Site = SITE, app: AppTree | None = None) -> RootPlan:
    keys = GatewayKeys("gw-1", role, OUTER_KEYS if role == "outer" else INNER_KEYS)
    return root_plan(
        keys=keys,
        site=site,
        account=ACCOUNT,
        shadow_gid=42,
        hosts="127.0.0.1 localhost\n127.0.1.1 raspberrypi\n",
        build_info={"gateway": "gw-1"},
        app=app,
    )


def files(p: RootPlan) -> dict[str, bytes]:
    return {f.path: f.data for f in p.files}


def test_configs_load_with_the_daemons_own_loaders() -> None:
    outer = parse_outer(tomllib.loads(toml_document(config_tables("outer", SITE))), Path("/etc"))
    assert outer.policy.order == ("internet", "dialup")
    assert outer.optical_device == "/dev/serial0"
    assert outer.keys_dir == Path("/etc/optogate/keys/outer")
    assert outer.gpio.backend == "rpigpio"
    inner = parse_inner(tomllib.loads(toml_document(config_tables("inner", SITE))), Path("/etc"))
    assert inner.api.port == 8443
    assert inner.link.device == "/dev/serial0"
    assert inner.keys_dir == Path("/etc/optogate/keys/inner")


def test_outer_needs_a_way_to_central() -> None:
    with pytest.raises(ImageInputError, match="--central"):
        config_tables("outer", Site())
    with pytest.raises(ImageInputError, match="--central-ca"):
        config_tables("outer", Site(central_host="c.example"))
    with pytest.raises(ImageInputError):
        config_tables("middle", SITE)


def test_keys_private_0600_owned_by_the_daemons_user() -> None:
    # the outer daemon runs as the service user, the inner one as root
    for role, names, owner in (("outer", OUTER_KEYS, (999, 998)), ("inner", INNER_KEYS, (0, 0))):
        p = plan(role)
        keyfiles = {f.path: f for f in p.files if f.path.startswith("/etc/optogate/keys/")}
        assert {path.rsplit("/", 1)[1] for path in keyfiles} == set(names)
        for path, f in keyfiles.items():
            assert (f.uid, f.gid) == owner
            assert f.mode == (0o600 if path.endswith(".key") else 0o644)
        key_dir = next(d for d in p.dirs if d.path == f"/etc/optogate/keys/{role}")
        assert (key_dir.mode, key_dir.uid, key_dir.gid) == (0o700, *owner)


def test_outer_plan_never_holds_inner_keys() -> None:
    paths = plan("outer").paths()
    assert not any("/keys/inner" in p or p.endswith("hpke.key") for p in paths)


def test_daemon_unit_and_links() -> None:
    for role in ("outer", "inner"):
        p = plan(role)
        unit = files(p)[f"/etc/systemd/system/optogate-{role}.service"].decode()
        lines = unit.splitlines()
        for line in (
            "Type=notify",
            "WatchdogSec=30",
            "Restart=always",
            f"ExecStart=/opt/optogate/.venv/bin/optogate {role} run "
            f"--config /etc/optogate/{role}.toml",
        ):
            assert line in lines
        if role == "outer":
            assert {"User=optogate", "SupplementaryGroups=dialout gpio"} <= set(lines)
        else:
            assert "User=root" in lines
        links = {link.path: link.target for link in p.links}
        wants = f"/etc/systemd/system/multi-user.target.wants/optogate-{role}.service"
        assert links[wants] == f"/etc/systemd/system/optogate-{role}.service"
        assert links["/etc/systemd/system/hciuart.service"] == "/dev/null"
        first = "/etc/systemd/system/sysinit.target.wants/optogate-firstboot.service"
        assert links[first] == "/etc/systemd/system/optogate-firstboot.service"


def test_outer_keeps_modemmanager_off_the_modem() -> None:
    p = plan("outer")
    assert {link.path: link.target for link in p.links}[
        "/etc/systemd/system/ModemManager.service"
    ] == "/dev/null"
    assert b"ID_MM_DEVICE_IGNORE" in files(p)["/etc/udev/rules.d/70-optogate-modem.rules"]
    assert not any("firewall" in path for path in p.paths())


def test_inner_firewall_admits_only_the_api_port() -> None:
    p = plan("inner", Site(api_port=9443))
    rules = files(p)["/etc/optogate/inner-firewall.nft"].decode()
    assert rules == firewall_rules(9443)
    assert "policy drop" in rules
    assert [line.strip() for line in rules.splitlines() if "dport" in line and "tcp" in line] == [
        "tcp dport 9443 accept"
    ]
    assert (
        "Requires=optogate-firstboot.service optogate-firewall.service"
        in files(p)["/etc/systemd/system/optogate-inner.service"].decode()
    )
    assert "ModemManager" not in " ".join(p.paths())


def test_hostname_names_gateway_and_role() -> None:
    p = files(plan("inner"))
    assert p["/etc/hostname"] == b"gw-1-inner\n"
    assert p["/etc/hosts"].decode().splitlines()[-1] == "127.0.1.1\tgw-1-inner"
    assert p["/etc/hosts"].count(b"127.0.1.1") == 1


def test_app_tree_becomes_a_venv_over_the_os_python() -> None:
    app = AppTree("3.13", {"host_tools/cli.py": (b"x", 0o644), "pkg/lib.so": (b"\x7fELF", 0o755)})
    p = plan("outer", app=app)
    site = "/opt/optogate/.venv/lib/python3.13/site-packages"
    assert files(p)[f"{site}/host_tools/cli.py"] == b"x"
    assert b"include-system-site-packages = true" in files(p)["/opt/optogate/.venv/pyvenv.cfg"]
    assert {link.path: link.target for link in p.links}["/opt/optogate/.venv/bin/python3"] == (
        "/usr/bin/python3.13"
    )
    dirs = [d.path for d in p.dirs]
    for d in ("/opt/optogate/.venv/lib", "/opt/optogate/.venv/lib/python3.13", site, f"{site}/pkg"):
        assert d in dirs
    assert p.replace_trees == ("/opt/optogate",)
    assert "python3.13/site-packages" in files(p)["/usr/local/lib/optogate/firstboot"].decode()


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b"])
def test_odd_key_file_names_refused(name: str) -> None:
    keys = GatewayKeys("gw-1", "outer", {**OUTER_KEYS, name: b"x"})
    with pytest.raises(ImageInputError):
        root_plan(
            keys=keys, site=SITE, account=ACCOUNT, shadow_gid=42, hosts="", build_info={}, app=None
        )


def test_paths_with_spaces_refused() -> None:
    with pytest.raises(ImageInputError):
        plan("outer", app=AppTree("3.11", {"a b.py": (b"", 0o644)}))


def test_manifest_lists_every_entry_with_digest_mode_owner() -> None:
    p = plan("outer")
    layout = parse_sfdisk_json(
        '{"partitiontable": {"label": "dos", "id": "0x1", "sectorsize": 512, "partitions": ['
        '{"node": "a1", "start": 8192, "size": 100, "type": "c"},'
        '{"node": "a2", "start": 9000, "size": 100, "type": "83"}]}}',
        10**7,
    )
    doc = build_manifest(
        tool="t",
        created="now",
        gateway="gw-1",
        role="outer",
        board="pi4",
        release=RELEASES[0],
        release_known=True,
        base=BaseImage("b.img", "a" * 64, "b" * 64),
        layout=layout,
        grown=False,
        plan=p,
        boot_files={"config.txt": b"x"},
        users={999: "optogate"},
        groups={998: "optogate"},
    )
    entries = doc["entries"]
    assert isinstance(entries, list)
    assert len(entries) == len(p.paths()) + 1
    key = next(e for e in entries if e["path"] == "/etc/optogate/keys/outer/signing.key")
    assert key["mode"] == "0600"
    assert key["owner"] == "optogate:optogate"
    assert len(key["sha256"]) == 64
    assert doc["base"] == {"file": "b.img", "sha256": "a" * 64, "image_sha256": "b" * 64}


def test_hosts_without_localhost_gets_it() -> None:
    assert hosts_with_name("", "gw-1-outer").splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\t\tlocalhost ip6-localhost ip6-loopback",
        "127.0.1.1\tgw-1-outer",
    ]
    kept = hosts_with_name("127.0.0.1 localhost\n10.0.0.1 printer\n", "h")
    assert kept == "127.0.0.1 localhost\n10.0.0.1 printer\n127.0.1.1\th\n"
