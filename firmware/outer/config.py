"""The outer module's configuration file (``outer.toml``), parsed strictly.

Every table and key, with its default (relative paths are relative to the
file's directory; an unknown table or key, a value of the wrong type or out
of range raises :class:`~firmware.outer.errors.OuterConfigError` naming it)::

    [gateway]
    keys_dir  = "keys/outer"          # what `optogate keys gateway` wrote under outer/
    state_dir = "/var/lib/optogate/outer"   # cache/ and status.json

    [optical]                         # the link to the inner module (SERVER role)
    transport = "serial"              # or "tcp" (tests, demo): listen for the inner module
    device = "/dev/serial0"
    baud = 115200
    listen = "127.0.0.1:7300"         # tcp

    [uplink]
    order = ["internet", "dialup"]    # transports tried on every connect, first to last
    idle_hangup_s = 30.0              # hang up after this long with nothing pending
    sync_interval_s = 3600.0          # periodic sync with central
    sync_batch_window_s = 900.0       # a sync due this soon rides on a call that is up
    sync_at_start = true
    backoff_initial_s = 10.0          # after every transport failed: wait, doubling ...
    backoff_max_s = 600.0             # ... up to this
    connect_timeout_s = 120.0         # one transport: dial/connect, session up, authenticate
    request_timeout_s = 1800.0        # one exchange with central (a bundle at modem speed)
    fetch_cache_age_s = 86400.0       # a cached service answers fetches this long
    sync_serve_age_s = 300.0          # a sync this recent answers the inner module's SYNC

    [internet]                        # needed when order names "internet"
    host = "central.example.com"
    port = 7443
    ca = "central-ca.crt"             # central's CA certificate: the only trust anchor
    server_name = ""                  # name to verify in central's certificate (default: host)
    pin_sha256 = ""                   # optional: SHA-256 (hex) of central's certificate itself

    [dialup]                          # needed when order names "dialup"
    device = "/dev/ttyACM0"
    number = "5551234"
    init_string = "ATQ0 V1 E1 S0=0 &C1 &D2"
    baudrate = 115200                 # serial speed to the modem
    default_speed = 33600             # line speed assumed when CONNECT names none
    max_attempts = 2                  # dial attempts per connect (BUSY, NO CARRIER...)
    carrier_timeout_s = 60.0
    command_timeout_s = 5.0
    retry_pause_s = 10.0              # between the attempts of one connect
    max_calls_per_hour = 12

    [gpio]                            # firmware.common.power.config.PowerConfig
    backend = "none"

    [sim]                             # only with gpio.backend = "sim"
    control = ""                      # the link simulator's control socket
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from firmware.common.errors import ConfigError
from firmware.common.power.config import PowerConfig
from firmware.outer.errors import OuterConfigError
from firmware.outer.modem.dialler import DiallerConfig
from firmware.outer.policy import PolicyConfig

#: The optical UART's default speed: what the optocouplers are rated for
#: with margin (docs/hardware.md).
DEFAULT_OPTICAL_BAUD: Final = 115200
#: Line speed of a V.34 call, assumed when the modem's CONNECT names none.
DEFAULT_LINE_SPEED: Final = 33600

_TABLES: Final = {"gateway", "optical", "uplink", "internet", "dialup", "gpio", "sim"}

_T = TypeVar("_T")


@dataclass(frozen=True)
class InternetConfig:
    """TCP+TLS to central, its certificate pinned."""

    host: str
    port: int
    ca: Path
    server_name: str = ""
    pin_sha256: str = ""


@dataclass(frozen=True)
class DialupConfig:
    """The modem and how to call central."""

    device: str
    dialler: DiallerConfig
    baudrate: int = 115200
    default_speed: int = DEFAULT_LINE_SPEED


@dataclass(frozen=True)
class OuterConfig:
    """Everything ``optogate outer run`` needs; see the module docstring."""

    keys_dir: Path
    state_dir: Path
    optical_transport: str = "serial"
    optical_device: str = "/dev/serial0"
    optical_baud: int = DEFAULT_OPTICAL_BAUD
    optical_listen: tuple[str, int] = ("127.0.0.1", 7300)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    connect_timeout: float = 120.0
    request_timeout: float = 1800.0
    fetch_cache_age: float = 86400.0
    sync_serve_age: float = 300.0
    internet: InternetConfig | None = None
    dialup: DialupConfig | None = None
    gpio: PowerConfig = field(default_factory=PowerConfig)
    sim_control: str = ""

    @property
    def cache_dir(self) -> Path:
        """Where the sealed-object cache lives."""
        return self.state_dir / "cache"

    @property
    def status_path(self) -> Path:
        """The status file ``optogate outer status`` reads."""
        return self.state_dir / "status.json"


def load_config(path: Path | str) -> OuterConfig:
    """Read and check ``path``.  Returns the configuration; raises OuterConfigError."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OuterConfigError(f"cannot read {path}: {e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OuterConfigError(f"{path} is not valid TOML: {e}") from e
    return parse_config(doc, path.parent)


def parse_config(doc: Mapping[str, Any], base: Path) -> OuterConfig:
    """Build the configuration from a parsed TOML document.  Raises OuterConfigError."""
    try:
        return _parse(doc, base.resolve())
    except OuterConfigError:
        raise
    except ConfigError as e:  # from PolicyConfig, DiallerConfig, PowerConfig
        raise OuterConfigError(str(e)) from e


def _parse(doc: Mapping[str, Any], base: Path) -> OuterConfig:
    _check_keys(doc, _TABLES, "outer.toml")
    gw = _table(doc, "gateway")
    _check_keys(gw, {"keys_dir", "state_dir"}, "gateway")
    keys_dir = base / _get(gw, "keys_dir", str, "keys/outer", "gateway")
    state_dir = base / _get(gw, "state_dir", str, "/var/lib/optogate/outer", "gateway")

    opt = _table(doc, "optical")
    _check_keys(opt, {"transport", "device", "baud", "listen"}, "optical")
    transport = _get(opt, "transport", str, "serial", "optical")
    if transport not in ("serial", "tcp"):
        raise OuterConfigError(f"optical.transport must be 'serial' or 'tcp', not {transport!r}")
    baud = _get(opt, "baud", int, DEFAULT_OPTICAL_BAUD, "optical")
    if baud <= 0:
        raise OuterConfigError("optical.baud must be positive")
    listen = _address(_get(opt, "listen", str, "127.0.0.1:7300", "optical"), "optical.listen")

    up = _table(doc, "uplink")
    _check_keys(
        up,
        {
            "order",
            "idle_hangup_s",
            "sync_interval_s",
            "sync_batch_window_s",
            "sync_at_start",
            "backoff_initial_s",
            "backoff_max_s",
            "connect_timeout_s",
            "request_timeout_s",
            "fetch_cache_age_s",
            "sync_serve_age_s",
        },
        "uplink",
    )
    order = _get(up, "order", list, ["internet", "dialup"], "uplink")
    if not all(isinstance(x, str) for x in order):
        raise OuterConfigError("uplink.order must be a list of transport names")
    defaults = PolicyConfig()
    policy = PolicyConfig(
        order=tuple(order),
        idle_hangup=_seconds(up, "idle_hangup_s", defaults.idle_hangup),
        sync_interval=_seconds(up, "sync_interval_s", defaults.sync_interval),
        sync_batch_window=_seconds(up, "sync_batch_window_s", defaults.sync_batch_window),
        sync_at_start=_get(up, "sync_at_start", bool, True, "uplink"),
        backoff_initial=_seconds(up, "backoff_initial_s", defaults.backoff_initial),
        backoff_max=_seconds(up, "backoff_max_s", defaults.backoff_max),
    )
    connect_timeout = _seconds(up, "connect_timeout_s", 120.0, positive=True)
    request_timeout = _seconds(up, "request_timeout_s", 1800.0, positive=True)
    fetch_cache_age = _seconds(up, "fetch_cache_age_s", 86400.0)
    sync_serve_age = _seconds(up, "sync_serve_age_s", 300.0)

    internet = None
    if "internet" in policy.order or "internet" in doc:
        net = _table(doc, "internet")
        _check_keys(net, {"host", "port", "ca", "server_name", "pin_sha256"}, "internet")
        port = _get(net, "port", int, 7443, "internet")
        if not 0 < port < 65536:
            raise OuterConfigError("internet.port must be 1..65535")
        pin = _get(net, "pin_sha256", str, "", "internet").lower().replace(":", "")
        if pin and (len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin)):
            raise OuterConfigError("internet.pin_sha256 must be 64 hex digits")
        internet = InternetConfig(
            host=_required(net, "host", "internet"),
            port=port,
            ca=base / _required(net, "ca", "internet"),
            server_name=_get(net, "server_name", str, "", "internet"),
            pin_sha256=pin,
        )

    dialup = None
    if "dialup" in policy.order or "dialup" in doc:
        dial = _table(doc, "dialup")
        _check_keys(
            dial,
            {
                "device",
                "number",
                "init_string",
                "baudrate",
                "default_speed",
                "max_attempts",
                "carrier_timeout_s",
                "command_timeout_s",
                "retry_pause_s",
                "max_calls_per_hour",
            },
            "dialup",
        )
        pause = _seconds(dial, "retry_pause_s", 10.0, positive=True)
        dialler = DiallerConfig(
            number=_required(dial, "number", "dialup"),
            init_string=_get(dial, "init_string", str, DiallerConfig.init_string, "dialup"),
            max_attempts=_get(dial, "max_attempts", int, 2, "dialup"),
            carrier_timeout=_seconds(dial, "carrier_timeout_s", 60.0, positive=True),
            command_timeout=_seconds(dial, "command_timeout_s", 5.0, positive=True),
            backoff_initial=pause,
            backoff_max=max(pause, DiallerConfig.backoff_max),
            max_calls_per_hour=_get(dial, "max_calls_per_hour", int, 12, "dialup"),
        )
        speed = _get(dial, "default_speed", int, DEFAULT_LINE_SPEED, "dialup")
        rate = _get(dial, "baudrate", int, 115200, "dialup")
        if speed < 300 or rate <= 0:
            raise OuterConfigError("dialup.default_speed must be >= 300 and baudrate positive")
        dialup = DialupConfig(
            device=_required(dial, "device", "dialup"),
            dialler=dialler,
            baudrate=rate,
            default_speed=speed,
        )

    sim = _table(doc, "sim")
    _check_keys(sim, {"control"}, "sim")
    control = _get(sim, "control", str, "", "sim")
    gpio = PowerConfig.from_mapping(_table(doc, "gpio"))
    if gpio.backend == "sim" and not control:
        raise OuterConfigError("gpio.backend = 'sim' needs [sim] control = the simulator's socket")

    return OuterConfig(
        keys_dir=keys_dir,
        state_dir=state_dir,
        optical_transport=transport,
        optical_device=_get(opt, "device", str, "/dev/serial0", "optical"),
        optical_baud=baud,
        optical_listen=listen,
        policy=policy,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        fetch_cache_age=fetch_cache_age,
        sync_serve_age=sync_serve_age,
        internet=internet,
        dialup=dialup,
        gpio=gpio,
        sim_control=str(base / control) if control else "",
    )


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise OuterConfigError(f"[{name}] must be a table")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise OuterConfigError(f"{where}: unknown keys {unknown}")


def _get(table: Mapping[str, Any], key: str, kind: type[_T], default: _T, where: str) -> _T:
    value = table.get(key, default)
    if kind is int and isinstance(value, bool):
        raise OuterConfigError(f"{where}.{key} must be an integer")
    if not isinstance(value, kind):
        raise OuterConfigError(f"{where}.{key} must be of type {kind.__name__}")
    return value


def _required(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise OuterConfigError(f"{where}.{key} is required (a non-empty string)")
    return value


def _seconds(
    table: Mapping[str, Any], key: str, default: float, *, positive: bool = False
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OuterConfigError(f"uplink/dialup {key} must be a number of seconds")
    if value < 0 or (positive and value == 0) or math.isnan(value):
        raise OuterConfigError(f"{key} must be {'positive' if positive else 'non-negative'}")
    return float(value)


def _address(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise OuterConfigError(f"{where} must be HOST:PORT, not {text!r}")
    return host, int(port)
