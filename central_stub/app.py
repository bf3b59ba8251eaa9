"""Composition root of the central server: ``init`` makes a central, ``run`` serves it.

``init`` creates the state directory (0700), the empty database with its
owner lock, and central's TLS identity under ``tls/``: a P-256 CA
(``ca.crt``, what every outer module pins as its only trust anchor for
central, and ``ca.key``) and a server certificate it issued for the given
names (``server.crt`` with the chain, ``server.key``).  Pinning the CA rather
than the leaf lets central renew its server certificate without touching
any gateway.  The signing key must already exist (``optogate keys
init-central``).

``run`` loads the configuration and keys, wires the repository, the
protocol core and the listeners together, logs one JSON line per event to
stdout, writes ``status.json`` (every ``STATUS_INTERVAL``) for ``central
status``, speaks systemd's readiness and watchdog protocol (``Type=notify``,
see ``optogate-central.service``), and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Final

from central_stub.config import CentralConfig, Listen
from central_stub.gateway import CentralService, Event
from central_stub.repository import DB_NAME, TinyRepository
from central_stub.server import CentralServer, tls_server_context
from firmware.common import sdnotify
from firmware.common.crypto.keys import SigningKey
from firmware.common.crypto.tls import (
    PemPair,
    certificate_fingerprint,
    issue_server_certificate,
    make_gateway_ca,
)
from firmware.common.errors import ConfigError, OptogateError
from firmware.common.store.atomic import PRIVATE_MODE, atomic_write
from firmware.common.store.tinystore import Store

#: How often the running server refreshes status.json.
STATUS_INTERVAL: Final = 5.0
#: File names under the state directory.
STATUS_NAME: Final = "status.json"
CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.crt"
SERVER_KEY: Final = "server.key"
#: Certificates and the status file are not secret.
PUBLIC_MODE: Final = 0o644


def log_line(event: str, **fields: object) -> None:
    """Write one structured log line (JSON) to stdout."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(record, separators=(",", ":"), default=str), flush=True)


class _JsonLogHandler(logging.Handler):
    """Library log records (the Link's "link down"...) as structured lines on stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log_line("log", level=record.levelname, logger=record.name, message=record.getMessage())
        except Exception:  # a log line must never take the server down
            self.handleError(record)


def configure_logging() -> None:
    """Send WARNING and above from every library logger to stdout as JSON lines."""
    root = logging.getLogger()
    root.handlers[:] = [_JsonLogHandler()]
    root.setLevel(logging.WARNING)


def load_signing_key(config: CentralConfig) -> SigningKey:
    """Return central's signing key.  Raises ConfigError naming what to run if it is missing."""
    if not config.signing_key.exists():
        raise ConfigError(
            f"no signing key at {config.signing_key}: "
            f"run 'optogate keys init-central {config.signing_key.parent}' first"
        )
    return SigningKey.load(config.signing_key)


