"""The inner module's configuration file (``inner.toml``), parsed strictly.

Every table and key is listed below with its default; an unknown key, a value
of the wrong type or out of range raises :class:`~firmware.common.errors.ConfigError`
naming the key, so a typo never silently falls back to a default.

::

    [gateway]
    keys_dir  = "keys/inner"          # what `optogate keys gateway` wrote under inner/
    state_dir = "/var/lib/optogate/inner"

    [api]
    host = "0.0.0.0"
    port = 8443
    max_body_bytes = 67108864         # 64 MiB, the bundle format's own cap
    max_header_bytes = 8192
    body_idle_timeout_s = 10.0        # a body chunk must arrive within this
    min_body_rate = 16384             # bytes/s a client must sustain over a body
    idle_timeout_s = 15.0             # a connection without a complete request is closed
    max_auth_failures = 10            # per address, within auth_window_s ...
    auth_window_s = 60.0
    auth_block_s = 60.0               # ... then 429 for this long

    [link]
    transport = "serial"              # or "tcp" (tests, demo)
    device = "/dev/serial0"           # serial
    baud = 115200                     # serial
    address = "127.0.0.1:7300"        # tcp: the outer module's link listener
    fetch_timeout_s = 900.0           # one FETCH_SERVICE exchange (a bundle at line rate)
    build_wait_s = 60.0               # a call waits this long for a build, then 503
    sync_timeout_s = 30.0
    payment_sync_wait_s = 5.0         # bounded wait for a fresh sync before a 402
    sync_interval_s = 300.0           # periodic sync
    usage_interval_s = 60.0           # periodic usage shipment
    retry_after_s = 30.0              # Retry-After of a 503

    [runtime]
    pool_size = 2
    user = "nobody"
    isolate_network = true
    python = ""                       # workers' interpreter ("": the daemon's own); its
                                      # library must be readable by `user`

    [metering]
    batch_max_records = 1000

    [gpio]                            # firmware.common.power.config.PowerConfig
    backend = "none"

    [sim]                             # only with gpio.backend = "sim"
    control = ""                      # the link simulator's control socket

Relative paths are relative to the configuration file's directory.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from firmware.common.errors import ConfigError
from firmware.common.power.config import PowerConfig

#: The LAN API's default port (docs/api.md).
DEFAULT_PORT: Final = 8443
#: Bodies: the bundle format's whole-bundle cap; a DXF or a document fits easily.
DEFAULT_MAX_BODY: Final = 64 * 2**20
#: Headers: docs/api.md promises 8 KiB (the Optogate-Params header included).
DEFAULT_MAX_HEADER: Final = 8 * 1024
#: A LAN client that stalls mid-body for 10 s is gone or hostile.
DEFAULT_BODY_IDLE_S: Final = 10.0
#: 16 KiB/s is far below any LAN (even Wi-Fi at its worst) yet cuts off a
#: slowloris that trickles bytes to hold a connection slot.
DEFAULT_MIN_BODY_RATE: Final = 16 * 1024
#: A connection that has not completed a request (idle keep-alive, or a
#: slowloris trickling its headers) is closed after this long: programs on
#: a LAN reconnect in a millisecond, a held slot costs a file descriptor.
DEFAULT_IDLE_S: Final = 15.0
#: Ten wrong keys a minute from one address is no honest program's behaviour.
DEFAULT_MAX_AUTH_FAILURES: Final = 10
DEFAULT_AUTH_WINDOW_S: Final = 60.0
DEFAULT_AUTH_BLOCK_S: Final = 60.0
#: A 64 MiB bundle needs ~95 min at 115200 baud; real bundles are tens of
#: KiB (seconds).  15 min covers a few MiB on a slow line.
DEFAULT_FETCH_TIMEOUT_S: Final = 900.0
#: A program's call waits for a build this long; the build itself goes on
#: (up to fetch_timeout_s) and the caller retries after Retry-After.
DEFAULT_BUILD_WAIT_S: Final = 60.0
DEFAULT_SYNC_TIMEOUT_S: Final = 30.0
#: "Pay, then call again": long enough for the outer module to reach central
#: over the internet, short enough that a program's call does not hang.
DEFAULT_PAYMENT_WAIT_S: Final = 5.0
DEFAULT_SYNC_INTERVAL_S: Final = 300.0
DEFAULT_USAGE_INTERVAL_S: Final = 60.0
DEFAULT_RETRY_AFTER_S: Final = 30.0
#: About 150 bytes a record: 1,000 records is a ~150 KiB batch, seconds on the UART.
DEFAULT_BATCH_MAX: Final = 1000

_TABLES: Final = {"gateway", "api", "link", "runtime", "metering", "gpio", "sim"}


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: where and how the LAN API listens."""

    host: str = "0.0.0.0"  # noqa: S104 - the LAN API serves the LAN
    port: int = DEFAULT_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_header_bytes: int = DEFAULT_MAX_HEADER
    body_idle_timeout_s: float = DEFAULT_BODY_IDLE_S
    min_body_rate: int = DEFAULT_MIN_BODY_RATE
    idle_timeout_s: float = DEFAULT_IDLE_S
    max_auth_failures: int = DEFAULT_MAX_AUTH_FAILURES
    auth_window_s: float = DEFAULT_AUTH_WINDOW_S
    auth_block_s: float = DEFAULT_AUTH_BLOCK_S


