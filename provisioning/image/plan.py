"""What the builder writes on the root partition, decided purely from its inputs.

:func:`root_plan` turns the role, the gateway's key files, the site settings
and the service account into a :class:`RootPlan`: directories, files (bytes,
mode, owner) and symbolic links, in the order they must be created.  The
adapter (:mod:`provisioning.image.debugfs`) only carries the plan out and
reads it back, so everything that matters here is unit-testable.

What the plan holds, per role (``R`` is ``outer`` or ``inner``):

``/etc/optogate/R.toml``
    The daemon's configuration, in the keys of the daemon's own loader
    (``firmware.outer.config`` / ``firmware.inner.config``), and checked by
    that loader before anything is written.
``/etc/optogate/keys/R/``
    Exactly the files ``optogate keys gateway`` wrote under ``R/``: private
    keys mode 0600, the directory 0700, all owned by the daemon's user.  The
    outer module gets only ``outer/``; the gateway CA (``ca/``) goes nowhere.
``/etc/systemd/system/``
    ``optogate-R.service`` (``Type=notify``, watchdog, restart always; the
    outer daemon as the service user with ``dialout`` and ``gpio``, the inner
    one as root like its own unit, see :data:`DAEMON_USER`),
    ``optogate-firstboot.service``
    and, on the inner module, ``optogate-firewall.service``; each enabled by
    its ``.wants`` link, as ``systemctl enable`` would make it.  ``hciuart`` is
    masked (a link to ``/dev/null``): with ``disable-bt`` the UART it would
    attach Bluetooth to is the optical link.
Outer module
    ``ModemManager`` masked, and a udev rule setting ``ID_MM_DEVICE_IGNORE``
    on USB serial devices, so nothing but the daemon sends AT commands.
Inner module
    An nftables rule set that admits only the LAN API port (plus loopback,
    replies, DHCP and IPv6 neighbour discovery, without which the module
    would lose its address).  There is no SSH on the inner module.
Both
    The service user in the account files, ``/etc/hostname`` and the
    ``127.0.1.1`` line of ``/etc/hosts`` (``NAME-R``), ``/var/lib/optogate``,
    the first-boot script, ``/etc/optogate/image.json`` (what was built from
    what), and the application under ``/opt/optogate`` (a virtual
    environment over the OS's Python, which sees the OS's RPi.GPIO).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Final

from provisioning.image.accounts import SERVICE_USER, ServiceAccount
from provisioning.image.errors import ImageInputError

ROLES: Final = ("outer", "inner")

#: Where the application's virtual environment lives on the module.
APP_ROOT: Final = "/opt/optogate"
#: The path firmware/inner/optogate-inner.service names.
VENV: Final = f"{APP_ROOT}/.venv"
CONFIG_DIR: Final = "/etc/optogate"
UNIT_DIR: Final = "/etc/systemd/system"
FIRSTBOOT_SCRIPT: Final = "/usr/local/lib/optogate/firstboot"
FIRSTBOOT_DONE: Final = "/var/lib/optogate/firstboot.done"

#: The daemons ping at half this period (docs/outer.md); 30 s outlasts a
#: Pi 3's longest pause (an SD-card fsync under load) with a wide margin and
#: still restarts a hung daemon within a minute.
WATCHDOG_SEC: Final = 30
#: Restart after this pause, forever (StartLimitIntervalSec=0): a daemon that
#: exits because its supply dipped or its peer rebooted must come back alone.
RESTART_SEC: Final = 5
#: Who each daemon runs as.  The outer module: the unprivileged service user
#: (dialout for the UART and the modem, gpio for the power lines).  The inner
#: module: root, as its own unit (firmware/inner/optogate-inner.service)
#: requires, because it drops every algorithm worker to a user and a network
#: namespace of its own, which only root can do; its keys are root's.
DAEMON_USER: Final = {"outer": SERVICE_USER, "inner": "root"}
#: The state directory's mode: the inner module's workers must traverse it.
STATE_MODE: Final = {"outer": 0o700, "inner": 0o711}
#: First start may byte-compile the application on a Pi 3: give it time.
FIRSTBOOT_TIMEOUT_SEC: Final = 600

PRIVATE_MODE: Final = 0o600
PUBLIC_MODE: Final = 0o644
EXEC_MODE: Final = 0o755
SECRET_DIR_MODE: Final = 0o700
DIR_MODE: Final = 0o755
#: /etc/shadow and /etc/gshadow are root:shadow 0640 on Debian.
SHADOW_MODE: Final = 0o640

#: Files written under keys/ that hold a private key.
_PRIVATE_SUFFIX: Final = ".key"
#: The most a key directory holds: keys, certificates and identity.json.
MAX_KEY_FILES: Final = 32
MAX_KEY_FILE_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class Dir:
    """A directory to create (or to set the mode and owner of)."""

    path: str
    mode: int
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class File:
    """A regular file: its bytes, mode and owner."""

    path: str
    data: bytes
    mode: int
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Link:
    """A symbolic link (owned by root, as systemctl makes them)."""

    path: str
    target: str


@dataclass(frozen=True)
class RootPlan:
    """Everything for the root partition; ``replace_trees`` are removed first."""

    dirs: tuple[Dir, ...]
    files: tuple[File, ...]
    links: tuple[Link, ...]
    replace_trees: tuple[str, ...] = ()

    def paths(self) -> list[str]:
        """Return the path of every directory, file and link, in plan order."""
        return [
            *(d.path for d in self.dirs),
            *(f.path for f in self.files),
            *(link.path for link in self.links),
        ]


@dataclass(frozen=True)
class Site:
    """Per-customer settings that are not in the gateway directory."""

    board: str = "pi4"
    serial_device: str = "/dev/serial0"
    baud: int = 115200
    gpio_backend: str = "rpigpio"
    api_port: int = 8443
    central_host: str = ""
    central_port: int = 7443
    central_server_name: str = ""
    central_ca: bytes = b""
    dial_number: str = ""
    modem_device: str = "/dev/ttyACM0"


@dataclass(frozen=True)
class GatewayKeys:
    """The key directory of one role, as ``optogate keys gateway`` wrote it."""

    gateway: str
    role: str
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class AppTree:
    """The installed application: files relative to site-packages, and the Python version."""

    python: str
    files: Mapping[str, tuple[bytes, int]] = field(default_factory=dict)


def toml_document(tables: Mapping[str, Mapping[str, object]]) -> str:
    """Return TOML text for ``tables`` (str, int, bool and lists of str only)."""
    out: list[str] = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        for key, value in table.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ImageInputError(f"cannot write {value!r} to TOML")


def config_tables(role: str, site: Site) -> dict[str, dict[str, object]]:
    """Return the tables of ``R.toml`` for ``role``; raise ImageInputError for bad settings."""
    gateway: dict[str, object] = {
        "keys_dir": f"{CONFIG_DIR}/keys/{role}",
        "state_dir": f"/var/lib/optogate/{role}",
    }
    gpio: dict[str, object] = {"backend": site.gpio_backend}
    if role == "inner":
        return {
            "gateway": gateway,
            "api": {"port": site.api_port},
            "link": {"transport": "serial", "device": site.serial_device, "baud": site.baud},
            "gpio": gpio,
        }
    if role != "outer":
        raise ImageInputError(f"role must be 'outer' or 'inner', not {role!r}")
    order: list[str] = []
    tables: dict[str, dict[str, object]] = {
        "gateway": gateway,
        "optical": {"transport": "serial", "device": site.serial_device, "baud": site.baud},
    }
    if site.central_host:
        order.append("internet")
        internet: dict[str, object] = {
            "host": site.central_host,
            "port": site.central_port,
            "ca": f"{CONFIG_DIR}/central-ca.crt",
        }
        if site.central_server_name:
            internet["server_name"] = site.central_server_name
        tables["internet"] = internet
    if site.dial_number:
        order.append("dialup")
        tables["dialup"] = {"device": site.modem_device, "number": site.dial_number}
    if not order:
        raise ImageInputError(
            "the outer module needs a way to reach central: "
            "--central HOST:PORT and/or --dial NUMBER"
        )
    if site.central_host and not site.central_ca:
        raise ImageInputError("--central needs --central-ca (central's tls/ca.crt)")
    tables["uplink"] = {"order": order}
    tables["gpio"] = gpio
    return tables


def unit_daemon(role: str, *, firewall: bool) -> str:
    """Return the systemd unit of the ``role`` daemon."""
    after = "optogate-firstboot.service" + (" optogate-firewall.service" if firewall else "")
    user = DAEMON_USER[role]
    if role == "outer":
        what = "outer module (uplink to central)"
        account = f"User={user}\nGroup={user}\nSupplementaryGroups=dialout gpio\n"
        network = ""
    else:
        what = "inner module (LAN API, licences, service builder)"
        account = "# root: it drops each algorithm worker to its own user and network namespace\n"
        account += f"User={user}\n"
        network = "Wants=network-online.target\nAfter=network-online.target\n"
    return f"""[Unit]
