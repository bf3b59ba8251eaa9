"""The uplink: one interface to central over two transports (asyncio adapter).

Theory of operation
-------------------
:class:`Uplink` answers one question for the relay: "send this request to
central and give me its reply".  Behind :meth:`Uplink.request`:

* **One call at a time, shared.**  If no call is up, the first request
  starts a *connect* and every request arriving meanwhile waits for the same
  one; all of them then run on that call, concurrently (the framed session
  carries several exchanges at once).  So sync and usage shipment that come
  together share one call, and the dial-up modem is dialled once.
* **Fallback order.**  A connect tries each :class:`Connector` in the
  configured order (for example internet first, dial-up second): it opens
  the carrier (TCP+TLS with central's certificate pinned, or the modem's
  ``ATD`` until ``CONNECT``), brings a CLIENT-role
  :class:`~firmware.common.link.link.Link` up on it (on a modem call with
  ``baud`` = the line's connect speed, so the session's timers follow the
  real line rate), and authenticates: ``AuthBegin(gateway id)`` →
  ``AuthChallenge(nonce)`` → ``AuthProof(Ed25519 over``
  :func:`~firmware.common.uplink.auth_transcript` ``)`` → ``AuthOk``.  The
  first transport that gets through to ``AuthOk`` carries the call.
* **Decisions in the core.**  When to connect, when a sync is due, when the
  call has idled long enough to hang up, how long to back off after every
  transport failed: :class:`~firmware.outer.policy.CallPolicy` decides, with
  the loop's clock as ``now``; :meth:`Uplink.run` (the supervisor) only
  asks it and acts.
* **Failures are quick and typed.**  Every transport failing raises
  :class:`~firmware.outer.errors.CentralUnreachable` with a ``retry_after``;
  during the backoff that follows, requests are refused at once with the
  remaining time.  Central refusing the gateway's proof raises
  :class:`~firmware.outer.errors.CentralRefused`.  A reply of kind Error is
  central's own answer and is raised as
  :class:`~firmware.common.errors.RemoteError`, code unchanged.
* **A dropped call resumes once.**  When a call drops while a request is
  on it (``NO CARRIER`` mid-bundle, a TCP reset), the call is torn down and
  the request is sent again, once, on a fresh call: every request central
  serves is idempotent (a usage batch is stored once per batch id).  The
  session cannot resume a message mid-way (see docs/outer.md), so the whole
  reply comes again.  A second drop fails the request cleanly.

Nothing here caches or interprets replies: that is the relay's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from firmware.common.adapters.tcp import StreamTransport
from firmware.common.adapters.transport import Transport
from firmware.common.crypto.keys import SigningKey, VerifyKey
from firmware.common.errors import (
    LinkError,
    LinkTimeout,
    ModemError,
    OptogateError,
    PortError,
    RemoteError,
)
from firmware.common.link import messages
from firmware.common.link.link import Link, PartListener
from firmware.common.link.session import Role, SessionConfig
from firmware.common.uplink import auth_transcript
from firmware.outer.config import DialupConfig, InternetConfig
from firmware.outer.errors import CentralRefused, CentralUnreachable, OuterConfigError
from firmware.outer.modem.errors import CallLimitReached
from firmware.outer.modem.port import ModemConnection, ModemTransport
from firmware.outer.policy import CallPolicy, CallState, PolicyConfig

#: Exchanges of the handshake itself (AuthBegin, AuthProof): two small
#: messages; 30 s covers a noisy modem line with retransmissions.
AUTH_TIMEOUT: Final = 30.0
#: How often the supervisor looks at a call that is up (has it dropped?).
#: The Link notices a dead carrier at once; this only bounds the tear-down.
CALL_POLL: Final = 0.5
#: Send a dropped request again on a fresh call this many times.
RESUME_ATTEMPTS: Final = 1
#: Central's refusal of our proof is not cured by redialling at once.
REFUSED_BACKOFF: Final = 300.0
#: A closing call may take this long to hang up before we give up on it.
HANGUP_TIMEOUT: Final = 15.0

Log = Callable[..., None]
_R = TypeVar("_R", bound=messages.Message)


def _no_log(event: str, **fields: object) -> None:
    del event, fields


@dataclass(frozen=True)
class Identity:
    """Who the outer module is to central: gateway name, its key, central's key."""

    gateway_id: str
    signing_key: SigningKey
    central_key: VerifyKey

    @classmethod
    def load(cls, keys_dir: Path) -> Identity:
        """Read ``identity.json``, ``signing.key`` and ``central.pub`` from ``keys_dir``.

        Raises OuterConfigError when a file is missing or unusable.
        """
        try:
            doc = json.loads((keys_dir / "identity.json").read_text(encoding="utf-8"))
            gateway = doc["gateway"]
            if not isinstance(gateway, str) or not gateway:
                raise ValueError("no gateway name")
            key = SigningKey.load(keys_dir / "signing.key")
            central = VerifyKey.load(keys_dir / "central.pub")
        except (OSError, ValueError, KeyError, TypeError, OptogateError) as e:
            raise OuterConfigError(
                f"cannot load the outer module's keys from {keys_dir}: {e}"
            ) from e
        return cls(gateway, key, central)