@dataclass(frozen=True)
class LinkConfig:
    """``[link]``: the optical link to the outer module and its timers."""

    transport: str = "serial"
    device: str = "/dev/serial0"
    baud: int = 115200
    address: str = "127.0.0.1:7300"
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    build_wait_s: float = DEFAULT_BUILD_WAIT_S
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    payment_sync_wait_s: float = DEFAULT_PAYMENT_WAIT_S
    sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S
    usage_interval_s: float = DEFAULT_USAGE_INTERVAL_S
    retry_after_s: float = DEFAULT_RETRY_AFTER_S

    def tcp_address(self) -> tuple[str, int]:
        """Return ``(host, port)`` of ``address``; raise ConfigError if malformed."""
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"link.address must be HOST:PORT, not {self.address!r}")
        return host, int(port)


@dataclass(frozen=True)
class RuntimeSettings:
    """``[runtime]``: the Python runtime's pool."""

    pool_size: int = 2
    user: str = "nobody"
    isolate_network: bool = True
    #: The workers' interpreter; "" means the daemon's own.  Workers dropped
    #: to ``user`` must be able to read its standard library, which a Python
    #: installed under root's home directory does not allow.
    python: str = ""


@dataclass(frozen=True)
class InnerConfig:
    """The whole ``inner.toml``."""

    keys_dir: Path
    state_dir: Path
    api: ApiConfig = field(default_factory=ApiConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    batch_max_records: int = DEFAULT_BATCH_MAX
    gpio: PowerConfig = field(default_factory=PowerConfig)
    sim_control: str = ""


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"[{where}]: unknown keys {sorted(unknown)}")


def _typed(table: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    if key not in table:
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key} must be a {kind.__name__}, not {value!r}")
    return value


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, not {value!r}")


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _dataclass_from(cls: type, table: Mapping[str, Any], where: str) -> Any:
    defaults = cls()
    kwargs = {}
    for name, default in vars(defaults).items():
        kwargs[name] = _typed(table, name, type(default), default, where)
    _check_keys(table, set(kwargs), where)
    obj = cls(**kwargs)
    for name, value in kwargs.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            _positive(value, f"{where}.{name}")
    return obj


def parse_config(doc: Mapping[str, Any], base: Path) -> InnerConfig:
    """Return the configuration in the parsed TOML ``doc``; paths relative to ``base``.

    Raises ConfigError for unknown tables or keys, wrong types, bad values.
    """
    _check_keys(doc, _TABLES, "inner.toml")
    gateway = _table(doc, "gateway")
    _check_keys(gateway, {"keys_dir", "state_dir"}, "gateway")
    for key in ("keys_dir", "state_dir"):
        if not isinstance(gateway.get(key), str) or not gateway[key]:
            raise ConfigError(f"gateway.{key} is required (a path)")
    api: ApiConfig = _dataclass_from(ApiConfig, _table(doc, "api"), "api")
    if api.port > 65535:
        raise ConfigError("api.port must be 1..65535")
    link: LinkConfig = _dataclass_from(LinkConfig, _table(doc, "link"), "link")
    if link.transport not in {"serial", "tcp"}:
        raise ConfigError(f"link.transport must be 'serial' or 'tcp', not {link.transport!r}")
    if link.transport == "tcp":
        link.tcp_address()
    runtime: RuntimeSettings = _dataclass_from(RuntimeSettings, _table(doc, "runtime"), "runtime")
    metering = _table(doc, "metering")
    _check_keys(metering, {"batch_max_records"}, "metering")
    batch_max = _typed(metering, "batch_max_records", int, DEFAULT_BATCH_MAX, "metering")
    _positive(batch_max, "metering.batch_max_records")
    sim = _table(doc, "sim")
    _check_keys(sim, {"control"}, "sim")
    control = _typed(sim, "control", str, "", "sim")
    gpio = PowerConfig.from_mapping(_table(doc, "gpio"))
    if gpio.backend == "sim" and not control:
        raise ConfigError("gpio.backend = 'sim' needs [sim] control = the simulator's socket")
    return InnerConfig(
        keys_dir=(base / gateway["keys_dir"]).resolve(),
        state_dir=(base / gateway["state_dir"]).resolve(),
        api=api,
        link=link,
        runtime=runtime,
        batch_max_records=batch_max,
        gpio=gpio,
        sim_control=str((base / control).resolve()) if control else "",
    )


def load_config(path: Path | str) -> InnerConfig:
    """Read and parse ``inner.toml`` at ``path``; raise ConfigError if unreadable or invalid."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {p}: {e}") from e
    return parse_config(doc, p.parent.resolve())