Description=optogate {what}
Requires={after}
After={after}
{network}StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={VENV}/bin/optogate {role} run --config {CONFIG_DIR}/{role}.toml
{account}StateDirectory=optogate/{role}
StateDirectoryMode=0{STATE_MODE[role]:o}
WatchdogSec={WATCHDOG_SEC}
Restart=always
RestartSec={RESTART_SEC}
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def unit_firstboot() -> str:
    """Return the first-boot unit: runs once, offline, before the daemons."""
    return f"""[Unit]
Description=optogate first boot: finish the installation (offline)
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target optogate-outer.service optogate-inner.service
ConditionPathExists=!{FIRSTBOOT_DONE}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={FIRSTBOOT_SCRIPT}
TimeoutStartSec={FIRSTBOOT_TIMEOUT_SEC}

[Install]
WantedBy=sysinit.target
"""


def unit_firewall() -> str:
    """Return the inner module's firewall unit: loaded before any network is up."""
    return f"""[Unit]
Description=optogate inner module firewall (LAN API port only)
DefaultDependencies=no
Before=network-pre.target
Wants=network-pre.target
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f {CONFIG_DIR}/inner-firewall.nft

[Install]
WantedBy=sysinit.target
"""


def firewall_rules(api_port: int) -> str:
    """Return the inner module's nftables rule set admitting only ``api_port``."""
    return f"""#!/usr/sbin/nft -f
# optogate inner module: the LAN may reach the API port and nothing else.
flush ruleset

table inet optogate {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        ct state invalid drop
        # keep the address: DHCPv4 replies and IPv6 neighbour discovery / router adverts
        udp sport 67 udp dport 68 accept
        icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} accept
        tcp dport {api_port} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
}}
"""


