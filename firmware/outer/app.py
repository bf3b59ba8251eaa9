"""The outer module daemon: the one composition root of firmware/outer.

Theory of operation
-------------------
:class:`OuterDaemon` wires the pieces and runs them as sibling tasks:

* the **optical link** to the inner module, a SERVER-role
  :class:`~firmware.common.link.link.Link` on the UART (or, for tests and
  the demo, on each TCP connection the inner module makes), served by the
  :class:`~firmware.outer.relay.Relay`: the outer module only answers;
* the **uplink** (:class:`~firmware.outer.uplink.Uplink`) with its
  supervisor: periodic sync (its replies go into the relay's cache) and
  idle hang-up;
* the **power watcher** on the ``[gpio]`` lines: the inner module's power
  lost takes the optical session down at once (``force_down``: every
  exchange in flight fails now, not after the keepalive); our own
  power-good lost stops the daemon: the uplink hangs up, the status file is
  written a last time, and the process exits with ``EXIT_POWER``;
* the **status LEDs** (dialling, link up, error) and the **status file**
  (``state_dir/status.json``, written atomically every
  ``STATUS_INTERVAL``), which ``optogate outer status`` prints;
* **systemd**: ``READY=1`` once the optical link is open, ``WATCHDOG=1``
  at half the watchdog period, ``STOPPING=1`` on the way out.

Every event is one JSON line on stdout (``{"ts":..., "event":..., ...}``).
Bad input never stops the daemon: garbage on the optical line is dropped and
counted by the session, a request outside the allowlist is answered
``not_allowed`` and counted, a failing modem or central ends in a typed
Error reply.  What stops it: SIGTERM/SIGINT (exit 0), own power failing
(exit 3), the optical port failing or a bug (exit 1; systemd restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Final

from firmware.common import sdnotify
from firmware.common.adapters.serial import open_serial
from firmware.common.adapters.tcp import StreamTransport, serve_tcp
from firmware.common.errors import LinkDown, OptogateError
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from firmware.common.power.gpio import GpioBackend, load_backend
from firmware.common.power.leds import LinkState
from firmware.common.power.monitor import (
    OwnPowerFailing,
    OwnPowerRestored,
    PeerPowerLost,
    PeerPowerRestored,
    PowerEvent,
    PowerMonitor,
)
from firmware.common.power.watcher import LedDriver, PowerWatcher
from firmware.common.store.atomic import atomic_write
from firmware.common.store.lock import OwnerLock
from firmware.outer.cache import SealedCache
from firmware.outer.config import OuterConfig
from firmware.outer.policy import CallState
from firmware.outer.relay import Relay
from firmware.outer.uplink import Connector, DialupConnector, Identity, InternetConnector, Uplink

#: Exit status when our own supply fails: distinct from a crash, so the
#: journal (and a UPS script) can tell a power-down from a bug.
EXIT_POWER: Final = 3
#: Exit status when the daemon cannot start or its optical port fails.
EXIT_FAILURE: Final = 1
#: How often the status file is rewritten (and the LEDs re-derived): a
#: person running `outer status` sees data at most this old.
STATUS_INTERVAL: Final = 2.0
#: Handlers on the optical link at once: the inner module asks few things at
#: a time; more would only queue on the single uplink call anyway.
OPTICAL_CONCURRENCY: Final = 8

Fields = dict[str, str | int | float | bool]


def log_json(event: str, **fields: object) -> None:
    """Write one structured log line to stdout."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stdout.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class OuterDaemon:
    """The outer module; see the module docstring.  ``await run()`` returns the exit status."""

    def __init__(
        self,
        config: OuterConfig,
        *,
        log: Callable[..., None] = log_json,
        backend: GpioBackend | None = None,
    ) -> None:
        """``backend`` replaces the one ``[gpio]`` names (tests drive a SimGpio)."""
        self.config = config
        self._backend = backend
        self._log = log
        self._links: set[Link] = set()
        self._stop = asyncio.Event()
        self._exit = 0
        self._monitor: PowerMonitor | None = None
        self._leds: LedDriver | None = None
        self._uplink: Uplink | None = None
        self._relay: Relay | None = None
        self._started = time.time()
        self.optical_address = ""  # host:port of the TCP listener, once bound
        self.counters: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; return the exit status (0, EXIT_FAILURE or EXIT_POWER)."""
        cfg = self.config
        owner = OwnerLock(cfg.state_dir / "outer.lock")
        try:
            identity = Identity.load(cfg.keys_dir)
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            owner.acquire()  # one daemon per state directory: the cache has one writer
        except (OptogateError, OSError) as e:
            self._log("startup_failed", error=str(e))
            return EXIT_FAILURE
        try:
            return await self._run(identity)
        finally:
            owner.release()

    async def _run(self, identity: Identity) -> int:
        cfg = self.config
        try:
            cache = SealedCache(cfg.cache_dir)
            cache.load()
            connectors = self._connectors()
        except OptogateError as e:
            self._log("startup_failed", error=str(e))
            return EXIT_FAILURE
        uplink = Uplink(
            identity,
            connectors,
            cfg.policy,
            connect_timeout=cfg.connect_timeout,
            request_timeout=cfg.request_timeout,
            # lambdas: the relay they call is made next
            on_sync=lambda reply, since: relay.store_sync(reply, since=since),
            licence_version=lambda: relay.licence_version,
            log=self._log,
        )
        relay = Relay(
            uplink,
            cache,
            identity.central_key,
            status=self.status,
            fetch_cache_age=cfg.fetch_cache_age,
            sync_serve_age=cfg.sync_serve_age,
            log=self._log,
        )
        self._uplink, self._relay = uplink, relay
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, 0, signal.Signals(signum).name)
        tasks: list[asyncio.Task[None]] = []
        backend: GpioBackend | None = None
        try:
            try:
                backend = self._backend or load_backend(cfg.gpio.backend)
                optical = await self._open_optical(relay)
            except OptogateError as e:
                self._log("startup_failed", error=str(e))
                return EXIT_FAILURE
            tasks.append(loop.create_task(self._guard("optical", optical)))
            tasks.append(loop.create_task(self._guard("uplink", uplink.run())))
            tasks.append(loop.create_task(self._guard("power", self._watch_power(backend))))
            tasks.append(loop.create_task(self._guard("status", self._status_loop())))
            tasks.append(loop.create_task(self._guard("watchdog", self._watchdog())))
            self._write_status()
            sdnotify.notify("READY=1\nSTATUS=serving")
            self._log(
                "ready",
                gateway=identity.gateway_id,
                optical=cfg.optical_transport,
                order=list(cfg.policy.order),
            )
            await self._stop.wait()
        finally:
            sdnotify.notify("STOPPING=1")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in list(self._links):
                with contextlib.suppress(OptogateError):
                    await link.aclose()
            await uplink.aclose()
            if backend is not None:
                backend.close()
            self._write_status(state="stopped")
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            self._log("stopped", exit=self._exit)
        return self._exit

    def _request_stop(self, code: int, reason: str) -> None:
        if not self._stop.is_set():
            self._exit = code
            self._log("stopping", reason=reason, exit=code)
        self._stop.set()

    async def _guard(self, name: str, work: Awaitable[object]) -> None:
        """Run one part; if it ends or fails, stop the daemon (nothing dies silently)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._log("part_failed", part=name, error=repr(e))
            self._request_stop(EXIT_FAILURE, f"{name} failed")
            return
        if not self._stop.is_set():
            self._log("part_ended", part=name)
            self._request_stop(EXIT_FAILURE, f"{name} ended")

    def _connectors(self) -> list[Connector]:
        cfg = self.config
        connectors: list[Connector] = []
        if cfg.internet is not None:
            connectors.append(InternetConnector(cfg.internet, cfg.connect_timeout))
        if cfg.dialup is not None:
            connectors.append(DialupConnector(cfg.dialup, self._log))
        return connectors

    # -- optical link -------------------------------------------------------------------------

    async def _open_optical(self, relay: Relay) -> asyncio.Future[None]:
        """Open the optical side; return an awaitable that ends only when it fails."""
        cfg = self.config
        if cfg.optical_transport == "serial":
            transport = await open_serial(cfg.optical_device, cfg.optical_baud)
            link = Link(transport, SessionConfig(role=Role.SERVER, baud=cfg.optical_baud))
            self._links.add(link)
            return asyncio.ensure_future(link.serve(relay.handle, concurrency=OPTICAL_CONCURRENCY))

        async def on_connect(transport: StreamTransport) -> None:
            link = Link(transport, SessionConfig(role=Role.SERVER, baud=None))
            self._links.add(link)
            self._log("optical_connected", peer=transport.name)
            try:
                await link.serve(relay.handle, concurrency=OPTICAL_CONCURRENCY)
            except OptogateError as e:
                self._log("optical_disconnected", peer=transport.name, error=str(e))
            except Exception as e:  # a bug in a handler: fail loudly
                self._log("optical_handler_crashed", error=repr(e))
                self._request_stop(EXIT_FAILURE, "handler crashed")
            finally:
                self._links.discard(link)
                with contextlib.suppress(OptogateError):
                    await link.aclose()

        host, port = cfg.optical_listen
        server = await serve_tcp(host, port, on_connect)
        bound = server.sockets[0].getsockname()
        self._log("optical_listening", address=f"{bound[0]}:{bound[1]}")
        self.optical_address = f"{bound[0]}:{bound[1]}"

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                server.close()

        return asyncio.ensure_future(forever())

    # -- power ----------------------------------------------------------------------------------

    async def _watch_power(self, backend: GpioBackend) -> None:
        cfg = self.config
        leds = LedDriver(backend, cfg.gpio)
        self._leds = leds
        parts = [PowerWatcher(backend, cfg.gpio).run(self._on_power, self._on_power_ready)]
        parts.append(leds.run())
        if cfg.gpio.backend == "sim" and cfg.sim_control:
            from firmware.common.power.sim import SimGpio
            from firmware.common.power.simlink import SimLinkFollower

            if not isinstance(backend, SimGpio):
                raise TypeError("the sim backend is not a SimGpio")
            parts.append(SimLinkFollower(cfg.sim_control, backend, "a", cfg.gpio).run())
        await asyncio.gather(*parts)

    def _on_power_ready(self, monitor: PowerMonitor) -> None:
        self._monitor = monitor
        if not monitor.own_power_good:
            self._request_stop(EXIT_POWER, "own power not good at start")

    def _on_power(self, event: PowerEvent) -> None:
        if isinstance(event, PeerPowerLost):
            self._count("peer_power_lost")
            self._log("peer_power_lost")
            for link in list(self._links):
                link.force_down(LinkDown("the inner module lost power"))
        elif isinstance(event, PeerPowerRestored):
            self._log("peer_power_restored")
        elif isinstance(event, OwnPowerFailing):
            self._count("own_power_failing")
            self._request_stop(EXIT_POWER, "own power failing")
        elif isinstance(event, OwnPowerRestored):
            self._log("own_power_restored")

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> Fields:
        """Return the status summary (flat keys, scalar values): what the inner module and
        ``optogate outer status`` show."""
        fields: Fields = {
            "outer.state": "stopping" if self._stop.is_set() else "running",
            "outer.uptime_s": round(time.time() - self._started, 1),
            "outer.time": round(time.time(), 3),
            "optical.connected": any(link.connected for link in self._links),
        }
        if self._monitor is not None:
            fields["power.inner"] = self._monitor.peer_powered
            fields["power.own_good"] = self._monitor.own_power_good
        if self._uplink is not None:
            fields.update(self._uplink.status())
        if self._relay is not None:
            fields.update(self._relay.statistics())
        for link in list(self._links)[:1]:
            for key, value in sorted(link.statistics().items()):
                fields[f"optical.{key}"] = value
        for key, value in sorted(self.counters.items()):
            fields[f"outer.{key}"] = value
        fields["outer.notify_dropped"] = sdnotify.counters["dropped"]
        return fields

    def _write_status(self, state: str | None = None) -> None:
        fields = self.status()
        if state is not None:
            fields["outer.state"] = state
        fields["outer.pid"] = os.getpid()
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.config.status_path,
                json.dumps(fields, sort_keys=True).encode(),
                mode=0o644,
            )
        except (OptogateError, OSError) as e:
            self._count("status_write_failures")
            self._log("status_write_failed", error=str(e))

    async def _status_loop(self) -> None:
        while True:
            self._write_status()
            self._show_leds()
            await asyncio.sleep(STATUS_INTERVAL)

    def _show_leds(self) -> None:
        if self._leds is None or self._uplink is None:
            return
        policy = self._uplink.policy
        if policy.state is CallState.CONNECTING:
            state = LinkState.DIALLING
        elif policy.state is CallState.UP:
            state = LinkState.SYNCING
        elif policy.failures:
            state = LinkState.ERROR
        elif any(link.connected for link in self._links):
            state = LinkState.LINK_UP
        else:
            state = LinkState.IDLE
        if state is not self._leds.state:
            self._leds.set_state(state)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            await asyncio.Event().wait()
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval / 2)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
