"""``optogate demo``: the whole appliance on one machine, and a scripted tour of it.

Theory of operation
-------------------
:class:`Appliance` does what an operator and an installer would do, with the
project's own commands, in a state directory (temporary unless ``--state``):

1. **Provision** (``optogate keys``, ``optogate bundle``, ``optogate
   central``): central's signing key, the gateway's keys and LAN CA, central's
   database and TLS identity, a customer ``demo``, the gateway ``gw-demo``,
   the reference services (signed and published), their licences and a client
   API key.  Every command's output goes to ``provision.log``.
2. **Start** the processes through a :class:`~host_tools.launcher.Supervisor`,
   each waiting for the one before it:

   ========================  ==================================================
   ``modem-central``         (dial-up) central's answering modem, an emulator
                             listening on loopback TCP for incoming calls
   ``central``               ``optogate central run``: answers that modem with
                             ATA, or (``--internet``) a TLS listener
   ``modem-gateway``         (dial-up) the outer module's modem: its phone book
                             turns the number dialled into a call to the first
   ``link``                  ``optogate sim link``: the optocoupled UART and
                             both modules' power supplies
   ``outer``                 ``optogate outer run``: optical side ``a`` of the
                             link, dials central, GPIO simulated from the link
   ``inner``                 ``optogate inner run``: optical side ``b``, the
                             LAN API on HTTPS
   ========================  ==================================================

3. **Keep power honest.**  The simulated GPIO makes a module whose own supply
   is cut exit with its "power failed" status (outer 3, inner 75); the
   supervisor records that as ``powered off``, not as a death.  That is a
   cut the module was warned of (its power-good line, docs/hardware.md);
   :meth:`Appliance.cut_power` is one it was not: the module dies at once,
   mid-write, as a Pi on a bare supply does.  A *power keeper* thread
   watches the link simulator's power switches and starts a powered-off
   module again when its power returns, as a Pi boots.

``optogate demo`` then shows every process's state live until Ctrl-C;
``optogate demo --tour`` runs :func:`run_tour` (the steps are in
:mod:`host_tools.tour`) and exits 0 only if every step behaved.  Either way
every process is stopped in reverse order on the way out, and a process that
dies on its own is reported with the end of its stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from firmware.common.errors import OptogateError
from host_tools.launcher import (
    LaunchError,
    Managed,
    ProcessSpec,
    Supervisor,
    first_json_line,
    log_event,
)

#: The repository's reference services (provisioning/reference/NAME).
REFERENCE_DIR: Final = Path(__file__).resolve().parent.parent / "provisioning" / "reference"
CUSTOMER: Final = "demo"
GATEWAY: Final = "gw-demo"
#: The number the outer module dials; the gateway modem's phone book maps it
#: to central's answering modem.
CENTRAL_NUMBER: Final = "5550100"
#: V.34 speed of both emulated modems: a bundle of tens of KiB takes seconds.
MODEM_SPEED: Final = 33600
#: The optical UART's rate (docs/hardware.md).
OPTICAL_BAUD: Final = 115200
#: Dial delay of the gateway's modem: long enough to be seen in the tour's
#: timings, short enough not to bore.
DEFAULT_DIAL_DELAY: Final = 1.5
#: The LAN API port a person would expect (docs/api.md); another free port
#: is taken when it is busy.
PREFERRED_API_PORT: Final = 8443
#: Services licensed for a year from yesterday.
LONG_LICENSED: Final = ("dxf2svg", "doc-encrypt", "polyline-simplify")
#: The service whose licence runs out during the tour (then is paid for).
EXPIRING_SERVICE: Final = "echo"
#: The expiring licence ends this long after provisioning: over before the
#: tour reaches its 402 step (the tour waits out any remainder).
EXPIRING_AFTER_S: Final = 20
#: The inner module ships usage when the link comes up and this often
#: otherwise: rarely, so that a shipment seldom dials in the middle of a
#: step of the tour.
USAGE_INTERVAL_S: Final = 600.0
#: Exit statuses the daemons use when their own supply fails.
OUTER_POWER_EXIT: Final = 3
INNER_POWER_EXIT: Final = 75
#: The link simulator's control socket, in the state directory.
LINK_SOCKET: Final = "link.sock"
#: Which link-simulator side powers which module.
SIDE_OF: Final = {"outer": "a", "inner": "b"}
#: Readiness deadlines: a daemon imports cryptography and aiohttp (seconds on
#: a loaded machine); the outer module opens its ports before it is ready.
SIM_READY_S: Final = 30.0
DAEMON_READY_S: Final = 60.0
#: Central hangs up its answering modem on the way out: the escape sequence's
#: guard times and a retry take more than ten seconds.
CENTRAL_STOP_S: Final = 25.0
#: How long a provisioning command may take (key generation, one fsync'd write).
COMMAND_TIMEOUT_S: Final = 60.0

_LICENCE_RE: Final = re.compile(r"^licence (\S+) issued:", re.MULTILINE)
_CLIENT_KEY_RE: Final = re.compile(r"\(shown once\): (og_live_\S+)")


class DemoError(OptogateError):
    """The demo could not provision or start the appliance."""


def optogate_argv(*args: str) -> list[str]:
    """Return the argv that runs ``optogate ARGS`` with this interpreter."""
    return [sys.executable, "-m", "host_tools.cli", *args]


def free_port(preferred: int = 0) -> int:
    """Return ``preferred`` if it is free on loopback, else a free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DemoError("no free TCP port on loopback")