MODEM_UDEV_RULE: Final = """\
# optogate outer module: only the daemon talks to the modem; ModemManager
# (masked as well) must never probe it with AT commands of its own.
SUBSYSTEM=="tty", KERNEL=="ttyACM[0-9]*|ttyUSB[0-9]*", ENV{ID_MM_DEVICE_IGNORE}="1"
"""


def firstboot_script(role: str, python: str) -> str:
    """Return the first-boot shell script: offline, idempotent, safe to re-run."""
    config = f"{CONFIG_DIR}/{role}.toml"
    user = DAEMON_USER[role]
    module = "firmware.outer.config" if role == "outer" else "firmware.inner.config"
    return f"""#!/bin/sh
# optogate first boot ({role} module).  Runs once before the daemon (the unit
# is skipped once {FIRSTBOOT_DONE} exists); needs no network; every step can
# run again with the same result.
set -eu
py={VENV}/bin/python3
# 1. Byte-compile the application as root now, so the unprivileged daemon
#    never needs to write under {APP_ROOT} (and starts faster on a Pi 3).
if [ -x "$py" ]; then
    "$py" -m compileall -q {VENV}/lib/python{python}/site-packages >/dev/null
    # 2. The configuration loads with the daemon's own loader.
    "$py" -c 'import sys; from {module} import load_config; load_config(sys.argv[1])' {config}
fi
# 3. Key files: owner and modes exactly as the image builder wrote them.
chown -R {user}:{user} {CONFIG_DIR}/keys
find {CONFIG_DIR}/keys -type d -exec chmod 0700 {{}} +
find {CONFIG_DIR}/keys -type f -name '*.key' -exec chmod 0600 {{}} +
install -d -o {user} -g {user} -m 0{STATE_MODE[role]:o} /var/lib/optogate/{role}
# 4. Done: the unit's condition skips it from now on.
printf '%s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > {FIRSTBOOT_DONE}.tmp
mv {FIRSTBOOT_DONE}.tmp {FIRSTBOOT_DONE}
"""


