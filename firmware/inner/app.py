"""The inner module daemon: the one place where its pieces are wired together.

Theory of operation
-------------------
:class:`InnerDaemon` loads the keys ``optogate keys gateway`` wrote, takes
the state directory's owner lock, and builds:

* the trust state (:class:`~firmware.inner.trust.GatewayTrust`: sealed
  objects, version registry, trusted time),
* the usage journal (:mod:`firmware.inner.metering`),
* the service store and builder (:mod:`firmware.inner.services`,
  :mod:`firmware.inner.builder`),
* the link to the outer module (:mod:`firmware.inner.upstream`),
* the LAN API (:mod:`firmware.inner.api`) on HTTPS, TLS 1.3 only,
* the power watcher (``[gpio]``) and the status file.

Background loops: periodic sync, periodic usage shipment (both also run as
soon as a new link session comes up), trusted-time persistence, the status
file and the systemd watchdog.  A sync is single flight: the periodic loop,
a new session and calls waiting to pay all share one exchange.

Power: peer power lost forces the link down at once (builds fail fast with
503, built services keep serving); power back lets the session handshake,
after which sync and usage shipment run.  Own power failing stops taking
work, gives calls in flight a short grace, flushes the journal and exits
with :data:`EXIT_POWER` so systemd restarts the daemon when power returns.
SIGTERM/SIGINT stop the same way with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from firmware.common import sdnotify
from firmware.common.adapters.serial import open_serial
from firmware.common.adapters.tcp import connect_tcp
from firmware.common.adapters.transport import Transport
from firmware.common.crypto.errors import UnlistedObject
from firmware.common.crypto.keys import RecipientKey, SigningKey, VerifyKey
from firmware.common.errors import ConfigError, LinkError, OptogateError, RemoteError
from firmware.common.link import messages
from firmware.common.link.session import Role, SessionConfig
from firmware.common.power.gpio import load_backend
from firmware.common.power.monitor import (
    OwnPowerFailing,
    PeerPowerLost,
    PeerPowerRestored,
    PowerEvent,
)
from firmware.common.power.watcher import PowerWatcher
from firmware.common.store.lock import OwnerLock
from firmware.inner.api import InnerApi
from firmware.inner.builder import ServiceBuilder
from firmware.inner.config import InnerConfig
from firmware.inner.metering import InvalidAck, UsageJournal, check_ack
from firmware.inner.observe import EventLog, LogBridge, Metrics
from firmware.inner.runtimes import load_runtime
from firmware.inner.runtimes.base import Limits, Runtime
from firmware.inner.runtimes.python import PythonRuntimeConfig
from firmware.inner.services import Installed, ServiceStore
from firmware.inner.trust import GatewayTrust
from firmware.inner.upstream import Upstream, UpstreamUnavailable

#: Exit status after own power failed: EX_TEMPFAIL, "try again later".
EXIT_POWER: Final = 75
#: Exit status after the usage journal failed to sync (EX_IOERR): a restart
#: re-reads it from disk; until then no call is answered without its record.
EXIT_STORAGE: Final = 74
#: Exit status when the daemon cannot start (bad keys, state, port in use).
EXIT_START: Final = 78
#: A refresh asked by a call is skipped if a sync succeeded this recently:
#: a burst of 402s costs one exchange, not one per call.
MIN_REFRESH_S: Final = 2.0
#: Calls in flight get this long to finish when the daemon stops.
STOP_GRACE_S: Final = 5.0
#: Own power failing leaves seconds at best: a shorter grace.
POWER_GRACE_S: Final = 1.0
#: The status file is rewritten this often (and read by `optogate inner status`).
STATUS_INTERVAL_S: Final = 1.0
#: Trusted time is offered for persistence this often (it writes at most once a minute).
TICK_S: Final = 10.0
STATUS_FILE: Final = "status.json"
BOOT_ID_FILE: Final = "/proc/sys/kernel/random/boot_id"


def read_boot_id() -> str:
    """Return the kernel's boot id (trusted time's anchor tag), or "" if unknown."""
    try:
        return Path(BOOT_ID_FILE).read_text().strip()
    except OSError:
        return ""


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Return the LAN API's server context: TLS 1.3 only.  Raises ConfigError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the LAN API certificate {cert}: {e}") from e
    return ctx


def write_status(path: Path, doc: dict[str, Any]) -> None:
    """Replace the status file atomically (rename; no fsync: it is rewritten every second)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


