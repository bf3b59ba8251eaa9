"""The service builder: S302-S304, from "not built" to a warm runtime, once.

Theory of operation
-------------------
:class:`BuildBoard` is the sans-I/O core.  It holds one state per service
and answers, for a call at time ``now``, what the adapter must do:

==========  ==============================================================
state       a call ...
==========  ==============================================================
ABSENT      starts a build (``Start``) and the state becomes BUILDING
BUILDING    waits for the build already running (``Wait``): single flight
BUILT       runs at once (``Ready``)
FAILED      is refused (``Refuse``, with Retry-After) until the backoff
            ends, then starts a new build: a broken bundle or an
            unreachable central is not asked again for every call
==========  ==============================================================

A running build ends in :meth:`BuildBoard.succeeded` or
:meth:`BuildBoard.failed`; the backoff doubles with each consecutive
failure, from ``retry_after`` up to ``MAX_BACKOFF_FACTOR`` times it.

:class:`ServiceBuilder` is the asyncio adapter.  A build asks the outer
module for the service (FETCH_SERVICE), hands the sealed bundle and licence
set to the trust layer (signature, recipient, expiry, rollback and the sync
metadata's listing are all checked there; when the metadata does not list
the bundle yet it syncs once and tries again), parses the bundle, installs
it atomically in the :class:`~firmware.inner.services.ServiceStore`, starts
its runtime and puts it in the table.  A newer version (announced by sync
metadata) is built the same way in the background and swapped in; calls
already running finish on the old runtime.  :meth:`ServiceBuilder.reconcile`
removes services whose licences are all revoked or expired, or that central
no longer lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from firmware.common.crypto.errors import InvalidObject, StaleMetadata
from firmware.common.crypto.sealed import Kind
from firmware.common.errors import LinkError, OptogateError, RemoteError
from firmware.common.licence import LicenceSet
from firmware.common.link import messages
from firmware.inner.runtimes.base import Runtime
from firmware.inner.services import Installed, LoadedService, ServiceStore
from firmware.inner.trust import GatewayTrust
from firmware.inner.upstream import Upstream
from provisioning.bundle import BundleError, load_bundle

#: Consecutive failures double the backoff up to this factor of retry_after.
MAX_BACKOFF_FACTOR: Final = 8


class BuildState(enum.Enum):
    """Where one service stands."""

    ABSENT = "absent"
    BUILDING = "building"
    BUILT = "built"
    FAILED = "failed"


@dataclass(frozen=True)
class Ready:
    """The service is built: run the call."""


@dataclass(frozen=True)
class Start:
    """No build is running: start one (the caller is now the builder)."""


@dataclass(frozen=True)
class Wait:
    """A build is running: wait for it."""


@dataclass(frozen=True)
class Refuse:
    """The last build failed recently: answer 503 with ``retry_after`` seconds."""

    retry_after: float
    reason: str


Action = Ready | Start | Wait | Refuse


@dataclass
class _Entry:
    state: BuildState = BuildState.ABSENT
    version: int | None = None
    failures: int = 0
    retry_at: float = 0.0
    reason: str = ""


@dataclass
class BuildBoard:
    """Pure build bookkeeping (see the module docstring).  Times are the caller's clock."""

    retry_after: float
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def state(self, service: str) -> BuildState:
        """Return the state of ``service``."""
        entry = self._entries.get(service)
        return entry.state if entry is not None else BuildState.ABSENT

    def version(self, service: str) -> int | None:
        """Return the built version of ``service``, or None."""
        entry = self._entries.get(service)
        return entry.version if entry is not None else None

    def on_call(self, service: str, now: float) -> Action:
        """Return what a call for ``service`` at ``now`` must do (and note a started build)."""
        entry = self._entries.setdefault(service, _Entry())
        if entry.state is BuildState.BUILT:
            return Ready()
        if entry.state is BuildState.BUILDING:
            return Wait()
        if entry.state is BuildState.FAILED and now < entry.retry_at:
            return Refuse(entry.retry_at - now, entry.reason)
        entry.state = BuildState.BUILDING
        return Start()

    def begin_upgrade(self, service: str) -> bool:
        """Return True if a background rebuild of a BUILT service may start (not while building)."""
        entry = self._entries.get(service)
        return entry is not None and entry.state is BuildState.BUILT

    def succeeded(self, service: str, version: int) -> None:
        """Record a finished build: the service is BUILT at ``version``."""
        entry = self._entries.setdefault(service, _Entry())
        entry.state, entry.version, entry.failures, entry.reason = (
            BuildState.BUILT,
            version,
            0,
            "",
        )

    def failed(self, service: str, now: float, reason: str, retry_after: float | None) -> float:
        """Record a failed build; return the seconds until the next attempt.

        A service that was BUILT (a failed upgrade) stays BUILT.
        """
        entry = self._entries.setdefault(service, _Entry())
        if entry.version is not None and entry.state is not BuildState.ABSENT:
            entry.state = BuildState.BUILT
            return 0.0
        entry.failures += 1
        base = retry_after if retry_after is not None else self.retry_after
        wait = float(min(base * 2 ** (entry.failures - 1), self.retry_after * MAX_BACKOFF_FACTOR))
        entry.state, entry.retry_at, entry.reason = BuildState.FAILED, now + wait, reason
        return wait

    def unavailable(self, service: str, now: float, reason: str, retry_after: float) -> None:
        """Record that a build could not even be attempted (no link): no backoff growth."""
        entry = self._entries.setdefault(service, _Entry())
        if entry.state is BuildState.BUILDING and entry.version is None:
            entry.state = BuildState.ABSENT
        elif entry.state is BuildState.BUILDING:
            entry.state = BuildState.BUILT
        entry.reason = reason
        del now, retry_after

    def removed(self, service: str) -> None:
        """Forget ``service`` (revoked, expired, withdrawn)."""
        self._entries.pop(service, None)

    def services(self) -> dict[str, BuildState]:
        """Return every known service and its state."""
        return {name: e.state for name, e in self._entries.items()}