def init_state(
    config: CentralConfig,
    *,
    dns_names: list[str],
    ip_addresses: list[str],
    force: bool = False,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """Create central's state directory, database and TLS identity; return a summary.

    Raises ConfigError (no signing key; already initialised without
    ``force``), StorageError, ValueError (a bad name or address).
    """
    key = load_signing_key(config)
    state = config.state_dir
    db = state / DB_NAME
    if db.exists() and not force:
        raise ConfigError(f"{state} is already initialised (use --force to renew the TLS files)")
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    tls = config.tls_dir
    tls.mkdir(mode=0o700, exist_ok=True)
    when = now or datetime.datetime.now(datetime.UTC)
    ca_cert = tls / CA_CERT
    if ca_cert.exists() and (tls / CA_KEY).exists():
        ca = PemPair((tls / CA_KEY).read_bytes(), ca_cert.read_bytes())
    else:
        ca = make_gateway_ca("central", when)
        atomic_write(tls / CA_KEY, ca.key_pem, PRIVATE_MODE)
        atomic_write(ca_cert, ca.cert_pem, PUBLIC_MODE)
    names = dns_names or ([] if ip_addresses else ["localhost"])
    ips = ip_addresses or ([] if dns_names else ["127.0.0.1"])
    server = issue_server_certificate(
        ca, common_name=(names or ips)[0], dns_names=names, ip_addresses=ips, now=when
    )
    atomic_write(tls / SERVER_KEY, server.key_pem, PRIVATE_MODE)
    atomic_write(tls / SERVER_CERT, server.cert_pem + ca.cert_pem, PUBLIC_MODE)
    Store(db).close()  # creates the lock file; the database file appears with the first write
    repo = TinyRepository(state)
    with repo.transaction() as tx:
        tx.set_counter("initialised", int(when.timestamp()))
    return {
        "state_dir": str(state),
        "central_key_id": key.key_id,
        "ca_cert": str(ca_cert),
        "ca_fingerprint_sha256": certificate_fingerprint(ca.cert_pem),
    }


async def run(config: CentralConfig, *, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); return the exit status.

    Raises ConfigError, PortError or StorageError if central cannot start.
    """
    key = load_signing_key(config)
    if not (config.state_dir / DB_NAME).exists():
        raise ConfigError(f"{config.state_dir} is not initialised: run 'optogate central init'")
    if not config.listen and not config.serial:
        raise ConfigError("nothing to serve: add [[listen]] or [[serial]], or pass --listen")
    repo = TinyRepository(config.state_dir)
    debris = repo.blobs.remove_debris()
    if debris:
        log_line("blob_debris_removed", files=debris)

    def on_event(event: Event) -> None:
        log_line(event.name, **event.fields)

    service = CentralService(repo, key, sync_expiry=config.sync_expiry, on_event=on_event)
    tls = config.tls_dir
    ctx = tls_server_context(tls / SERVER_CERT, tls / SERVER_KEY)
    server = CentralServer(config, service, log_line)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(ctx)
    log_line(
        "started",
        central_key_id=key.key_id,
        listen=[f"{h}:{p}" for h, p in server.addresses],
        serial=[s.port for s in config.serial],
    )
    sdnotify.notify("READY=1")
    watchdog = sdnotify.watchdog_interval()
    # ping systemd's watchdog at half its period: one late ping is not a restart
    period = STATUS_INTERVAL if watchdog is None else min(STATUS_INTERVAL, watchdog / 2)
    try:
        while not stop.is_set():
            write_status(config, server.status())
            sdnotify.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await stop.wait()
    finally:
        sdnotify.notify("STOPPING=1")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.aclose()
        with contextlib.suppress(OptogateError):
            write_status(config, {**server.status(), "stopped": True})
        log_line("stopped", **{k: v for k, v in server.status().items() if isinstance(v, int)})
    return 0


def write_status(config: CentralConfig, status: dict[str, object]) -> None:
    """Replace ``status.json`` in the state directory.  Raises StorageError."""
    doc = {"written": int(time.time()), **status}
    atomic_write(config.state_dir / STATUS_NAME, json.dumps(doc, indent=1).encode(), PUBLIC_MODE)


def with_listen(config: CentralConfig, addresses: list[str]) -> CentralConfig:
    """Return ``config`` with extra ``HOST:PORT`` listeners.  Raises ConfigError."""
    extra = []
    for text in addresses:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"--listen {text!r}: use HOST:PORT")
        extra.append(Listen(host or "127.0.0.1", int(port)))
    from dataclasses import replace

    return replace(config, listen=config.listen + tuple(extra))


def main_run(config: CentralConfig) -> int:
    """Run the server in a fresh event loop; return the exit status."""
    configure_logging()
    try:
        return asyncio.run(run(config))
    except OptogateError as e:
        print(f"optogate central run: {e}", file=sys.stderr)
        return 1


def status_of(config: CentralConfig) -> dict[str, object]:
    """Return the last status the server wrote, or {} if it never ran."""
    path: Path = config.state_dir / STATUS_NAME
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
