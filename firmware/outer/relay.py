"""The relay: what the outer module answers the inner module over the optical link.

Theory of operation
-------------------
On the optical link the outer module is the SERVER: it only answers.  The
:class:`Relay` is the handler its :class:`~firmware.common.link.link.Link`
serves with, and it answers exactly the requests the inner module may make:

=================  ===========================================================
``FetchService``   from the cache when it can (no call), else from central;
                   the reply is cached
``Sync``           from the last sync when it is recent (``sync_serve_age``)
                   and its licence set is cached, else from central; the
                   reply is cached.  The set is left out when the inner
                   module names it as held (``since_version``)
``UsageReport``    always to central (only central's signed ack lets the inner
                   module drop a batch)
``Status``         the outer module's status summary (``StatusReport``)
=================  ===========================================================

Anything else (a maintenance kind, or a request kind meant for central such
as ``AuthBegin``) is answered ``Error("not_allowed")`` and counted: the
link layer already drops reply kinds arriving at a server, and the relay
never forwards a kind it does not know.

**Verify before relaying.**  Every sealed object central sends is checked
with :func:`~firmware.common.crypto.sealed.verify_sealed` against central's
public key, and its header against what was asked for (a bundle for that
service, a licence set, sync metadata, a usage ack) before it is cached or
passed on; the payload is never read (the outer module cannot open it).
A failure answers ``Error("bad_upstream_object")`` and caches nothing.

**Errors are quick and typed.**  Central unreachable (every transport
failed, or backing off) answers ``Error("central_unreachable",
retry_after=N)`` at once; central refusing the gateway answers
``central_refused``; central's own Error reply (``not_licensed``,
``unknown_service``...) is passed on unchanged.  When central cannot be
reached a cached service is served even past ``fetch_cache_age``: the inner
module's trust layer decides whether it is still good.

**Streaming.**  A bundle fetched from central is passed on to the inner
module part by part while it still arrives (the link streams a ``Service``
in ``ServicePart`` replies, see docs/wire-protocol.md), so the optical
transfer hides behind the modem's.  The whole bundle is verified once it
is there, before it is cached; the inner module verifies it again (it
trusts nothing from this module anyway).  A fetch goes on to fill the
cache even when the inner module stops listening (its link went down, it
rebooted), and a second request for the same thing joins the fetch under
way: it is sent the parts already received, then the rest.

:func:`allowed` is the pure allowlist; the cache decisions are
:func:`firmware.outer.cache.plan_fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Final, TypeVar

from firmware.common.crypto.errors import InvalidObject
from firmware.common.crypto.keys import VerifyKey
from firmware.common.crypto.sealed import Header, Kind, verify_sealed
from firmware.common.errors import MessageError, RemoteError
from firmware.common.link import messages
from firmware.common.link.kinds import Kind as MsgKind
from firmware.outer.cache import LicenceEntry, SealedCache, ServiceEntry, plan_fetch
from firmware.outer.errors import CacheError, UplinkError
from firmware.outer.uplink import Uplink

#: The requests the inner module may make, and nothing else.
ALLOWED: Final = frozenset(
    {MsgKind.FETCH_SERVICE, MsgKind.SYNC, MsgKind.USAGE_REPORT, MsgKind.STATUS}
)
#: Objects larger than this are verified on a worker thread: an Ed25519 check
#: hashes the whole object, ~0.1 s per 10 MiB on a Pi 4, which must not stall
#: the optical link's event loop.
INLINE_VERIFY_BYTES: Final = 256 * 1024
#: Retry hint after central sent something that does not verify: it will not
#: heal in seconds, and the operator has been told (the log line).
BAD_OBJECT_RETRY: Final = 300.0

Log = Callable[..., None]
_T = TypeVar("_T")


class _Download:
    """A fetch from central under way: the parts so far, and who wants the next ones."""

    __slots__ = ("listeners", "parts", "task")

    def __init__(self) -> None:
        self.parts: list[messages.ServicePart] = []
        self.listeners: list[Callable[[messages.ServicePart], None]] = []
        self.task: asyncio.Future[tuple[messages.Service, bool]]

    def on_part(self, part: messages.ServicePart) -> None:
        self.parts.append(part)
        for listener in list(self.listeners):
            listener(part)


StatusSource = Callable[[], Mapping[str, str | int | float | bool]]


def _no_log(event: str, **fields: object) -> None:
    del event, fields


def allowed(kind: int) -> bool:
    """Return True when the relay serves requests of ``kind``."""
    return kind in ALLOWED


def status_fields(
    fields: Mapping[str, str | int | float | bool],
) -> dict[str, str | int | float | bool]:
    """Return ``fields`` trimmed to what a StatusReport may carry.

    Keys that do not match the wire pattern are dropped, texts are cut to
    the wire bound, and the first MAX_STATUS_ENTRIES entries (in the order
    given: the most important first) are kept.
    """
    out: dict[str, str | int | float | bool] = {}
    for key, value in fields.items():
        if len(out) >= messages.MAX_STATUS_ENTRIES:
            break
        if len(key) > messages.MAX_STATUS_KEY or not messages.STATUS_KEY_PATTERN.fullmatch(key):
            continue
        if isinstance(value, str):
            out[key] = value.encode()[: messages.MAX_STATUS_TEXT].decode("utf-8", "ignore")
        elif not (isinstance(value, float) and not math.isfinite(value)):
            out[key] = value
    return out


class Relay:
    """The optical link's request handler; see the module docstring."""

    def __init__(
        self,
        uplink: Uplink,
        cache: SealedCache,
        central_key: VerifyKey,
        *,
        status: StatusSource,
        fetch_cache_age: float = 86400.0,
        sync_serve_age: float = 300.0,
        wall_clock: Callable[[], float] = time.time,
        log: Log = _no_log,
    ) -> None:
        self._uplink = uplink
        self._cache = cache
        self._key = central_key
        self._status = status
        self._fetch_cache_age = fetch_cache_age
        self._sync_serve_age = sync_serve_age
        self._wall = wall_clock
        self._log = log
        self.counters: Counter[str] = Counter()
        self._disk = asyncio.Lock()
        self._downloads: dict[tuple[str, int | None], _Download] = {}

    async def handle(
        self, msg: messages.Message
    ) -> messages.Message | AsyncIterator[messages.Message]:
        """Return the reply to ``msg`` from the inner module.

        A fetch answers with a stream: the parts of a bundle as they arrive
        from central, then the ``Service`` that ends them (or one inline
        ``Service``).  Raises RemoteError (the Link answers it as an Error
        reply, ending a stream too) for a request outside the allowlist and
        for every failure to obtain an answer.
        """
        kind = msg.KIND
        if not allowed(kind):
            self.counters["refused"] += 1
            self.counters[f"refused_{kind.name.lower()}"] += 1
            self._log("refused", kind=kind.name)
            raise RemoteError("not_allowed", f"the outer module does not serve {kind.name}")
        self.counters[f"requests_{kind.name.lower()}"] += 1
        if isinstance(msg, messages.FetchService):
            return self._fetch_stream(msg)
        with self._typed_errors(kind):
            if isinstance(msg, messages.Sync):
                return await self._sync(msg)
            if isinstance(msg, messages.UsageReport):
                return await self._usage(msg)
            return messages.StatusReport(fields=status_fields(self._status()))

    @contextlib.contextmanager
    def _typed_errors(self, kind: MsgKind) -> Iterator[None]:
        """Turn every failure to obtain an answer into a RemoteError for the inner module."""
        try:
            yield
        except UplinkError as e:
            self.counters[f"errors_{e.code}"] += 1
            self._log("request_failed", kind=kind.name, code=e.code, error=e.detail)
            raise RemoteError(e.code, e.detail, e.retry_after) from e
        except RemoteError as e:
            self.counters["central_errors"] += 1
            self._log("central_error", kind=kind.name, code=e.code)
            raise
        except MessageError as e:
            self.counters["errors_bad_upstream_reply"] += 1
            self._log("request_failed", kind=kind.name, code="bad_upstream_reply", error=str(e))
            raise RemoteError("bad_upstream_reply", str(e), BAD_OBJECT_RETRY) from e
        except InvalidObject as e:
            self.counters["errors_bad_upstream_object"] += 1
            self._log("request_failed", kind=kind.name, code="bad_upstream_object", error=str(e))
            raise RemoteError(
                "bad_upstream_object", "central's reply does not verify", BAD_OBJECT_RETRY
            ) from e

    # -- FETCH_SERVICE -----------------------------------------------------------------

    async def _fetch_stream(self, msg: messages.FetchService) -> AsyncIterator[messages.Message]:
        download = self._downloads.get((msg.service, msg.have_version))
        if download is None:
            download = _Download()
            key = (msg.service, msg.have_version)
            download.task = asyncio.ensure_future(self._fetch(msg, download.on_part))
            self._downloads[key] = download
            download.task.add_done_callback(lambda t: self._fetch_done(key, t))
        else:
            self.counters["fetches_joined"] += 1
        task = download.task
        queue: asyncio.Queue[messages.ServicePart | None] = asyncio.Queue()
        for earlier in download.parts:
            queue.put_nowait(earlier)
        download.listeners.append(queue.put_nowait)
        task.add_done_callback(lambda _: queue.put_nowait(None))
        forwarded = 0
        try:
            while (part := await queue.get()) is not None:
                forwarded += 1
                yield part
        finally:
            download.listeners.remove(queue.put_nowait)
        with self._typed_errors(msg.KIND):
            reply, streamed = task.result()
        if forwarded and streamed and reply.sealed_bundle:
            self.counters["bundles_streamed"] += 1
            yield messages.Service(
                sealed_bundle=b"",
                sealed_licence=reply.sealed_licence,
                streamed=len(reply.sealed_bundle),
            )
        else:
            yield reply  # inline: any parts sent are discarded by the inner module

    def _fetch_done(
        self, key: tuple[str, int | None], task: asyncio.Future[tuple[messages.Service, bool]]
    ) -> None:
        download = self._downloads.pop(key, None)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here too: every listener re-raises it
        if error is not None and download is not None and not download.listeners:
            self._log("fetch_failed_unheard", key=key[0], error=repr(error))

    async def _fetch(
        self, msg: messages.FetchService, on_part: Callable[[messages.ServicePart], None]
    ) -> tuple[messages.Service, bool]:
        """Return the reply to ``msg`` and whether its bundle is the one sent through ``on_part``.

        False whenever the reply is not central's streamed reply itself (a
        cache hit, a stale answer after central failed mid-stream, an
        "unchanged"): the parts already passed on are then to be discarded.
        """
        now = self._wall()
        cache = self._cache
        entry = cache.services.get(msg.service)
        plan = plan_fetch(entry, cache.licence, msg.have_version, now, self._fetch_cache_age)
        if plan.answer and entry is not None:
            reply = await self._from_cache(entry, cache.licence, plan.send_bundle)
            if reply is not None:
                self.counters["cache_hits"] += 1
                self._log("cache_hit", service=msg.service, bundle=plan.send_bundle)
                return reply, False
            plan = plan_fetch(None, None, msg.have_version, now, self._fetch_cache_age)
        self.counters["cache_misses"] += 1
        parts_seen = False

        def forward(part: messages.ServicePart) -> None:
            nonlocal parts_seen
            parts_seen = True
            on_part(part)

        try:
            reply = await self._uplink.request(
                messages.FetchService(service=msg.service, have_version=plan.ask_have_version),
                messages.Service,
                on_part=forward,
            )
        except UplinkError:
            stale = await self._stale(msg)
            if stale is None:
                raise
            self.counters["stale_served"] += 1
            self._log("stale_served", service=msg.service)
            return stale, False
        bundle_header = None
        if reply.sealed_bundle:
            bundle_header = await self._verify(reply.sealed_bundle, Kind.BUNDLE, msg.service)
            version = bundle_header.version
        elif plan.ask_have_version is not None:
            version = plan.ask_have_version  # central: "unchanged since the version we named"
        else:
            raise InvalidObject("central sent no bundle for a holder of none")
        licence_header = await self._verify(reply.sealed_licence, Kind.LICENCE_SET)
        try:
            await self._on_disk(
                cache.store_service,
                msg.service,
                version,
                reply.sealed_bundle or None,
                (licence_header.version, reply.sealed_licence),
                now,
            )
        except CacheError as e:
            self.counters["cache_write_failures"] += 1
            self._log("cache_write_failed", error=str(e))
        self._log(
            "fetched",
            service=msg.service,
            version=version,
            bundle_bytes=len(reply.sealed_bundle),
            licence_version=licence_header.version,
        )
        if msg.have_version == version:
            return messages.Service(sealed_bundle=b"", sealed_licence=reply.sealed_licence), False
        if reply.sealed_bundle:
            return reply, parts_seen  # the very bundle whose parts went on
        # Central said "unchanged" for the cached version, and the inner module
        # holds another: send it the cached bundle.
        entry = cache.services.get(msg.service)
        data = None
        if entry is not None and entry.bundle:
            data = await self._on_disk(cache.read, entry.bundle)
        if data is None:
            again = await self._uplink.request(
                messages.FetchService(service=msg.service, have_version=msg.have_version),
                messages.Service,
            )
            if again.sealed_bundle:
                await self._verify(again.sealed_bundle, Kind.BUNDLE, msg.service)
            await self._verify(again.sealed_licence, Kind.LICENCE_SET)
            return again, False
        return messages.Service(sealed_bundle=data, sealed_licence=reply.sealed_licence), False

    async def _on_disk(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run a cache operation on a worker thread, one at a time.

        Writing a bundle means megabytes and two fsyncs (seconds on an SD
        card): on the event loop that would starve the optical session's
        keepalives.  The lock keeps the cache single-writer.
        """
        async with self._disk:
            return await asyncio.to_thread(fn, *args)

    async def _from_cache(
        self, entry: ServiceEntry, licence: LicenceEntry | None, send_bundle: bool
    ) -> messages.Service | None:
        if licence is None:
            return None
        lic = await self._on_disk(self._cache.read, licence.digest)
        if lic is None:
            return None
        bundle = b""
        if send_bundle:
            if entry.bundle is None:
                return None
            data = await self._on_disk(self._cache.read, entry.bundle)
            if data is None:
                return None
            bundle = data
        return messages.Service(sealed_bundle=bundle, sealed_licence=lic)

    async def _stale(self, msg: messages.FetchService) -> messages.Service | None:
        entry = self._cache.services.get(msg.service)
        if entry is None:
            return None
        plan = plan_fetch(entry, self._cache.licence, msg.have_version, entry.stored_at, 1e18)
        if not plan.answer:
            return None
        return await self._from_cache(entry, self._cache.licence, plan.send_bundle)

    # -- SYNC and USAGE_REPORT -----------------------------------------------------------

    async def _sync(self, msg: messages.Sync) -> messages.SyncData:
        now = self._wall()
        last = self._cache.sync
        fresh = last is not None and 0 <= now - last.stored_at <= self._sync_serve_age
        if last is not None and last.licences is not None and fresh:
            # the set the sync lists is cached: resent unless the inner module holds it
            held = self._cache.licence
            sealed = await self._on_disk(self._cache.read, last.sealed)
            licences: bytes | None = b""
            if held is None or held.digest != last.licences or held.version != msg.since_version:
                licences = await self._on_disk(self._cache.read, last.licences)
            if sealed is not None and licences is not None:
                self.counters["sync_cache_hits"] += 1
                return messages.SyncData(sealed=sealed, sealed_licences=licences)
        reply = await self._uplink.request(
            messages.Sync(since_version=msg.since_version), messages.SyncData
        )
        await self._verify(reply.sealed, Kind.SYNC_METADATA)
        if reply.sealed_licences:
            await self._verify(reply.sealed_licences, Kind.LICENCE_SET)
        await self.store_sync(reply, verified=True, since=msg.since_version)
        self._uplink.note_synced()
        self._log("synced", bytes=len(reply.sealed) + len(reply.sealed_licences))
        return reply

    @property
    def licence_version(self) -> int:
        """The version of the licence set cached, 0 if none (a periodic sync names it)."""
        held = self._cache.licence
        return 0 if held is None else held.version

    async def store_sync(
        self, reply: messages.SyncData, *, verified: bool = False, since: int = 0
    ) -> None:
        """Cache a sync reply from central (the uplink's periodic sync calls this).

        ``since`` is the licence set version the request named (central then
        sends no set when that is the one it lists).  Verifies the reply first
        unless ``verified``; an object that does not verify is counted and not
        cached.  Never raises.
        """
        try:
            meta = verify_sealed(reply.sealed, self._key) if not verified else None
            if meta is not None and meta.kind is not Kind.SYNC_METADATA:
                raise InvalidObject("not sync metadata")
            licences = None
            if reply.sealed_licences:
                header = verify_sealed(reply.sealed_licences, self._key)
                if header.kind is not Kind.LICENCE_SET:
                    raise InvalidObject("not a licence set")
                licences = (header.version, reply.sealed_licences)
            await self._on_disk(self._cache.store_sync, reply.sealed, licences, self._wall(), since)
        except InvalidObject as e:
            self.counters["errors_bad_upstream_object"] += 1
            self._log("sync_not_cached", error=str(e))
        except CacheError as e:
            self.counters["cache_write_failures"] += 1
            self._log("cache_write_failed", error=str(e))

    async def _usage(self, msg: messages.UsageReport) -> messages.UsageAck:
        reply = await self._uplink.request(messages.UsageReport(batch=msg.batch), messages.UsageAck)
        if reply.sealed_ack:
            await self._verify(reply.sealed_ack, Kind.USAGE_ACK)
        self.counters["usage_batches"] += 1
        self._log("usage_shipped", batch_id=reply.batch_id, bytes=len(msg.batch))
        return reply

    # -- verification ----------------------------------------------------------------------

    async def _verify(self, data: bytes, kind: Kind, subject: str | None = None) -> Header:
        if len(data) > INLINE_VERIFY_BYTES:
            header = await asyncio.to_thread(verify_sealed, data, self._key)
        else:
            header = verify_sealed(data, self._key)
        if header.kind is not kind or (subject is not None and header.subject != subject):
            raise InvalidObject(f"central sent a {header.kind.name} where a {kind.name} belongs")
        return header

    def statistics(self) -> dict[str, int]:
        """Return the relay's counters (prefixed ``relay.``) and the cache's (``cache.``)."""
        stats = {f"relay.{k}": v for k, v in sorted(self.counters.items())}
        stats.update({f"cache.{k}": v for k, v in sorted(self._cache.statistics().items())})
        return stats