class InnerDaemon:
    """The inner module; :meth:`run` until stopped (see the module docstring)."""

    def __init__(self, config: InnerConfig, *, log: EventLog | None = None) -> None:
        self.config = config
        self.log = log or EventLog()
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._exit = 0
        self._sync_task: asyncio.Task[bool] | None = None
        self._last_sync_ok = -1e9
        self._ship_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self.stats = {"syncs": 0, "sync_failures": 0, "batches_acked": 0, "ship_failures": 0}
        self._started = time.monotonic()

    # ------------------------------------------------------------------ set-up

    def _load_keys(self) -> None:
        kd = self.config.keys_dir
        try:
            identity = json.loads((kd / "identity.json").read_text())
            self.gateway = str(identity["gateway"])
            self.floor = int(identity.get("provisioned_at", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {kd / 'identity.json'}: {e}") from e
        self.recipient = RecipientKey.load(kd / "hpke.key")
        self.signer = SigningKey.load(kd / "signing.key")
        self.central = VerifyKey.load(kd / "central.pub")

    async def _connect(self) -> Transport:
        link = self.config.link
        if link.transport == "tcp":
            host, port = link.tcp_address()
            return await connect_tcp(host, port, connect_timeout=5.0)
        return await open_serial(link.device, link.baud)

    def _make_runtime(self, inst: Installed) -> Runtime:
        m = inst.bundle.manifest
        limits = Limits(m.limits.timeout_s, m.limits.memory_mb, m.limits.max_result_bytes)
        rc = self.config.runtime
        py = PythonRuntimeConfig(
            pool_size=rc.pool_size, user=rc.user, isolate_network=rc.isolate_network
        )
        if rc.python:
            py = dataclasses.replace(py, python=rc.python)
        return load_runtime(m.runtime, inst.files_dir, m.entry, limits, python_config=py)

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        """Serve until stopped; return the exit status.

        Raises ConfigError or another OptogateError when it cannot start.
        """
        bridge = LogBridge(self.log)
        logging.getLogger().addHandler(bridge)
        try:
            return await self._run_with_keys()
        finally:
            logging.getLogger().removeHandler(bridge)

    async def _run_with_keys(self) -> int:
        cfg = self.config
        self._load_keys()
        cfg.state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        lock = OwnerLock(cfg.state_dir / "inner.lock")
        lock.acquire()
        try:
            return await self._run_locked()
        finally:
            lock.release()

    async def _run_locked(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.trust = GatewayTrust(
            cfg.state_dir / "trust",
            recipient=self.recipient,
            central=self.central,
            gateway=self.gateway,
            boot_id=read_boot_id(),
            mono=time.monotonic(),
            floor=self.floor,
        )
        self.journal = UsageJournal(
            cfg.state_dir / "usage",
            key=self.signer,
            gateway=self.gateway,
            max_records=cfg.batch_max_records,
        )
        self.journal.open()
        services_dir = cfg.state_dir / "services"
        services_dir.mkdir(mode=0o755, exist_ok=True)
        baud = cfg.link.baud if cfg.link.transport == "serial" else None
        self.upstream = Upstream(
            self._connect,
            SessionConfig(role=Role.CLIENT, baud=baud),
            on_up=self._on_link_up,
            log=self.log,
        )
        self.builder = ServiceBuilder(
            store=ServiceStore(services_dir),
            trust=self.trust,
            upstream=self.upstream,
            sync=self._sync_or_raise,
            make_runtime=self._make_runtime,
            fetch_timeout=cfg.link.fetch_timeout_s,
            retry_after=cfg.link.retry_after_s,
            log=self.log,
        )
        self.api = InnerApi(
            config=cfg.api,
            link=cfg.link,
            trust=self.trust,
            builder=self.builder,
            journal=self.journal,
            refresh=self.refresh,
            metrics=self.metrics,
            log=self.log,
            health=self.health,
        )
        self._add_collectors()
        ssl_ctx = tls_context(cfg.keys_dir / "tls.crt", cfg.keys_dir / "tls.key")
        runner = web.AppRunner(
            self.api.app(),
            access_log=None,
            keepalive_timeout=cfg.api.idle_timeout_s,
            handle_signals=False,
            shutdown_timeout=STOP_GRACE_S,
        )
        await runner.setup()
        try:
            await self.builder.load_installed()
            site = web.TCPSite(runner, cfg.api.host, cfg.api.port, ssl_context=ssl_ctx, backlog=512)
            try:
                await site.start()
            except OSError as e:
                raise ConfigError(f"cannot listen on {cfg.api.host}:{cfg.api.port}: {e}") from e
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, 0, "signal")
            self._spawn(self.upstream.run(), "upstream")
            self._spawn(self._periodic(cfg.link.sync_interval_s, self.sync_now), "sync")
            self._spawn(self._periodic(cfg.link.usage_interval_s, self.ship_usage), "usage")
            self._spawn(self._periodic(TICK_S, self._tick), "tick")
            self._spawn(self._periodic(STATUS_INTERVAL_S, self._status_tick), "status")
            self._spawn(self._watch_power(), "power")
            self.log(
                "started",
                gateway=self.gateway,
                port=cfg.api.port,
                services=sorted(self.builder.loaded),
                link=cfg.link.transport,
            )
            sdnotify.notify("READY=1\nSTATUS=serving")
            self._spawn(self._watchdog(), "watchdog")
            await self._stop.wait()
        finally:
            await self._shutdown(runner)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self._exit

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"inner-{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # nothing dies silently: a dead loop stops the daemon
            self.log("task_failed", task=task.get_name(), error=repr(error))
            self.stop(70, f"{task.get_name()} failed")

    def stop(self, code: int, why: str) -> None:
        """Ask the daemon to stop with exit status ``code``."""
        if not self._stop.is_set():
            self._exit = code
            self.log("stopping", reason=why, code=code)
            self._stop.set()

    async def _shutdown(self, runner: web.AppRunner) -> None:
        sdnotify.notify("STOPPING=1")
        if hasattr(self, "api"):
            self.api.accepting = False
            grace = POWER_GRACE_S if self._exit == EXIT_POWER else STOP_GRACE_S
            deadline = time.monotonic() + grace
            while self.api.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if self.api.in_flight:
                self.log("calls_abandoned", count=self.api.in_flight)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await runner.cleanup()
        if hasattr(self, "builder"):
            await self.builder.aclose()
        if hasattr(self, "journal"):
            await self.journal.aclose()
        if hasattr(self, "trust"):
            with contextlib.suppress(OptogateError):
                self.trust.tick(time.monotonic())
            with contextlib.suppress(OSError):
                doc = {**self.status(), "stopped": True, "exit": self._exit}
                write_status(self.config.state_dir / STATUS_FILE, doc)
        self.log("stopped", code=self._exit)

    # ------------------------------------------------------------------ loops

    async def _periodic(self, interval: float, fn: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await fn()
            await asyncio.sleep(interval)

    async def _tick(self) -> None:
        try:
            self.trust.tick(time.monotonic())
        except OptogateError as e:
            self.log("time_persist_failed", error=str(e))

    async def _status_tick(self) -> None:
        if self.journal.failed is not None:
            self.log("usage_journal_failed", error=str(self.journal.failed))
            self.stop(EXIT_STORAGE, "the usage journal cannot be written")
        try:
            await asyncio.to_thread(
                write_status, self.config.state_dir / STATUS_FILE, self.status()
            )
        except OSError as e:
            self.log("status_write_failed", error=str(e))

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval / 2)

    async def _watch_power(self) -> None:
        gpio = self.config.gpio
        backend = load_backend(gpio.backend)
        follower_task: asyncio.Task[None] | None = None
        try:
            if gpio.backend == "sim":
                from firmware.common.power.sim import SimGpio
                from firmware.common.power.simlink import SimLinkFollower

                assert isinstance(backend, SimGpio)
                follower = SimLinkFollower(self.config.sim_control, backend, "b", gpio)
                follower_task = asyncio.ensure_future(follower.run())
                async with asyncio.timeout(10):
                    await follower.synced.wait()
            watcher = PowerWatcher(backend, gpio)
            await watcher.run(self._on_power)
        finally:
            if follower_task is not None:
                follower_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OptogateError):
                    await follower_task
            backend.close()

    def _on_power(self, event: PowerEvent) -> None:
        if isinstance(event, PeerPowerLost):
            self.log("peer_power_lost")
            self.upstream.peer_power(False)
        elif isinstance(event, PeerPowerRestored):
            self.log("peer_power_restored")
            self.upstream.peer_power(True)
        elif isinstance(event, OwnPowerFailing):
            self.log("own_power_failing")
            self.stop(EXIT_POWER, "own power failing")

    def _on_link_up(self) -> None:
        # A new session: catch up at once (sync first, then usage).
        async def catch_up() -> None:
            await self.sync_now()
            await self.ship_usage()

        task = asyncio.ensure_future(catch_up())
        task.set_name("inner-catch-up")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # ------------------------------------------------------------------ sync and usage

    async def sync_now(self) -> bool:
        """Run one sync (or join the running one); return True if it succeeded."""
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.ensure_future(self._do_sync())
        return await asyncio.shield(self._sync_task)

    async def _sync_or_raise(self) -> None:
        if not await self.sync_now():
            raise UpstreamUnavailable("sync with central failed")

    async def refresh(self, wait: float) -> bool:
        """Sync within ``wait`` seconds unless one just succeeded; return True if state moved."""
        if not self.upstream.connected:
            return False
        if time.monotonic() - self._last_sync_ok < MIN_REFRESH_S:
            return False
        try:
            async with asyncio.timeout(wait):
                return await self.sync_now()
        except TimeoutError:
            return False

    async def _do_sync(self) -> bool:
        if not self.upstream.connected:
            return False
        # name the licence set held: central then lists it without resending it
        since = self.trust.licence_version
        try:
            reply = await self._request_sync(since)
            try:
                self.trust.receive_sync(reply.sealed, reply.sealed_licences, time.monotonic())
            except UnlistedObject:
                if since == 0 or reply.sealed_licences:
                    raise
                # "unchanged", yet the metadata lists another set than the one held
                # (say, a relay's stale answer): ask once more, for the whole set
                self.log("sync_set_not_held", since=since)
                reply = await self._request_sync(0)
                self.trust.receive_sync(reply.sealed, reply.sealed_licences, time.monotonic())
        except (LinkError, RemoteError, OptogateError) as e:
            self.stats["sync_failures"] += 1
            self.log("sync_failed", error=f"{type(e).__name__}: {e}")
            return False
        self.stats["syncs"] += 1
        self._last_sync_ok = time.monotonic()
        self.builder.reconcile(self.trust.licences, self.trust.now(time.monotonic()))
        self.log("synced", trusted_time=self.trust.now(time.monotonic()))
        return True

    async def _request_sync(self, since: int) -> messages.SyncData:
        return await self.upstream.request(
            messages.Sync(since_version=since),
            timeout=self.config.link.sync_timeout_s,
            expect=messages.SyncData,
        )

    async def ship_usage(self) -> None:
        """Cut the journal into batches and send every pending one until acked."""
        async with self._ship_lock:
            try:
                await self.journal.cut()
            except OptogateError as e:
                self.log("usage_cut_failed", error=str(e))
                return
            for batch_id, blob, path in self.journal.pending_batches():
                if not self.upstream.connected:
                    return
                try:
                    reply = await self.upstream.request(
                        messages.UsageReport(batch=blob),
                        timeout=self.config.link.sync_timeout_s,
                        expect=messages.UsageAck,
                    )
                    if reply.batch_id != batch_id:
                        raise InvalidAck("the ack names another batch")
                    check_ack(
                        reply.sealed_ack,
                        batch_id=batch_id,
                        batch=blob,
                        gateway=self.gateway,
                        recipient=self.recipient,
                        central=self.central,
                        now=self.trust.now(time.monotonic()),
                    )
                    self.journal.acknowledged(path)
                except OptogateError as e:
                    self.stats["ship_failures"] += 1
                    self.log("usage_ship_failed", batch=batch_id, error=f"{type(e).__name__}: {e}")
                    return
                self.stats["batches_acked"] += 1
                self.log("usage_acked", batch=batch_id)

    # ------------------------------------------------------------------ state

    def health(self) -> dict[str, Any]:
        """Return the unauthenticated health summary (no secrets, no customer names)."""
        return {
            "status": "ok" if self.api.accepting else "stopping",
            "link": "up" if self.upstream.connected else "down",
            "services_built": len(self.builder.loaded),
            "uptime_s": round(time.monotonic() - self._started, 1),
        }

    def status(self) -> dict[str, Any]:
        """Return the status `optogate inner status` shows."""
        mono = time.monotonic()
        licences = self.trust.licences
        revoked = licences.revoked if licences is not None else frozenset()
        now = self.trust.now(mono)
        return {
            "updated_at_mono": mono,
            "pid": os.getpid(),
            "gateway": self.gateway,
            "trusted_time": now,
            "link": {
                "state": "up" if self.upstream.connected else "down",
                "peer_powered": self.upstream.peer_powered,
                **self.upstream.stats,
            },
            "services": {
                name: {"version": svc.version, "in_flight": svc.in_flight}
                for name, svc in sorted(self.builder.loaded.items())
            },
            "builds": {k: v.value for k, v in self.builder.board.services().items()},
            "licences": [
                {
                    "id": lic.licence_id,
                    "customer": lic.customer,
                    "service": lic.service,
                    "valid_until": lic.valid_until,
                    "revoked": lic.licence_id in revoked,
                    "valid": lic.is_valid_at(now) and lic.licence_id not in revoked,
                }
                for lic in (licences.licences if licences else ())
            ],
            "usage": {**self.journal.queued(), **self.journal.stats},
            "sync": dict(self.stats),
            "log": {"written": self.log.written, "dropped": self.log.dropped},
        }

    def _add_collectors(self) -> None:
        m = self.metrics
        m.describe("optogate_inner_link_up", "gauge", "1 while the link to the outer module is up")
        m.describe("optogate_inner_services_built", "gauge", "services built and warm")
        m.describe(
            "optogate_inner_usage_queued", "gauge", "usage entries and batches not yet acked"
        )
        m.describe("optogate_inner_syncs_total", "counter", "syncs by result")
        m.describe(
            "optogate_inner_log_dropped_total", "counter", "log lines that could not be written"
        )
        m.describe("optogate_inner_builds_total", "counter", "builder events")

        def collect() -> list[tuple[str, dict[str, str], float]]:
            q = self.journal.queued()
            return [
                ("optogate_inner_link_up", {}, 1.0 if self.upstream.connected else 0.0),
                ("optogate_inner_services_built", {}, float(len(self.builder.loaded))),
                ("optogate_inner_usage_queued", {"kind": "entries"}, float(q["entries"])),
                ("optogate_inner_usage_queued", {"kind": "batches"}, float(q["batches"])),
                ("optogate_inner_syncs_total", {"result": "ok"}, float(self.stats["syncs"])),
                (
                    "optogate_inner_syncs_total",
                    {"result": "failed"},
                    float(self.stats["sync_failures"]),
                ),
                ("optogate_inner_log_dropped_total", {}, float(self.log.dropped)),
                *(
                    ("optogate_inner_builds_total", {"event": k}, float(v))
                    for k, v in self.builder.stats.items()
                ),
            ]

        m.add_collector(collect)