def iso(seconds: float) -> str:
    """Return Unix ``seconds`` as an ISO 8601 UTC time, as ``--until`` takes it."""
    when = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Appliance:
    """One demo appliance: its state directory, its processes, how to call it."""

    state_dir: Path
    internet: bool = False
    isolator: bool = False
    dial_delay: float = DEFAULT_DIAL_DELAY
    api_port: int = 0
    on_change: Callable[[Managed], None] | None = None
    licences: dict[str, str] = field(default_factory=dict)
    expiring_until: float = 0.0
    api_key: str = ""
    worker_python: str = ""
    expiring_after_s: float | None = EXPIRING_AFTER_S
    central_port: int = 0
    modem_busy: int = 0
    usage_interval_s: float = USAGE_INTERVAL_S
    supervisor: Supervisor | None = None
    power: dict[str, bool] = field(default_factory=lambda: {"a": True, "b": True})
    _keeper: threading.Thread | None = None
    _keeper_stop: threading.Event = field(default_factory=threading.Event)

    # -- paths --------------------------------------------------------------------------------

    @property
    def central_config(self) -> Path:
        """central.toml (admin commands take ``--config`` with it)."""
        return self.state_dir / "central.toml"

    @property
    def ca_file(self) -> Path:
        """The gateway's LAN CA certificate: what a caller pins."""
        return self.state_dir / "gateway" / "inner" / "tls-ca.crt"

    @property
    def url(self) -> str:
        """The LAN API's address."""
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def control(self) -> str:
        """The link simulator's control socket (``optogate demo --send`` finds it here)."""
        return str(self.state_dir / LINK_SOCKET)

    # -- provisioning -------------------------------------------------------------------------

    def command(self, *args: str) -> str:
        """Run ``optogate ARGS``, log it to provision.log; return its stdout.

        Raises DemoError with the command's stderr when it fails.
        """
        argv = optogate_argv(*args)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                cwd=self.state_dir,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise DemoError(f"optogate {' '.join(args)}: no answer in {e.timeout:g} s") from e
        shown = " ".join(args)
        with (self.state_dir / "provision.log").open("a", encoding="utf-8") as log:
            log.write(f"$ optogate {shown}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise DemoError(f"optogate {shown} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def provision(self, now: float | None = None) -> None:
        """Make keys, central's database, the customer, gateway, services, licences, key.

        Raises DemoError naming the command that failed.
        """
        now = time.time() if now is None else now
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # The algorithm sandbox runs as an unprivileged user: it must be able
        # to reach the inner module's installed services below this directory.
        self.state_dir.chmod(0o755)
        if os.geteuid() == 0 and not world_readable(self.state_dir):
            raise DemoError(
                f"{self.state_dir} is below a directory other users cannot enter: the inner"
                " module's unprivileged algorithm workers could not read the services there"
            )
        self.api_port = self.api_port or free_port(PREFERRED_API_PORT)
        self.worker_python = worker_python()
        self.command("keys", "init-central", "central-keys")
        self.command(
            "keys", "gateway", GATEWAY, "--out", "gateway",
            "--central-pub", "central-keys/central.pub", "--dns", "localhost",
            "--ip", "127.0.0.1",
        )  # fmt: skip
        self._write_central_config()
        cfg = ("--config", str(self.central_config))
        self.command("central", *cfg, "init", "--dns", "localhost", "--ip", "127.0.0.1")
        self.command("central", *cfg, "customer", "add", CUSTOMER, "--name", "Demo customer")
        self.command("central", *cfg, "gateway", "register", "gateway/gateway.json",
                     "--customer", CUSTOMER)  # fmt: skip
        (self.state_dir / "bundles").mkdir(exist_ok=True)
        yesterday = iso(now - 86400)
        for service in (*LONG_LICENSED, EXPIRING_SERVICE):
            source = REFERENCE_DIR / service
            if service == "polyline-simplify":
                ensure_wasm(source)
            bundle = f"bundles/{service}.ogb"
            self.command("bundle", "build", str(source), "--out", bundle,
                         "--sign-key", "central-keys/central.key")  # fmt: skip
            self.command("central", *cfg, "service", "publish", bundle)
            until = iso(now + 365 * 86400)
            if service == EXPIRING_SERVICE and self.expiring_after_s is not None:
                self.expiring_until = now + self.expiring_after_s
                until = iso(self.expiring_until)
            out = self.command(
                "central",
                *cfg,
                "licence",
                "issue",
                "--customer",
                CUSTOMER,
                "--service",
                service,
                "--from",
                yesterday,
                "--until",
                until,
            )
            match = _LICENCE_RE.search(out)
            if match is None:
                raise DemoError(f"cannot read the licence id in {out!r}")
            self.licences[service] = match.group(1)
        out = self.command(
            "central", *cfg, "client-key", "issue", "--customer", CUSTOMER, "--label", "demo"
        )
        match = _CLIENT_KEY_RE.search(out)
        if match is None:
            raise DemoError("cannot read the client key central issued")
        self.api_key = match.group(1)
        secret = self.state_dir / "api-key"
        secret.write_text(self.api_key + "\n", encoding="utf-8")
        secret.chmod(0o600)

    def _write_central_config(self, *, serial: str = "", listen: bool = False) -> None:
        lines = [
            "[central]",
            'state_dir = "central"',
            'signing_key = "central-keys/central.key"',
            'sync_expiry = "7d"',
        ]
        if listen:
            # A fixed port, so central restarted is found where it was.
            port = self.central_port = self.central_port or free_port()
            lines += ["", "[[listen]]", 'host = "127.0.0.1"', f"port = {port}"]
        if serial:
            lines += ["", "[[serial]]", f"port = {json.dumps(serial)}", "auto_answer_rings = 0"]
        self.central_config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start every process in dependency order and the power keeper.

        Raises LaunchError naming the process that did not come up (the
        ones already started keep running until :meth:`stop`).
        """
        sup = Supervisor(self.state_dir, on_change=self.on_change)
        self.supervisor = sup
        central_address = ""
        gateway_modem = ""
        if self.internet:
            self._write_central_config(listen=True)
        else:
            modem = sup.start(
                ProcessSpec(
                    "modem-central",
                    optogate_argv(
                        "sim",
                        "modem",
                        "--answer",
                        "--listen",
                        "127.0.0.1:0",
                        "--speed",
                        str(MODEM_SPEED),
                        "--ring-interval",
                        "0.5",
                        "--answer-delay",
                        "0.3",
                    ),
                    first_json_line("port", "listen"),
                    SIM_READY_S,
                )
            )
            self._write_central_config(serial=modem.info["port"])
        central = sup.start(
            ProcessSpec(
                "central",
                optogate_argv("central", "run", "--config", str(self.central_config)),
                log_event("started"),
                DAEMON_READY_S,
                stop_grace=CENTRAL_STOP_S,
            )
        )
        if self.internet:
            listening = central.info.get("listen") or []
            if not listening:
                raise LaunchError("central started without a TCP listener")
            central_address = str(listening[0])
        else:
            modem_listen = sup.processes["modem-central"].info["listen"]
            gw_modem = sup.start(
                ProcessSpec(
                    "modem-gateway",
                    optogate_argv(
                        "sim",
                        "modem",
                        "--phonebook",
                        f"{CENTRAL_NUMBER}={modem_listen}",
                        "--speed",
                        str(MODEM_SPEED),
                        "--dial-delay",
                        f"{self.dial_delay:g}",
                        "--busy",
                        str(self.modem_busy),
                    ),
                    first_json_line("port"),
                    SIM_READY_S,
                )
            )
            gateway_modem = gw_modem.info["port"]
        link = sup.start(
            ProcessSpec(
                "link",
                optogate_argv(
                    "sim",
                    "link",
                    "--baud",
                    str(OPTICAL_BAUD),
                    "--control",
                    self.control,
                    *(["--isolator"] if self.isolator else []),
                ),
                first_json_line("a", "b", "control"),
                SIM_READY_S,
            )
        )
        self._write_outer_config(link.info["a"], central_address, gateway_modem)
        self._write_inner_config(link.info["b"])
        sup.start(self.outer_spec())
        sup.start(self.inner_spec())
        self._keeper = threading.Thread(target=self._keep_power, name="demo-power", daemon=True)
        self._keeper.start()

    def outer_spec(self) -> ProcessSpec:
        """How the outer module runs."""
        return ProcessSpec(
            "outer",
            optogate_argv("outer", "run", "--config", str(self.state_dir / "outer.toml")),
            log_event("ready"),
            DAEMON_READY_S,
            power_exit=OUTER_POWER_EXIT,
        )

    def inner_spec(self) -> ProcessSpec:
        """How the inner module runs."""
        return ProcessSpec(
            "inner",
            optogate_argv("inner", "run", "--config", str(self.state_dir / "inner.toml")),
            log_event("started"),
            DAEMON_READY_S,
            power_exit=INNER_POWER_EXIT,
        )

    def _write_outer_config(self, optical: str, central: str, modem: str) -> None:
        order = "internet" if self.internet else "dialup"
        text = f"""\
[gateway]
keys_dir = "gateway/outer"
state_dir = "outer"

[optical]
transport = "serial"
device = {json.dumps(optical)}
baud = {OPTICAL_BAUD}

[uplink]
order = ["{order}"]
# Hang up soon after the last exchange, so each step of the tour dials anew.
idle_hangup_s = 5.0
sync_interval_s = 3600.0
# A failed call is retried soon: the demo's central is on this machine.
backoff_initial_s = 2.0
backoff_max_s = 10.0
connect_timeout_s = 60.0
request_timeout_s = 600.0
# Always ask central: "pay, then call again" must see the payment at once.
sync_serve_age_s = 0.0

[gpio]
backend = "sim"

[sim]
control = {json.dumps(self.control)}
"""
        if self.internet:
            host, _, port = central.rpartition(":")
            text += f"""
[internet]
host = {json.dumps(host)}
port = {port}
ca = "central/tls/ca.crt"
server_name = "localhost"
"""
        else:
            text += f"""
[dialup]
device = {json.dumps(modem)}
number = "{CENTRAL_NUMBER}"
retry_pause_s = 2.0
# The tour dials a dozen times within minutes.
max_calls_per_hour = 240
"""
        (self.state_dir / "outer.toml").write_text(text, encoding="utf-8")

    def _write_inner_config(self, optical: str) -> None:
        text = f"""\
[gateway]
keys_dir = "gateway/inner"
state_dir = "inner"

[api]
host = "127.0.0.1"
port = {self.api_port}

[link]
transport = "serial"
device = {json.dumps(optical)}
baud = {OPTICAL_BAUD}
fetch_timeout_s = 600.0
# A sync may need a dial-up call first.
sync_timeout_s = 120.0
payment_sync_wait_s = 60.0
sync_interval_s = 300.0
# Usage also ships whenever the link comes up.
usage_interval_s = {float(self.usage_interval_s)!r}
retry_after_s = 5.0

[runtime]
pool_size = 1
python = {json.dumps(self.worker_python)}

[gpio]
backend = "sim"

[sim]
control = {json.dumps(self.control)}
"""
        (self.state_dir / "inner.toml").write_text(text, encoding="utf-8")

    # -- power ----------------------------------------------------------------------------------

    def set_power(self, side: str, on: bool) -> dict[str, Any]:
        """Switch side ``a`` (outer) or ``b`` (inner) on or off; return the simulator's reply.

        Raises DemoError if the simulator refuses or cannot be reached.
        """
        return link_command(self.control, {"cmd": "power", "side": side, "on": on})

    def cut_power(self, side: str) -> None:
        """Cut side ``a`` (outer) or ``b`` (inner) off with no warning: the module dies at once.

        Its process group is killed before the simulator's switch turns (so
        it writes nothing more, and hears nothing of the cut), then the line
        goes silent and the peer's power-sense input drops.  Switch the side
        on again with :meth:`set_power`; the power keeper boots it.  Raises
        DemoError if the simulator refuses, LaunchError if the module is
        not running.
        """
        name = next(n for n, s in SIDE_OF.items() if s == side)
        sup = self.supervisor
        if sup is None or not sup.processes[name].alive():
            raise LaunchError(f"{name} is not running")
        # The keeper must not boot the module again before its power returns.
        self.power[side] = False
        sup.power_off(name)
        self.set_power(side, False)

    def _keep_power(self) -> None:
        """Follow the simulator's power switches; boot a powered-off module when power returns."""
        while not self._keeper_stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.control)
                    s.sendall(b'{"cmd": "watch"}\n')
                    s.settimeout(0.2)
                    self._follow(s)
            except OSError:
                if self._keeper_stop.wait(0.5):
                    return

    def _follow(self, s: socket.socket) -> None:
        buffer = b""
        while not self._keeper_stop.is_set():
            try:
                chunk = s.recv(4096)
                if not chunk:
                    return
                buffer += chunk
            except TimeoutError:
                pass
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "power":
                        self.power[str(event["side"])] = bool(event["on"])
            self._boot_powered()

    def _boot_powered(self) -> None:
        sup = self.supervisor
        if sup is None:
            return
        for name, side in SIDE_OF.items():
            managed = sup.processes.get(name)
            if managed is None or managed.state != "powered off" or not self.power[side]:
                continue
            try:
                sup.restart(name)
            except LaunchError as e:
                if sup.processes[name].state == "powered off":
                    continue  # its power went again while it booted: it boots when power returns
                print(f"optogate demo: {name} did not boot again: {e}", file=sys.stderr)

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the power keeper, then every process in reverse order."""
        self._keeper_stop.set()
        if self._keeper is not None:
            self._keeper.join(5.0)
        if self.supervisor is not None:
            self.supervisor.stop_all()


def link_command(control: str, command: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the link simulator's control socket; return its reply.

    Raises DemoError when it cannot be reached or refuses the command.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(control)
            s.sendall(json.dumps(command).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise DemoError(f"link simulator control socket: {e}") from e
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise DemoError(f"link simulator answered {data[:80]!r}") from e
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise DemoError(f"link simulator refused {command}: {reply}")
    return reply


def world_readable(directory: Path) -> bool:
    """Return True if any user may list ``directory`` and traverse every directory above it."""
    try:
        if directory.stat().st_mode & 0o005 != 0o005:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in directory.parents)
    except OSError:
        return False


def worker_python() -> str:
    """Return the interpreter the inner module's algorithm workers should use ("" = its own).

    Run as root, the inner module drops its workers to an unprivileged user,
    who must be able to read the interpreter's standard library; a Python
    installed under root's home directory is unreadable to it, and then the
    system's python3 is used.  Raises DemoError when neither will do.
    """
    if os.geteuid() != 0 or world_readable(Path(os.path.dirname(os.__file__))):
        return ""
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system is None:
        raise DemoError(
            "this interpreter's library is unreadable to the unprivileged worker user and"
            " there is no system python3: install Debian's python3 and python3-cryptography"
        )
    probe = subprocess.run(
        [system, "-c", "import os, cryptography; print(os.path.dirname(os.__file__))"],
        capture_output=True,
        text=True,
        check=False,
        timeout=COMMAND_TIMEOUT_S,
    )
    if probe.returncode != 0 or not world_readable(Path(probe.stdout.strip())):
        raise DemoError(
            f"{system} cannot run the reference services for an unprivileged user"
            " (doc-encrypt needs the cryptography package: Debian's python3-cryptography)"
        )
    return system


def ensure_wasm(source: Path) -> None:
    """Build the wasm reference service's module if it is missing.  Raises DemoError."""
    manifest = (source / "manifest.toml").read_text(encoding="utf-8")
    entry = re.search(r'^entry\s*=\s*"([^"]+)"', manifest, re.MULTILINE)
    if entry is None or (source / entry.group(1)).exists():
        return
    make = shutil.which("make")
    if make is None:
        raise DemoError(f"{source.name}: its .wasm is missing and 'make' is not installed")
    done = subprocess.run([make, "-C", str(source)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DemoError(
            f"{source.name}: building the .wasm failed (needs clang and lld: 'make sysdeps'):"
            f" {done.stderr.strip()[-500:]}"
        )


@contextlib.contextmanager
def appliance(
    state: Path | None = None,
    *,
    internet: bool = False,
    isolator: bool = False,
    dial_delay: float = DEFAULT_DIAL_DELAY,
    api_port: int = 0,
    on_change: Callable[[Managed], None] | None = None,
    expiring_after_s: float | None = EXPIRING_AFTER_S,
    modem_busy: int = 0,
    usage_interval_s: float = USAGE_INTERVAL_S,
) -> Iterator[Appliance]:
    """Provision and start an appliance; stop it (and remove a temporary state) on exit.

    ``isolator`` puts the protocol-break isolator's filter on the optical
    line (the link simulator's ``--isolator``).
    ``expiring_after_s`` is how long after provisioning the ``echo`` licence
    ends (None: a year, like the others); the gateway's modem answers the
    first ``modem_busy`` dials BUSY; the inner module ships usage every
    ``usage_interval_s`` seconds besides whenever its link comes up.  Raises
    DemoError or LaunchError when it cannot be provisioned or started.
    """
    temporary = state is None
    state_dir = Path(tempfile.mkdtemp(prefix="optogate-demo-")) if state is None else state
    app = Appliance(
        state_dir.resolve(),
        internet=internet,
        isolator=isolator,
        dial_delay=dial_delay,
        api_port=api_port,
        on_change=on_change,
        expiring_after_s=expiring_after_s,
        modem_busy=modem_busy,
        usage_interval_s=usage_interval_s,
    )
    try:
        if not (app.state_dir / "api-key").exists():
            app.provision()
        else:
            raise DemoError(f"{app.state_dir} already holds a demo; give an empty --state")
        app.start()
        yield app
    finally:
        app.stop()
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)


# -- the command -----------------------------------------------------------------------------


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate demo``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the whole appliance on this machine: central, modem emulators, "
        "outer module, link simulator, inner module.",
    )
    p.add_argument("--state", type=Path, help="keep keys, config and logs here (an empty dir)")
    p.add_argument("--internet", action="store_true", help="TCP+TLS to central, no modem")
    p.add_argument(
        "--isolator",
        action="store_true",
        help="put the protocol-break isolator's filter on the optical line",
    )
    p.add_argument("--tour", action="store_true", help="run the scripted walk-through and exit")
    p.add_argument("--port", type=int, default=0, help="LAN API port (default 8443 if free)")
    p.add_argument(
        "--send",
        metavar="JSON",
        help="send one command to the link simulator of the demo running in --state and exit,"
        ' e.g. \'{"cmd": "power", "side": "a", "on": false}\'',
    )
    p.add_argument(
        "--dial-delay",
        type=float,
        default=DEFAULT_DIAL_DELAY,
        help=f"seconds the gateway's modem takes to dial ({DEFAULT_DIAL_DELAY:g})",
    )
    return p


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate demo``; return 0, 1 (a step failed, or the appliance did not start)."""
    args = build_parser(prog).parse_args(argv)
    if args.send is not None:
        return send(args.state, args.send, prog)
    if args.state is not None and args.state.exists() and any(args.state.iterdir()):
        print(f"{prog}: {args.state} is not empty", file=sys.stderr)
        return 2
    from host_tools import show

    # SIGTERM stops the demo as Ctrl-C does, through the same clean shutdown;
    # once it has begun, further signals are ignored so it can finish.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    view = show.LiveView()
    # A temporary state is removed at the end unless something went wrong:
    # then its logs are what tells why, and the path is printed.
    temporary = args.state is None
    state: Path = args.state or Path(tempfile.mkdtemp(prefix="optogate-demo-"))
    status = 1
    try:
        with appliance(
            state,
            internet=args.internet,
            isolator=args.isolator,
            dial_delay=args.dial_delay,
            api_port=args.port,
            on_change=view.changed,
        ) as app:
            view.attach(app)
            if args.tour:
                from host_tools.tour import run_tour

                passed = run_tour(app, view.console)
            else:
                with contextlib.suppress(KeyboardInterrupt):
                    view.run_until_interrupted()
                passed = True
            view.console.print("stopping every process, in reverse order")
        deaths = app.supervisor.deaths if app.supervisor else []
        if deaths:
            names = ", ".join(f"{d.name} (status {d.exit_code})" for d in deaths)
            view.console.print(f"[bold red]died while the demo ran: {names}[/]")
        status = 0 if passed and not deaths else 1
    except KeyboardInterrupt:
        view.console.print("interrupted: every process started was stopped")
    except (DemoError, LaunchError) as e:
        view.console.print(f"[bold red]{prog}: {e}[/]")
    finally:
        view.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if temporary and status == 0:
            shutil.rmtree(state, ignore_errors=True)
        elif temporary:
            view.console.print(f"keys, configuration and logs kept in {state}")
    return status


def send(state: Path | None, text: str, prog: str) -> int:
    """Send one JSON command to a running demo's link simulator; print the reply.

    Returns 0, 1 when the simulator refuses or cannot be reached, 2 on bad input.
    """
    if state is None:
        print(
            f"{prog}: --send needs --state DIR (the demo prints its state directory)",
            file=sys.stderr,
        )
        return 2
    try:
        command = json.loads(text)
    except ValueError as e:
        print(f"{prog}: --send wants a JSON object: {e}", file=sys.stderr)
        return 2
    if not isinstance(command, dict):
        print(f"{prog}: --send wants a JSON object", file=sys.stderr)
        return 2
    try:
        reply = link_command(str(state / LINK_SOCKET), command)
    except DemoError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0


def _interrupted(signum: int, frame: object) -> None:
    del frame
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


__all__ = ["Appliance", "DemoError", "appliance", "link_command", "main"]