@dataclass
class Carrier:
    """An open carrier to central: the byte stream and the line rate (None: TCP)."""

    transport: Transport
    baud: int | None
    detail: str


class Connector(Protocol):
    """One way of reaching central."""

    @property
    def name(self) -> str:
        """``internet`` or ``dialup``."""
        ...

    async def open(self) -> Carrier:
        """Return an open carrier.  Raises an OptogateError (PortError, ModemError...)."""
        ...

    def status(self) -> dict[str, str | int | float | bool]:
        """Return this transport's status fields."""
        ...

    async def aclose(self) -> None:
        """Release what the connector holds (the modem's port).  Idempotent."""
        ...


def client_tls_context(ca: Path) -> ssl.SSLContext:
    """Return a TLS 1.3 client context whose only trust anchor is central's CA.

    Raises OuterConfigError when the CA file does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise OuterConfigError(f"cannot load central's CA certificate {ca}: {e}") from e
    return ctx


class InternetConnector:
    """TCP+TLS to central; the certificate must chain to ``ca`` and, if a pin
    is configured, be exactly the pinned certificate (SHA-256 of its DER)."""

    name = "internet"

    def __init__(self, config: InternetConfig, connect_timeout: float) -> None:
        self._config = config
        self._timeout = connect_timeout
        self._ctx = client_tls_context(config.ca)

    async def open(self) -> Carrier:
        """Connect and check the pin.  Raises PortError (refused, TLS failure, pin mismatch)."""
        cfg = self._config
        where = f"{cfg.host}:{cfg.port}"
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(
                    cfg.host, cfg.port, ssl=self._ctx, server_hostname=cfg.server_name or cfg.host
                )
        except TimeoutError as e:
            raise PortError(f"connecting to {where} timed out") from e
        except OSError as e:  # ssl.SSLError (bad certificate) is an OSError
            raise PortError(f"cannot connect to {where}: {e}") from e
        transport = StreamTransport(reader, writer)
        if cfg.pin_sha256:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der is None or hashlib.sha256(der).hexdigest() != cfg.pin_sha256:
                await transport.aclose()
                raise PortError(f"{where}: central's certificate does not match the pin")
        return Carrier(transport, None, where)

    def status(self) -> dict[str, str | int | float | bool]:
        """Return ``internet.address``."""
        return {"internet.address": f"{self._config.host}:{self._config.port}"}

    async def aclose(self) -> None:
        """Nothing to release: each call is its own connection."""


class DialupConnector:
    """The modem: its port opened early and kept open; one call per connect.

    Made inside a running loop (as the daemon does), the connector opens the
    port at once, so the modem is reset and initialised before the first
    call; the dialler runs with ``keep_ready``, so it is prepared again after
    every call and a dial needs only an AT probe before ATDT.  A port that
    cannot be opened then, or a modem that fails its preparation, is logged
    and shown in :meth:`status`, never raised: the next :meth:`open` tries
    again on the full path.  Made outside a loop, the port opens on first use.
    """

    name = "dialup"

    def __init__(self, config: DialupConfig, log: Log = _no_log) -> None:
        self._config = config
        self._dialler = dataclasses.replace(config.dialler, keep_ready=True)
        self._log = log
        self._conn: ModemConnection | None = None
        self._open_error = ""
        self._opening: asyncio.Task[None] | None = None
        self.last_speed: int | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._opening = loop.create_task(self._open_early(), name=f"modem open {config.device}")

    async def open(self) -> Carrier:
        """Dial central.  Raises PortError (the modem's port) or ModemError (BUSY...)."""
        cfg = self._config
        if self._opening is not None:
            opening, self._opening = self._opening, None
            await opening
        conn = self._conn
        if conn is not None and conn.port_error is not None:
            # the port failed while no call was up (the USB modem was unplugged):
            # open it afresh rather than fail this call on the dead descriptor
            await self._drop_port()
            conn = None
        if conn is None:
            conn = await self._open_port()
        try:
            connected = await conn.dial()
        except PortError:
            await self._drop_port()
            raise
        speed = connected.speed or cfg.default_speed
        self.last_speed = speed
        return Carrier(ModemTransport(conn), speed, f"{cfg.device} CONNECT {speed}")

    async def _open_early(self) -> None:
        with contextlib.suppress(PortError):  # logged and kept for status()
            await self._open_port()

    async def _open_port(self) -> ModemConnection:
        cfg = self._config
        try:
            conn = await ModemConnection.open(
                cfg.device, self._dialler, baudrate=cfg.baudrate, log=self._modem_log
            )
        except PortError as e:
            self._open_error = str(e)
            self._log("modem_open_failed", error=str(e))
            raise
        self._open_error = ""
        self._conn = conn
        return conn

    def _modem_log(self, event: str, **fields: object) -> None:
        self._log(f"modem_{event}", **fields)

    async def _drop_port(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OptogateError):
                await conn.close()

    def status(self) -> dict[str, str | int | float | bool]:
        """Return ``modem.state`` (the dialler's state: ``ready`` between calls,
        ``idle`` when its preparation failed; ``closed`` when the port is not
        open), ``modem.error`` (why the port or the preparation failed) and
        the failed-preparation and failed-probe counts, and the last speed."""
        conn = self._conn
        fields: dict[str, str | int | float | bool] = {
            "modem.state": conn.state.value if conn is not None else "closed"
        }
        error = self._open_error
        if conn is not None:
            error = str(conn.port_error or "") or conn.prepare_error
            stats = conn.statistics()
            fields["modem.prepare_failures"] = stats["prepare_failures"]
            fields["modem.probe_failures"] = stats["probe_failures"]
        if error:
            fields["modem.error"] = error[:200]
        if self.last_speed is not None:
            fields["modem.last_speed"] = self.last_speed
        return fields

    async def aclose(self) -> None:
        """Hang up if needed and close the port."""
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
        await self._drop_port()


@dataclass
class _Call:
    link: Link
    transport: str
    detail: str
    started: float
    wall_started: float


def _alive(call: _Call) -> bool:
    """True while the call's session is up.

    A session that went down (keepalive lost on a line that died without a
    NO CARRIER) ends the call: central treats a restarted session as a new
    peer that must authenticate again, and waiting for the session to come
    back would hold requests for their whole timeout.
    """
    return call.link.connected and not call.link.failed


class Uplink:
    """Requests to central over the configured transports; see the module docstring.

    Create inside a running loop; run :meth:`run` as a task (periodic sync,
    idle hang-up); call :meth:`aclose` to stop.  A periodic sync names the
    licence set ``licence_version()`` returns as held (central then leaves
    it out if it is still the one in force); ``on_sync`` receives each reply
    with that version.
    """

    def __init__(
        self,
        identity: Identity,
        connectors: Sequence[Connector],
        policy: PolicyConfig,
        *,
        connect_timeout: float = 120.0,
        request_timeout: float = 1800.0,
        on_sync: Callable[[messages.SyncData, int], Awaitable[None]] | None = None,
        licence_version: Callable[[], int] | None = None,
        log: Log = _no_log,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._identity = identity
        by_name = {c.name: c for c in connectors}
        missing = [name for name in policy.order if name not in by_name]
        if missing:
            raise OuterConfigError(f"uplink.order names unconfigured transports: {missing}")
        self._connectors = [by_name[name] for name in policy.order]
        self.policy = CallPolicy(policy, self._loop.time())
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._on_sync = on_sync
        self._licence_version = licence_version
        self._log = log
        self._call: _Call | None = None
        self._connecting: asyncio.Future[_Call] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Set while no call is being torn down: a modem must finish hanging up
        # before the next dial, or the dialler refuses the new call.
        self._hung_up = asyncio.Event()
        self._hung_up.set()
        self.counters: Counter[str] = Counter()
        self.last_call: dict[str, str | int | float | bool] = {}
        self.last_sync_wall: float | None = None
        self.last_error = ""
        self._closed = False

    # -- the relay's entry point -------------------------------------------------------

    async def request(
        self,
        msg: messages.Message,
        expect: type[_R],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - one bound per exchange
        on_part: PartListener | None = None,
    ) -> _R:
        """Send ``msg`` to central (connecting if needed) and return its reply.

        ``on_part`` is told of each part of a streamed reply as it arrives
        (:meth:`Link.request`); after a dropped call the request is sent
        again and the parts come again from the start.

        ``timeout`` bounds the whole exchange, the connect included (default
        ``request_timeout``).  Raises CentralUnreachable (no transport got
        through, backing off, the call dropped twice, or no reply in time),
        CentralRefused (authentication refused), RemoteError (central answered
        with an Error), MessageError (central's reply is malformed).
        """
        limit = self._request_timeout if timeout is None else timeout
        deadline = self._loop.time() + limit
        self.policy.request_started(self._loop.time())
        self._wake.set()
        try:
            resumes = 0
            while True:
                call = await self._ensure_call(deadline)
                remaining = deadline - self._loop.time()
                try:
                    return await call.link.request(
                        msg, timeout=max(remaining, 0.001), expect=expect, on_part=on_part
                    )
                except RemoteError:
                    raise
                except LinkTimeout as e:
                    self.counters["request_timeouts"] += 1
                    raise CentralUnreachable(
                        f"central did not answer {msg.KIND.name} in time",
                        self.policy.retry_after(self._loop.time()),
                    ) from e
                except (LinkError, ModemError) as e:
                    self.counters["calls_dropped"] += 1
                    self._log("call_dropped", request=msg.KIND.name, error=str(e))
                    await self._end_call(call, "dropped")
                    if resumes >= RESUME_ATTEMPTS or self._loop.time() >= deadline:
                        raise CentralUnreachable(
                            f"the call to central dropped during {msg.KIND.name}: {e}",
                            self.policy.retry_after(self._loop.time()),
                        ) from e
                    resumes += 1
                    self.counters["requests_resumed"] += 1
        finally:
            self.policy.request_finished(self._loop.time())
            self._wake.set()

    # -- calls -----------------------------------------------------------------------------

    async def _ensure_call(self, deadline: float) -> _Call:
        call = self._call
        if call is not None and _alive(call):
            return call
        if call is not None:
            await self._end_call(call, "dropped")
        if self._closed:
            raise CentralUnreachable("the uplink is closed", None)
        if self._connecting is None:
            now = self._loop.time()
            if not self.policy.may_connect(now):
                self.counters["refused_backing_off"] += 1
                raise CentralUnreachable(
                    f"central unreachable ({self.last_error or 'backing off'})",
                    self.policy.retry_after(now),
                )
            task = self._loop.create_task(self._connect(), name="uplink connect")
            task.add_done_callback(self._connect_done)
            self._connecting = task
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(self._connecting)
        except TimeoutError:
            raise CentralUnreachable(
                "the connect to central did not finish in time",
                self.policy.retry_after(self._loop.time()),
            ) from None

    def _connect_done(self, task: asyncio.Future[_Call]) -> None:
        self._connecting = None
        self._wake.set()  # the supervisor's deadline depends on how the connect ended
        if not task.cancelled():
            task.exception()  # retrieved: waiters get it through the shield

    async def _connect(self) -> _Call:
        self.policy.connect_started(self._loop.time())
        self.counters["connects"] += 1
        await self._hung_up.wait()
        errors: list[str] = []
        hint: float | None = None  # the modem's own "not before" (calls-per-hour cap)
        for connector in self._connectors:
            self._log("connecting", transport=connector.name)
            try:
                call = await self._try(connector)
            except CentralRefused as e:
                self.policy.connect_failed(self._loop.time(), REFUSED_BACKOFF)
                self.last_error = str(e)
                self.counters["auth_refused"] += 1
                self._log("auth_refused", transport=connector.name, error=str(e))
                raise
            except (OptogateError, OSError) as e:
                if isinstance(e, CallLimitReached):
                    hint = max(hint or 0.0, e.retry_at - self._loop.time())
                reason = str(e) or type(e).__name__  # a bare TimeoutError says nothing
                errors.append(f"{connector.name}: {reason}")
                self.counters[f"connect_failures_{connector.name}"] += 1
                self._log("connect_failed", transport=connector.name, error=reason)
                continue
            self.policy.connected(connector.name, self._loop.time())
            self._call = call
            self.last_call = {
                "last_call.transport": connector.name,
                "last_call.detail": call.detail,
                "last_call.started": round(call.wall_started, 3),
            }
            self.counters[f"calls_{connector.name}"] += 1
            self._log("call_up", transport=connector.name, detail=call.detail)
            self._wake.set()
            return call
        wait = self.policy.connect_failed(self._loop.time(), hint)
        self.last_error = "; ".join(errors)
        self._log("unreachable", errors=errors, retry_after=round(wait, 3))
        raise CentralUnreachable(f"central unreachable: {self.last_error}", wait)

    async def _try(self, connector: Connector) -> _Call:
        async with asyncio.timeout(self._connect_timeout):
            carrier = await connector.open()
            link = Link(carrier.transport, SessionConfig(role=Role.CLIENT, baud=carrier.baud))
            try:
                await link.wait_up(self._connect_timeout)
                await self._authenticate(link)
            except BaseException:
                with contextlib.suppress(OptogateError):
                    await link.aclose()
                raise
        return _Call(link, connector.name, carrier.detail, self._loop.time(), time.time())

    async def _authenticate(self, link: Link) -> None:
        ident = self._identity
        try:
            challenge = await link.request(
                messages.AuthBegin(gateway_id=ident.gateway_id),
                expect=messages.AuthChallenge,
                timeout=AUTH_TIMEOUT,
            )
            transcript = auth_transcript(
                ident.gateway_id, challenge.nonce, ident.central_key.key_id
            )
            await link.request(
                messages.AuthProof(signature=ident.signing_key.sign(transcript)),
                expect=messages.AuthOk,
                timeout=AUTH_TIMEOUT,
            )
        except RemoteError as e:
            raise CentralRefused(f"central refused authentication: {e}", REFUSED_BACKOFF) from e

    async def _end_call(self, call: _Call, reason: str) -> None:
        if self._call is not call:
            return
        self._call = None
        now = self._loop.time()
        self.policy.call_ended(now)
        self.last_call["last_call.ended"] = round(time.time(), 3)
        self.last_call["last_call.seconds"] = round(now - call.started, 3)
        self.last_call["last_call.end_reason"] = reason
        self.counters[f"hangups_{reason}"] += 1
        self._log("call_ended", transport=call.transport, reason=reason)
        self._hung_up.clear()
        try:
            with contextlib.suppress(OptogateError, TimeoutError):
                async with asyncio.timeout(HANGUP_TIMEOUT):
                    await call.link.aclose()
        finally:
            self._hung_up.set()
            self._wake.set()

    # -- supervisor ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the periodic sync and the idle hang-up until cancelled."""
        while True:
            now = self._loop.time()
            call = self._call
            if call is not None and not _alive(call):
                await self._end_call(call, "dropped")
            elif call is not None and self.policy.should_hang_up(now):
                await self._end_call(call, "idle")
            if self._sync_task is None and self.policy.sync_due(now):
                self._sync_task = self._loop.create_task(self._sync(), name="uplink sync")
            self._wake.clear()
            deadline = self.policy.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - self._loop.time())
            if self._call is not None:
                delay = CALL_POLL if delay is None else min(delay, CALL_POLL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def sync_now(self) -> messages.SyncData:
        """Sync with central now; return the reply (also handed to ``on_sync``).

        Raises like :meth:`request`.
        """
        self.policy.sync_started(self._loop.time())
        ok = False
        try:
            since = 0 if self._licence_version is None else self._licence_version()
            reply = await self.request(messages.Sync(since_version=since), messages.SyncData)
            self.last_sync_wall = time.time()
            if self._on_sync is not None:
                await self._on_sync(reply, since)
            ok = True
            return reply
        finally:
            self.policy.sync_finished(self._loop.time(), ok=ok)
            self._wake.set()

    def note_synced(self) -> None:
        """Record a sync the relay made for the inner module: it counts as the periodic one."""
        self.last_sync_wall = time.time()
        if not self.policy.syncing:
            self.policy.sync_finished(self._loop.time(), ok=True)
            self._wake.set()

    async def _sync(self) -> None:
        try:
            await self.sync_now()
            self.counters["syncs"] += 1
            self._log("sync_done")
        except (OptogateError, OSError) as e:
            self.counters["sync_failures"] += 1
            self._log("sync_failed", error=str(e))
        finally:
            self._sync_task = None

    # -- status and shutdown -------------------------------------------------------------

    def status(self) -> dict[str, str | int | float | bool]:
        """Return the uplink's status fields (flat keys, scalar values)."""
        now = self._loop.time()
        p = self.policy
        fields: dict[str, str | int | float | bool] = {
            "uplink.state": p.state.value,
            "uplink.transport": p.transport or "",
            "uplink.order": ",".join(p.config.order),
            "uplink.pending": p.pending,
            "uplink.calls": p.calls,
            "uplink.failures": p.failures,
            "uplink.backoff_s": round(max(0.0, (p.backoff_until or now) - now), 3),
            "uplink.next_sync_in_s": round(max(0.0, p.next_sync_at - now), 3),
            "uplink.last_error": self.last_error[:1000],
        }
        if self.last_sync_wall is not None:
            fields["last_sync"] = round(self.last_sync_wall, 3)
        fields.update(self.last_call)
        for connector in self._connectors:
            fields.update(connector.status())
        for name, value in sorted(self.counters.items()):
            fields[f"uplink.{name}"] = value
        return fields

    @property
    def call_up(self) -> bool:
        """True while a call to central is up."""
        return self.policy.state is CallState.UP

    async def aclose(self) -> None:
        """Stop syncing, hang up, release the transports (idempotent)."""
        self._closed = True
        tasks = [t for t in (self._sync_task, self._connecting) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._call is not None:
            await self._end_call(self._call, "shutdown")
        for connector in self._connectors:
            with contextlib.suppress(OptogateError):
                await connector.aclose()