class ServiceUnavailable(OptogateError):
    """The service is not built and cannot be built now (HTTP 503)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BuildError(OptogateError):
    """A fetched service could not be verified, installed or started."""


RuntimeFactory = Callable[[Installed], Runtime]


class ServiceBuilder:
    """The asyncio adapter around :class:`BuildBoard` (see the module docstring)."""

    def __init__(
        self,
        *,
        store: ServiceStore,
        trust: GatewayTrust,
        upstream: Upstream,
        sync: Callable[[], Awaitable[None]],
        make_runtime: RuntimeFactory,
        fetch_timeout: float,
        retry_after: float,
        log: Callable[..., None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._trust = trust
        self._upstream = upstream
        self._sync = sync
        self._make_runtime = make_runtime
        self._fetch_timeout = fetch_timeout
        self._retry_after = retry_after
        self._log = log
        self._clock = clock
        self.board = BuildBoard(retry_after)
        self.loaded: dict[str, LoadedService] = {}
        self._builds: dict[str, asyncio.Future[LoadedService]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._upgrading: set[str] = set()
        self.stats = {"builds": 0, "build_failures": 0, "fetches": 0, "swaps": 0, "removals": 0}

    async def load_installed(self) -> None:
        """Warm every service already on disk (the daemon's start).  Never raises."""
        for inst in await asyncio.to_thread(self._store.installed):
            try:
                svc = await self._start(inst)
            except OptogateError as e:
                self._log("service_load_failed", service=inst.name, error=str(e))
                continue
            self.loaded[inst.name] = svc
            self.board.succeeded(inst.name, inst.version)
            self._log("service_loaded", service=inst.name, version=inst.version)

    async def get(self, service: str) -> LoadedService:
        """Return the built service, building it first if needed (single flight).

        Raises ServiceUnavailable (503) when it is not built and cannot be now.
        """
        svc = self.loaded.get(service)
        if svc is not None:
            return svc
        action = self.board.on_call(service, self._clock())
        if isinstance(action, Refuse):
            raise ServiceUnavailable(
                f"service {service} is not available: {action.reason}", action.retry_after
            )
        if isinstance(action, Start):
            fut: asyncio.Future[LoadedService] = asyncio.get_running_loop().create_future()
            self._builds[service] = fut
            task = asyncio.get_running_loop().create_task(self._build(service, fut))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        fut = self._builds.get(service)  # type: ignore[assignment]
        if fut is None:  # Ready, but unloaded in between (removed)
            raise ServiceUnavailable(f"service {service} is not available", self._retry_after)
        return await asyncio.shield(fut)

    async def _build(self, service: str, fut: asyncio.Future[LoadedService]) -> None:
        try:
            svc = await self._fetch_and_start(service, have=None)
        except (ServiceUnavailable, LinkError) as e:
            retry = getattr(e, "retry_after", None) or self._retry_after
            self.board.unavailable(service, self._clock(), str(e), retry)
            self._log("build_unavailable", service=service, error=str(e))
            fut.set_exception(ServiceUnavailable(f"service {service} cannot be fetched now", retry))
        except (OptogateError, ValueError) as e:
            self.stats["build_failures"] += 1
            wait = self.board.failed(service, self._clock(), _why_failed(e), None)
            self._log("build_failed", service=service, error=str(e), retry_after=wait)
            fut.set_exception(
                ServiceUnavailable(f"service {service} could not be built", max(wait, 1.0))
            )
        except BaseException as e:
            self.board.failed(service, self._clock(), "it could not be built", None)
            fut.set_exception(ServiceUnavailable(f"service {service} failed", self._retry_after))
            if not isinstance(e, asyncio.CancelledError):
                raise
        else:
            self._install_loaded(svc)
            fut.set_result(svc)
        finally:
            self._builds.pop(service, None)
            if not fut.done():
                fut.cancel()
            # a failure nobody awaited is still reported by the log, not by asyncio
            if fut.done() and not fut.cancelled():
                fut.exception()

    def _install_loaded(self, svc: LoadedService) -> None:
        old = self.loaded.get(svc.name)
        self.loaded[svc.name] = svc
        self.board.succeeded(svc.name, svc.version)
        self.stats["builds"] += 1
        if old is not None and old is not svc:
            self.stats["swaps"] += 1
            old.retire()
        self._log("service_built", service=svc.name, version=svc.version)

    async def _fetch_and_start(self, service: str, have: int | None) -> LoadedService:
        """Fetch, verify, install and warm ``service``; return it.  Raises as :meth:`_build`."""
        if not self._upstream.peer_powered or not self._upstream.connected:
            raise ServiceUnavailable("the outer module cannot be reached now", self._retry_after)
        self.stats["fetches"] += 1
        try:
            reply = await self._upstream.request(
                messages.FetchService(service=service, have_version=have),
                timeout=self._fetch_timeout,
                expect=messages.Service,
            )
        except RemoteError as e:
            if e.code in {"unknown_service", "not_found"}:
                raise BuildError(f"central does not know {service}") from e
            raise ServiceUnavailable(
                f"the outer module answered {e.code}", e.retry_after or self._retry_after
            ) from e
        now_mono = self._clock()
        if reply.sealed_licence:
            self._adopt_licences(reply.sealed_licence, now_mono)
        try:
            opened = self._trust.receive_bundle(reply.sealed_bundle, service, now_mono)
        except (StaleMetadata, InvalidObject) as e:
            if not isinstance(e, StaleMetadata) and "sync metadata" not in str(e):
                raise  # forged, tampered, wrong recipient, rolled back: refuse
            await self._sync()  # metadata older than the bundle: catch up once
            opened = self._trust.receive_bundle(reply.sealed_bundle, service, self._clock())
        raw = opened.payload
        try:
            bundle = load_bundle(raw)
        except BundleError as e:
            raise BuildError(f"bundle of {service} is malformed: {e}") from e
        if bundle.manifest.name != service:
            raise BuildError(f"bundle names {bundle.manifest.name!r}, not {service!r}")
        version = opened.header.version
        inst = await asyncio.to_thread(self._store.install, bundle, raw, version)
        return await self._start(inst)

    def _adopt_licences(self, sealed: bytes, mono: float) -> None:
        try:
            self._trust.receive_licence_set(sealed, mono)
        except (InvalidObject, StaleMetadata) as e:
            # An equal or older set is normal (we already have it); anything
            # else is logged - the bundle is judged on its own.
            self._log("licence_set_not_adopted", error=type(e).__name__)

    async def _start(self, inst: Installed) -> LoadedService:
        runtime = self._make_runtime(inst)
        try:
            await runtime.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await runtime.aclose()
            raise
        return LoadedService(inst, runtime)

    def reconcile(self, licences: LicenceSet | None, now: int) -> None:
        """After a sync: upgrade services central lists newer, remove dead ones."""
        meta = self._trust.verifier.metadata
        if meta is None or licences is None:  # nothing to judge by yet: change nothing
            return
        for name, svc in list(self.loaded.items()):
            ref = meta.find(Kind.BUNDLE, name)
            alive = any(
                lic.service == name
                and lic.licence_id not in licences.revoked
                and lic.valid_until >= now
                for lic in licences.licences
            )
            if ref is None or not alive:
                self._remove(name, "withdrawn" if ref is None else "no valid licence")
            elif (
                ref.version > svc.version
                and name not in self._upgrading
                and self.board.begin_upgrade(name)
            ):
                self._upgrading.add(name)
                task = asyncio.get_running_loop().create_task(self._upgrade(name, svc.version))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _upgrade(self, name: str, have: int) -> None:
        try:
            svc = await self._fetch_and_start(name, have=have)
        except (OptogateError, ValueError) as e:
            self._log("upgrade_failed", service=name, error=str(e))
            return
        finally:
            self._upgrading.discard(name)
        if name in self.loaded:
            self._install_loaded(svc)
        else:
            await svc.aclose()

    def _remove(self, name: str, why: str) -> None:
        svc = self.loaded.pop(name, None)
        self.board.removed(name)
        if svc is not None:
            svc.retire()
        try:
            self._store.remove(name)
        except OptogateError as e:
            self._log("service_remove_failed", service=name, error=str(e))
        self.stats["removals"] += 1
        self._log("service_removed", service=name, reason=why)

    async def aclose(self) -> None:
        """Cancel builds, close every runtime."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for svc in list(self.loaded.values()):
            await svc.aclose()
        self.loaded.clear()


def _why_failed(error: BaseException) -> str:
    """Say why a build failed in words a caller may see (no class names, no paths)."""
    if isinstance(error, InvalidObject | StaleMetadata):
        return "its bundle did not verify"
    if isinstance(error, BundleError):
        return "its bundle is malformed"
    if isinstance(error, messages.InvalidMessage):
        return "its bundle arrived damaged"
    return "it could not be built"
