"""Central's configuration: ``central.toml``, or just a state directory.

A config file looks like this (relative paths are relative to the file's
directory; only ``state_dir`` is required)::

    [central]
    state_dir = "state"                # database, blobs, TLS files
    signing_key = "state/central.key"  # from `optogate keys init-central` (default: in state_dir)
    publisher_keys = ["vendor.pub"]    # Ed25519 keys whose bundle signatures are accepted
    sync_expiry = "7d"                 # freeze window of sync metadata
    max_connections = 1000

    [[listen]]                         # TCP with TLS; repeatable
    host = "0.0.0.0"
    port = 7443

    [[serial]]                         # an answering modem; repeatable
    port = "/dev/ttyACM0"
    auto_answer_rings = 0              # 0: answer each RING with ATA; N: modem auto-answers (S0=N)

Without a file (``--state DIR``) the state directory is DIR, the signing key
``DIR/central.key``, no publisher key but central's own, and no listener
unless ``central run --listen HOST:PORT`` names one.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from firmware.common.errors import ConfigError

#: Default freeze window: a revocation reaches every gateway that syncs, and
#: one that is cut off keeps serving for at most a week (docs/security.md).
DEFAULT_SYNC_EXPIRY: Final = 7 * 86400
#: Concurrent gateway connections before new ones are refused.
DEFAULT_MAX_CONNECTIONS: Final = 1000
#: File names inside the state directory.
KEY_NAME: Final = "central.key"
TLS_DIR: Final = "tls"


@dataclass(frozen=True)
class Listen:
    """One TCP (TLS) listening address."""

    host: str
    port: int


@dataclass(frozen=True)
class SerialListener:
    """One answering modem on a serial port."""

    port: str
    auto_answer_rings: int = 0
    baudrate: int = 115200


@dataclass(frozen=True)
class CentralConfig:
    """Everything ``central`` needs to find its state and serve."""

    state_dir: Path
    signing_key: Path
    publisher_keys: tuple[Path, ...] = ()
    sync_expiry: int = DEFAULT_SYNC_EXPIRY
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    listen: tuple[Listen, ...] = ()
    serial: tuple[SerialListener, ...] = field(default_factory=tuple)

    @property
    def tls_dir(self) -> Path:
        """Directory of central's TLS CA and server certificate."""
        return self.state_dir / TLS_DIR


def for_state_dir(state_dir: Path) -> CentralConfig:
    """Return the configuration implied by a bare state directory."""
    return CentralConfig(state_dir=state_dir, signing_key=state_dir / KEY_NAME)


def _get(table: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = table.get(key, default)
    wrong = value is not None and not isinstance(value, kind)
    if wrong or (isinstance(value, bool) and kind is int):
        raise ConfigError(f"{key} must be {kind.__name__}")
    return value


def load(path: Path) -> CentralConfig:
    """Return the configuration in ``path``.  Raises ConfigError naming the problem."""
    from central_stub.admin import parse_duration
    from central_stub.errors import InvalidInput

    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    base = path.parent
    central = doc.get("central")
    if not isinstance(central, dict):
        raise ConfigError(f"{path}: missing [central] table")
    unknown = set(central) - {
        "state_dir",
        "signing_key",
        "publisher_keys",
        "sync_expiry",
        "max_connections",
    }
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [central]: {sorted(unknown)}")
    state = _get(central, "state_dir", str)
    if not state:
        raise ConfigError(f"{path}: [central] state_dir is required")
    state_dir = base / state
    key = _get(central, "signing_key", str)
    pubs = _get(central, "publisher_keys", list, [])
    if not all(isinstance(p, str) for p in pubs):
        raise ConfigError("publisher_keys must be a list of file names")
    try:
        expiry = parse_duration(_get(central, "sync_expiry", str, "7d"))
    except InvalidInput as e:
        raise ConfigError(f"sync_expiry: {e}") from e
    max_conn = _get(central, "max_connections", int, DEFAULT_MAX_CONNECTIONS)
    if max_conn < 1:
        raise ConfigError("max_connections must be at least 1")
    listen = []
    for item in doc.get("listen", []):
        if not isinstance(item, dict):
            raise ConfigError("[[listen]] entries must be tables")
        port = _get(item, "port", int)
        if port is None or not 0 <= port <= 65535:
            raise ConfigError("[[listen]] needs port = 0..65535")
        listen.append(Listen(_get(item, "host", str, "127.0.0.1"), port))
    serial = []
    for item in doc.get("serial", []):
        if not isinstance(item, dict) or not isinstance(item.get("port"), str):
            raise ConfigError("[[serial]] needs port = DEVICE")
        rings = _get(item, "auto_answer_rings", int, 0)
        if not 0 <= rings <= 255:
            raise ConfigError("auto_answer_rings must be 0..255")
        serial.append(SerialListener(item["port"], rings, _get(item, "baudrate", int, 115200)))
    return CentralConfig(
        state_dir=state_dir,
        signing_key=base / key if key else state_dir / KEY_NAME,
        publisher_keys=tuple(base / p for p in pubs),
        sync_expiry=expiry,
        max_connections=max_conn,
        listen=tuple(listen),
        serial=tuple(serial),
    )