def _venv_files(app: AppTree) -> tuple[list[File], list[Link], list[str]]:
    site = f"{VENV}/lib/python{app.python}/site-packages"
    files: list[File] = [
        File(
            f"{VENV}/pyvenv.cfg",
            (
                "home = /usr/bin\n"
                "include-system-site-packages = true\n"  # the OS's RPi.GPIO
                f"version = {app.python}\n"
            ).encode(),
            PUBLIC_MODE,
        ),
        File(
            f"{VENV}/bin/optogate",
            f"#!{VENV}/bin/python3\nimport sys\n\nfrom host_tools.cli import main\n\n"
            "sys.exit(main())\n".encode(),
            EXEC_MODE,
        ),
    ]
    links = [
        Link(f"{VENV}/bin/python3", f"/usr/bin/python{app.python}"),
        Link(f"{VENV}/bin/python", "python3"),
        Link("/usr/local/bin/optogate", f"{VENV}/bin/optogate"),
    ]
    dirs = {f"{VENV}/bin", f"{VENV}/lib", f"{VENV}/lib/python{app.python}", site}
    for rel, (data, mode) in sorted(app.files.items()):
        path = f"{site}/{rel}"
        files.append(File(path, data, mode))
        parent = str(PurePosixPath(path).parent)
        while parent not in dirs and parent != site:
            dirs.add(parent)
            parent = str(PurePosixPath(parent).parent)
    return files, links, sorted(dirs)


def _check_path(path: str) -> None:
    if not path.startswith("/") or any(c in path for c in '"\n\r\t\\ ') or "/../" in path:
        raise ImageInputError(f"cannot write {path!r}: only plain absolute paths are written")


def hosts_with_name(hosts: str, hostname: str) -> str:
    """Return /etc/hosts text whose ``127.0.1.1`` line names ``hostname`` (added if missing)."""
    lines = [line for line in hosts.splitlines() if not line.startswith("127.0.1.1")]
    if not any(line.split()[1:2] == ["localhost"] for line in lines if line.strip()):
        lines[:0] = ["127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


def root_plan(
    *,
    keys: GatewayKeys,
    site: Site,
    account: ServiceAccount,
    shadow_gid: int,
    hosts: str,
    build_info: Mapping[str, object],
    app: AppTree | None,
) -> RootPlan:
    """Return everything to write on the root partition for ``keys.role``.

    Raises ImageInputError for an unknown role, unusable site settings, or a
    key file name that is not a plain file name.
    """
    role = keys.role
    tables = config_tables(role, site)
    uid, gid = (account.uid, account.gid) if role == "outer" else (0, 0)
    key_dir = f"{CONFIG_DIR}/keys/{role}"
    dirs: list[Dir] = [
        Dir(CONFIG_DIR, DIR_MODE),
        Dir(f"{CONFIG_DIR}/keys", SECRET_DIR_MODE, uid, gid),
        Dir(key_dir, SECRET_DIR_MODE, uid, gid),
        Dir("/var/lib/optogate", DIR_MODE),
        Dir(f"/var/lib/optogate/{role}", STATE_MODE[role], uid, gid),
        Dir("/usr/local/lib/optogate", DIR_MODE),
        Dir(UNIT_DIR, DIR_MODE),
        Dir(f"{UNIT_DIR}/multi-user.target.wants", DIR_MODE),
        Dir(f"{UNIT_DIR}/sysinit.target.wants", DIR_MODE),
    ]
    hostname = f"{keys.gateway}-{role}"
    files: list[File] = [
        File("/etc/passwd", account.files.passwd.encode(), PUBLIC_MODE),
        File("/etc/group", account.files.group.encode(), PUBLIC_MODE),
        File("/etc/shadow", account.files.shadow.encode(), SHADOW_MODE, 0, shadow_gid),
        File("/etc/gshadow", account.files.gshadow.encode(), SHADOW_MODE, 0, shadow_gid),
        File("/etc/hostname", f"{hostname}\n".encode(), PUBLIC_MODE),
        File("/etc/hosts", hosts_with_name(hosts, hostname).encode(), PUBLIC_MODE),
        File(f"{CONFIG_DIR}/{role}.toml", toml_document(tables).encode(), PUBLIC_MODE),
        File(
            f"{CONFIG_DIR}/image.json",
            (json.dumps(dict(build_info), indent=2, sort_keys=True) + "\n").encode(),
            PUBLIC_MODE,
        ),
    ]
    if len(keys.files) > MAX_KEY_FILES:
        raise ImageInputError(f"{role}/ holds {len(keys.files)} files: not a key directory")
    for name, data in sorted(keys.files.items()):
        if "/" in name or name.startswith("."):
            raise ImageInputError(f"unexpected entry {name!r} in the {role}/ key directory")
        mode = PRIVATE_MODE if name.endswith(_PRIVATE_SUFFIX) else PUBLIC_MODE
        files.append(File(f"{key_dir}/{name}", data, mode, uid, gid))
    if role == "outer" and site.central_host:
        files.append(File(f"{CONFIG_DIR}/central-ca.crt", site.central_ca, PUBLIC_MODE))

    python = app.python if app is not None else ""
    files += [
        File(
            f"{UNIT_DIR}/optogate-{role}.service",
            unit_daemon(role, firewall=role == "inner").encode(),
            PUBLIC_MODE,
        ),
        File(f"{UNIT_DIR}/optogate-firstboot.service", unit_firstboot().encode(), PUBLIC_MODE),
        File(FIRSTBOOT_SCRIPT, firstboot_script(role, python).encode(), EXEC_MODE),
    ]
    links: list[Link] = [
        Link(
            f"{UNIT_DIR}/multi-user.target.wants/optogate-{role}.service",
            f"{UNIT_DIR}/optogate-{role}.service",
        ),
        Link(
            f"{UNIT_DIR}/sysinit.target.wants/optogate-firstboot.service",
            f"{UNIT_DIR}/optogate-firstboot.service",
        ),
        Link(f"{UNIT_DIR}/hciuart.service", "/dev/null"),
    ]
    if role == "outer":
        dirs += [Dir("/etc/udev", DIR_MODE), Dir("/etc/udev/rules.d", DIR_MODE)]
        files.append(
            File("/etc/udev/rules.d/70-optogate-modem.rules", MODEM_UDEV_RULE.encode(), PUBLIC_MODE)
        )
        links.append(Link(f"{UNIT_DIR}/ModemManager.service", "/dev/null"))
    else:
        files += [
            File(
                f"{CONFIG_DIR}/inner-firewall.nft",
                firewall_rules(site.api_port).encode(),
                PUBLIC_MODE,
            ),
            File(f"{UNIT_DIR}/optogate-firewall.service", unit_firewall().encode(), PUBLIC_MODE),
        ]
        links.append(
            Link(
                f"{UNIT_DIR}/sysinit.target.wants/optogate-firewall.service",
                f"{UNIT_DIR}/optogate-firewall.service",
            )
        )
    trees: tuple[str, ...] = ()
    if app is not None:
        app_files, app_links, app_dirs = _venv_files(app)
        dirs += [Dir("/opt", DIR_MODE), Dir(APP_ROOT, DIR_MODE), Dir(VENV, DIR_MODE)]
        dirs += [Dir(d, DIR_MODE) for d in app_dirs]
        files += app_files
        links += app_links
        dirs.append(Dir("/usr/local/bin", DIR_MODE))
        trees = (APP_ROOT,)
    plan = RootPlan(tuple(dirs), tuple(files), tuple(links), trees)
    for path in plan.paths():
        _check_path(path)
    return plan
