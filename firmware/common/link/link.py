"""The ``Link`` facade: typed request/reply exchanges over a framed session.

Theory of operation
-------------------
A :class:`Link` owns one :class:`~firmware.common.link.session.Session` (the
sans-I/O core) and one :class:`~firmware.common.adapters.transport.Transport`,
and drives the session with the event loop's clock.  Two background tasks do
all the driving:

* the **reader** feeds every chunk the transport returns to
  ``session.receive_bytes`` and handles the resulting events;
* the **pump** runs ``handle_deadline`` when the session's deadline falls due,
  writes whatever ``bytes_to_send`` hands out (the session paces it to the
  line rate), and otherwise sleeps until the next deadline or until a new
  message is queued.

Everything else is bookkeeping on top of the session's events:

* **Requests.**  :meth:`Link.request` waits (within its timeout) for the
  session to be up, encodes the message with a fresh correlation id, queues
  it, and waits for the reply whose ``re`` names that id.  Many requests may
  be in flight at once.  Messages under ``URGENT_LIMIT`` bytes are queued
  urgent, so control traffic overtakes a bulk transfer.
* **Failures are typed.**  A reply of kind Error raises
  :class:`~firmware.common.errors.RemoteError`; a message the session could
  not deliver raises what the session said (:class:`LinkDown` or
  :class:`PeerRestarted`); a session that goes down fails every exchange sent
  in it at once, even those already delivered and awaiting their reply; no
  reply in time raises :class:`LinkTimeout`; a reply that fails strict
  decoding or is of the wrong kind raises
  :class:`~firmware.common.link.messages.InvalidMessage`.
* **Streamed replies.**  A ``Service`` reply (to ``FetchService``) may be
  sent as its bundle in ``ServicePart`` replies followed by a ``Service``
  that ends it (``streamed`` = the bundle's length).  The requesting link
  joins the parts, which may arrive in any order and before or after the
  end, and returns one ``Service`` with the whole bundle; ``on_part`` lets a
  relay pass each part on as it arrives.  A handler may return an async
  iterator of parts and then the final reply instead of one reply; a
  ``Service`` reply with a bundle over one part is streamed by the link
  itself.  At most ``PARTS_IN_FLIGHT`` parts of one reply are unacknowledged
  at a time, so parts complete in order instead of sharing the line with
  every other part of the same bundle.
* **Serving.**  Incoming requests wait in a bounded queue until
  :meth:`Link.serve` runs a handler on them, several at once.  A reply is sent
  only into the session instance its request came from: after a restart the
  peer has forgotten the request, so a late reply is dropped, not delivered
  as an answer to something else.
* **Direction.**  The client role (the inner module on the optical link)
  never answers a request of the request range and never sends a reply-range
  kind; the server role never sends a request-range kind.  Maintenance kinds
  (0x80-0xBF: the technician's link test) travel either way.  What arrives
  against these rules is dropped and counted; it never reaches a handler.
* **State.**  :attr:`Link.connected` and :attr:`Link.failed` say where the
  link stands; :meth:`Link.add_listener` is told of every SessionUp,
  SessionDown and, once, :class:`LinkFailed`, so a daemon need not poll.
* **Nothing dies silently.**  If a background task fails (the port went
  away, or a bug), every exchange in flight fails with that error, every
  later call raises it, and :meth:`Link.aclose` raises it if no caller has
  seen it yet (and always when it is a bug rather than an optogate error).
  A handler that raises something other than an optogate error makes
  :meth:`Link.serve` raise it, after the peer got an ``internal_error`` reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, TypeVar, overload

from firmware.common.adapters.transport import Transport
from firmware.common.errors import (
    LinkClosed,
    LinkDown,
    LinkError,
    LinkTimeout,
    LocalProtocolError,
    OptogateError,
    RemoteError,
)
from firmware.common.link import messages
from firmware.common.link.kinds import MAINTENANCE_RANGE, REPLY_RANGE, REQUEST_RANGE, Kind
from firmware.common.link.session import (
    MessageFailed,
    MessageReceived,
    MessageSent,
    Role,
    Session,
    SessionConfig,
    SessionDown,
    SessionUp,
)

logger = logging.getLogger(__name__)

#: Default bound on one exchange, waiting for the session included.  A 64 MiB
#: bundle needs ~95 min at 115200 baud: bulk callers pass their own timeout.
DEFAULT_TIMEOUT: Final = 30.0
#: Payloads below this are queued urgent.  1 KiB is under 0.1 s of line time
#: at 115200 baud: control messages, echoes and errors, never bulk data.
URGENT_LIMIT: Final = 1024
#: Incoming requests waiting for a handler, by count and by bytes; beyond
#: either the peer gets a "busy" error instead of growing our memory.
MAX_QUEUED_REQUESTS: Final = 64
MAX_QUEUED_BYTES: Final = 128 * 2**20
#: Retry hint sent with "busy": a handler slot frees up within about that.
BUSY_RETRY_AFTER: Final = 1.0
#: Handlers running at once under :meth:`Link.serve` unless told otherwise.
DEFAULT_CONCURRENCY: Final = 16
#: Parts of one streamed reply queued and not yet acknowledged.  Two keep the
#: line busy (one is on the wire while the other waits) and make parts
#: complete in order, so a relay downstream can pass each on at once.
PARTS_IN_FLIGHT: Final = 2
#: Shortest sleep of the pump when the session reports a deadline already
#: passed but had nothing to do (it waits for line room): bounds a spin.
SPIN_GUARD: Final = 0.002

#: A reply, a stream of parts ending with the reply, or None (no reply).
HandlerResult = messages.Message | AsyncIterator[messages.Message] | None
Handler = Callable[[messages.Message], Awaitable[HandlerResult]]
PartListener = Callable[[messages.ServicePart], None]


@dataclass(frozen=True)
class LinkFailed:
    """A background task of the link failed; the link is unusable from now on."""

    error: BaseException


#: What a state listener receives: the session's up/down events, or the end.
StateEvent = SessionUp | SessionDown | LinkFailed
Listener = Callable[[StateEvent], None]
_R = TypeVar("_R", bound=messages.Message)


class PartJoiner:
    """The parts of one streamed Service reply, placed by offset, until they are whole."""

    __slots__ = ("final", "nbytes", "parts")

    def __init__(self) -> None:
        self.parts: dict[int, bytes] = {}
        self.nbytes = 0
        self.final: messages.Service | None = None  # the Service that ends the stream

    def add(self, part: messages.ServicePart) -> bool:
        """Keep ``part``; return False for an exact repeat.  Raises InvalidMessage."""
        end = part.offset + len(part.data)
        limit = self.final.streamed if self.final is not None else messages.MAX_BUNDLE
        if end > limit:
            raise messages.InvalidMessage(f"part at {part.offset} ends beyond the bundle")
        held = self.parts.get(part.offset)
        if held is not None:
            if held != part.data:
                raise messages.InvalidMessage(f"two different parts at {part.offset}")
            return False
        self.nbytes += len(part.data)
        if self.nbytes > messages.MAX_BUNDLE:
            raise messages.InvalidMessage("parts add up to more than a bundle may hold")
        self.parts[part.offset] = part.data
        return True

    def end(self, final: messages.Service) -> None:
        """Note the Service that ends the stream.  Raises InvalidMessage."""
        self.final = final
        self.check()

    def check(self) -> None:
        """Raise InvalidMessage when the parts hold more bytes than the end announced."""
        if self.final is not None and self.nbytes > self.final.streamed:
            raise messages.InvalidMessage("more part bytes than the streamed bundle holds")

    def joined(self) -> messages.Service | None:
        """Return the streamed reply once every byte has arrived, else None."""
        final = self.final
        if final is None:
            return None
        pieces: list[bytes] = []
        pos = 0
        for offset in sorted(self.parts):
            data = self.parts[offset]
            if offset > pos:
                return None  # a gap: a part is still on its way
            if offset + len(data) > pos:
                pieces.append(data[pos - offset :])
                pos = offset + len(data)
        if pos < final.streamed:
            return None
        self.parts.clear()
        return dataclasses.replace(final, sealed_bundle=b"".join(pieces), streamed=0)


class _Exchange:
    """One request (or one-way message) of ours, until it is answered or fails."""

    __slots__ = (
        "expect",
        "future",
        "generation",
        "kind",
        "msg_id",
        "on_part",
        "one_way",
        "part_kind",
        "parts",
    )

    def __init__(self, kind: Kind, future: asyncio.Future[messages.Message | None]) -> None:
        self.kind = kind
        self.expect = messages.REPLY_KIND.get(kind)
        self.part_kind = messages.PART_KIND.get(kind)
        self.future = future
        self.one_way = False
        self.msg_id: int | None = None  # the session's id, once queued
        self.generation = -1  # session instance it was sent in
        self.on_part: PartListener | None = None
        self.parts = PartJoiner()  # a streamed reply's parts

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        self.parts = PartJoiner()


@dataclass(frozen=True)
class _Incoming:
    msg: messages.Message
    corr_id: int
    generation: int
    size: int


class Link:
    """Typed exchanges over one session and one transport.  See the module docstring.

    Create it inside a running event loop; it starts driving the session at
    once.  Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        transport: Transport,
        config: SessionConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise LocalProtocolError("a Link must be created inside a running event loop") from None
        self._transport = transport
        self._config = config
        self._rng = rng if rng is not None else random.Random()  # seeded from the OS
        self._session = Session(config, self._rng, self._loop.time())
        self._generation = 0  # SessionUp events seen: numbers session instances
        self._up = asyncio.Event()  # set while up, and on failure/close (to wake waiters)
        self._wake = asyncio.Event()  # the pump has something new to look at
        self._incoming: deque[_Incoming] = deque()
        self._incoming_bytes = 0
        self._incoming_ready = asyncio.Event()
        self._exchanges: dict[int, _Exchange] = {}  # by correlation id
        self._by_msg_id: dict[int, _Exchange] = {}  # by session message id
        self._sent_waiters: dict[int, asyncio.Future[None]] = {}  # reply parts, by msg id
        self._next_corr = self._rng.getrandbits(32)
        self._stats: dict[str, int] = {}
        self._failure: BaseException | None = None
        self._failure_reported = False
        self._handler_crash: BaseException | None = None
        self._serving = False
        self._closed = False
        self._listeners: list[Listener] = []
        self._tasks = [
            self._loop.create_task(self._read_loop(), name=f"link-read {transport.name}"),
            self._loop.create_task(self._pump_loop(), name=f"link-pump {transport.name}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public API --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the session is up."""
        return self._session.connected

    @property
    def failed(self) -> bool:
        """True once a background task has failed (every call then raises its error)."""
        return self._failure is not None

    @property
    def role(self) -> Role:
        """This end's role."""
        return self._config.role

    def statistics(self) -> dict[str, int]:
        """Return the session's counters and the facade's (prefixed ``link_``)."""
        stats = self._session.statistics()
        stats.update({f"link_{k}": v for k, v in sorted(self._stats.items())})
        stats["link_in_flight"] = len(self._exchanges)
        stats["link_queued_requests"] = len(self._incoming)
        return stats

    async def wait_up(self, timeout: float) -> None:  # noqa: ASYNC109 - part of the API
        """Return once the session is up.

        Raises LinkTimeout after ``timeout`` seconds, the link's failure if a
        background task failed, LinkClosed once closed.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._until_up()
        except TimeoutError:
            self._check()
            raise LinkTimeout(f"link not up after {timeout:g} s") from None

    @overload
    async def request(
        self,
        msg: messages.Message,
        *,
        timeout: float = ...,  # noqa: ASYNC109
        expect: type[_R],
        on_part: PartListener | None = ...,
    ) -> _R: ...

    @overload
    async def request(
        self,
        msg: messages.Message,
        *,
        timeout: float = ...,  # noqa: ASYNC109
        on_part: PartListener | None = ...,
    ) -> messages.Message: ...

    async def request(
        self,
        msg: messages.Message,
        *,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - one bound per exchange
        expect: type[messages.Message] = messages.Message,
        on_part: PartListener | None = None,
    ) -> messages.Message:
        """Send request ``msg`` and return the peer's reply.

        A streamed reply is returned joined (see the module docstring);
        ``on_part(part)`` is called with each new part as it arrives, inside
        the link's driving loop: it must not block, and if it raises, the
        exchange fails with that error.

        ``timeout`` bounds the whole exchange, waiting for the session to come
        up included.  Raises RemoteError when the reply is an Error, LinkDown
        (PeerRestarted when the peer rebooted) when the session could not
        deliver the request or went down before the reply, LinkTimeout when no
        reply came in time, InvalidMessage when the reply is malformed or not
        an ``expect``, LinkClosed once closed, LocalProtocolError when ``msg``
        is a reply or a kind this role may not send.
        """
        reply = await self._exchange(msg, timeout, one_way=False, on_part=on_part)
        if isinstance(reply, messages.Error):
            raise RemoteError(reply.code, reply.detail, reply.retry_after)
        if not isinstance(reply, expect):
            raise messages.InvalidMessage(
                f"reply {type(reply).__name__} is not a {expect.__name__}"
            )
        return reply

    async def send(
        self,
        msg: messages.Message,
        *,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - one bound per exchange
    ) -> None:
        """Send ``msg`` expecting no reply; return once the peer has received it.

        Raises like :meth:`request` (except RemoteError: there is no reply).
        """
        await self._exchange(msg, timeout, one_way=True)

    async def serve(self, handler: Handler, *, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        """Answer incoming requests with ``handler`` until the link is closed.

        ``handler(msg)`` returns the reply (or None for a message that gets no
        reply), or an async iterator of reply parts ending with the reply (see
        the module docstring); it runs for up to ``concurrency`` requests at
        once.  A handler
        raising RemoteError answers with that error; any other optogate error
        answers ``internal_error`` and is logged.  Returns None once the link
        is closed.  Raises the link's failure when a background task fails, and
        re-raises (after answering ``internal_error``) any other exception of a
        handler: that is a bug.  Raises LocalProtocolError if already serving.
        """
        if self._serving:
            raise LocalProtocolError("serve() is already running on this link")
        self._serving = True
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                if self._handler_crash is not None:
                    crash, self._handler_crash = self._handler_crash, None
                    raise crash
                if self._closed and self._failure is None:
                    return
                self._check()
                if not self._incoming:
                    self._incoming_ready.clear()
                    await self._incoming_ready.wait()
                    continue
                await slots.acquire()
                item = self._incoming.popleft()
                self._incoming_bytes -= item.size
                task = self._loop.create_task(self._handle(handler, item))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            self._serving = False
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` on every SessionUp, SessionDown and LinkFailed.

        Listeners run synchronously inside the link's driving loop and must
        not block; one that raises is a bug and fails the link.
        """
        self._listeners.append(listener)

    def force_down(self, error: LinkDown) -> None:
        """Take the session down now (the peer's power line dropped, say).

        Exchanges in flight fail with ``error``; the session starts over.
        """
        self._session.force_down(error, self._loop.time())
        self._dispatch()
        self._wake.set()

    async def aclose(self) -> None:
        """Stop driving the session and close the transport (idempotent).

        Exchanges in flight fail with LinkClosed.  Raises the failure of a
        background task when no caller has seen it yet, or when it was a bug
        (not an optogate error).
        """
        if not self._closed:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            closed = LinkClosed("link closed")
            for ex in list(self._exchanges.values()):
                ex.fail(closed)
            self._fail_waiters(closed)
            self._up.set()
            self._incoming_ready.set()
            await self._transport.aclose()
        failure = self._failure
        if failure is not None and (
            not self._failure_reported or not isinstance(failure, OptogateError)
        ):
            self._failure_reported = True
            raise failure

    # -- exchanges -----------------------------------------------------------------

    def _check(self) -> None:
        if self._failure is not None:
            self._failure_reported = True
            raise self._failure
        if self._closed:
            raise LinkClosed("link closed")

    async def _until_up(self) -> None:
        while True:
            self._check()
            if self._session.connected:
                return
            self._up.clear()
            await self._up.wait()

    def _may_send(self, kind: int) -> bool:
        if kind in MAINTENANCE_RANGE:
            return True
        if self._config.role is Role.CLIENT:
            return kind in REQUEST_RANGE
        return kind in REPLY_RANGE

    async def _exchange(
        self,
        msg: messages.Message,
        limit: float,
        *,
        one_way: bool,
        on_part: PartListener | None = None,
    ) -> messages.Message | None:
        self._check()
        if msg.IS_REPLY:
            raise LocalProtocolError(f"{type(msg).__name__} is a reply, not a request")
        if not self._may_send(msg.KIND):
            raise LocalProtocolError(f"the {self.role.value} role may not send {msg.KIND.name}")
        corr = self._new_corr()
        payload = messages.encode(msg, corr)
        ex = _Exchange(msg.KIND, self._loop.create_future())
        ex.one_way = one_way
        ex.on_part = on_part
        self._exchanges[corr] = ex
        self._count("requests" if not one_way else "one_way")
        try:
            async with asyncio.timeout(limit) as scope:
                await self._until_up()
                ex.msg_id = self._queue(msg.KIND, payload)
                ex.generation = self._generation
                self._by_msg_id[ex.msg_id] = ex
                return await ex.future
        except TimeoutError:
            if not scope.expired():
                raise
            self._check()
            self._count("timeouts")
            what = "delivery" if one_way else "reply"
            raise LinkTimeout(f"no {what} to {msg.KIND.name} within {limit:g} s") from None
        finally:
            del self._exchanges[corr]
            if ex.msg_id is not None:
                self._by_msg_id.pop(ex.msg_id, None)

    def _new_corr(self) -> int:
        corr = self._next_corr
        self._next_corr = (corr + 1) & messages.MAX_CORR_ID
        return corr

    def _queue(self, kind: int, payload: bytes) -> int:
        msg_id = self._session.send_message(
            kind, payload, self._loop.time(), urgent=len(payload) < URGENT_LIMIT
        )
        self._wake.set()
        return msg_id

    # -- serving -------------------------------------------------------------------

    async def _handle(self, handler: Handler, item: _Incoming) -> None:
        reply: messages.Message | None
        try:
            result = await handler(item.msg)
            parts_sent = 0
            if result is None or isinstance(result, messages.Message):
                reply = result
            else:
                reply, parts_sent = await self._send_parts(item, result)
            if reply is not None:
                self._check_reply(item.msg, reply)
                if (
                    isinstance(reply, messages.Service)
                    and len(reply.sealed_bundle) > messages.PART_SIZE
                    and item.msg.KIND in messages.PART_KIND
                    and not parts_sent  # after parts, an inline end means "discard them"
                ):
                    reply, _ = await self._send_parts(item, _each(messages.split_service(reply)))
        except RemoteError as e:
            reply = _error_reply(e.code, e.detail, e.retry_after)
        except (LocalProtocolError, OptogateError) as e:
            self._count("handler_errors")
            if isinstance(e, LocalProtocolError):
                self._crash(e)
            else:
                logger.warning("handler for %s failed: %r", item.msg.KIND.name, e)
            reply = _error_reply("internal_error", type(e).__name__)
        except Exception as e:
            self._count("handler_errors")
            self._crash(e)
            reply = _error_reply("internal_error", type(e).__name__)
        if reply is not None:
            self._reply(reply, item.corr_id, item.generation)

    async def _send_parts(
        self, item: _Incoming, stream: AsyncIterator[messages.Message]
    ) -> tuple[messages.Message | None, int]:
        """Send the parts ``stream`` yields; return what ends it and how many parts went.

        The end is None when the session ended under the stream.
        """
        part_kind = messages.PART_KIND.get(item.msg.KIND)
        in_flight: deque[tuple[int, asyncio.Future[None]]] = deque()
        sent = 0
        try:
            async for reply in stream:
                if part_kind is None or reply.KIND is not part_kind:
                    return reply, sent
                while len(in_flight) >= PARTS_IN_FLIGHT:
                    await in_flight.popleft()[1]
                queued = self._reply(reply, item.corr_id, item.generation, track=True)
                if queued is None:
                    self._count("streams_abandoned")
                    return None, sent
                in_flight.append(queued)
                sent += 1
            raise LocalProtocolError(f"the reply stream to {item.msg.KIND.name} has no end")
        except LinkError:
            self._count("streams_abandoned")  # the peer has forgotten the request
            return None, sent
        finally:
            for msg_id, fut in in_flight:
                self._sent_waiters.pop(msg_id, None)
                if fut.done():
                    fut.exception()  # seen: the stream already ended
                else:
                    fut.cancel()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _crash(self, error: BaseException) -> None:
        logger.error("request handler raised %r", error)
        if self._handler_crash is None:
            self._handler_crash = error
        self._incoming_ready.set()

    def _check_reply(self, request: messages.Message, reply: messages.Message) -> None:
        if not reply.IS_REPLY:
            raise LocalProtocolError(f"handler answered with request {type(reply).__name__}")
        expected = messages.REPLY_KIND.get(request.KIND)
        if not isinstance(reply, messages.Error) and reply.KIND is not expected:
            raise LocalProtocolError(f"handler answered {request.KIND.name} with {reply.KIND.name}")

    def _reply(
        self, reply: messages.Message, reply_to: int, generation: int, *, track: bool = False
    ) -> tuple[int, asyncio.Future[None]] | None:
        """Queue ``reply``; with ``track``, return its message id and a future set on delivery."""
        if not self._may_send(reply.KIND):
            self._count("replies_suppressed")  # e.g. an Error from the client role
            return None
        if generation != self._generation or not self._session.connected:
            self._count("replies_dropped")  # the peer has forgotten the request
            return None
        payload = messages.encode(reply, self._new_corr(), reply_to)
        msg_id = self._queue(reply.KIND, payload)
        self._count("replies")
        if not track:
            return None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._sent_waiters[msg_id] = fut
        return msg_id, fut

    # -- session events --------------------------------------------------------------

    def _dispatch(self) -> None:
        while (event := self._session.next_event()) is not None:
            if isinstance(event, MessageReceived):
                self._on_message(event)
            elif isinstance(event, MessageSent):
                ex = self._by_msg_id.pop(event.msg_id, None)
                if ex is not None and ex.one_way and not ex.future.done():
                    ex.future.set_result(None)
                waiter = self._sent_waiters.pop(event.msg_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, MessageFailed):
                ex = self._by_msg_id.pop(event.msg_id, None)
                if ex is not None:
                    ex.fail(event.error)
                waiter = self._sent_waiters.pop(event.msg_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(event.error)
            elif isinstance(event, SessionUp):
                self._generation += 1
                self._up.set()
                self._notify(event)
                logger.info(
                    "link up on %s (peer epoch %016x%s)",
                    self._transport.name,
                    event.peer_epoch,
                    ", peer restarted" if event.restarted else "",
                )
            elif isinstance(event, SessionDown):
                self._up.clear()
                self._fail_generation(event.error)
                logger.warning("link down on %s: %s", self._transport.name, event.error)
                self._notify(event)

    def _notify(self, event: StateEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as e:
                if isinstance(event, LinkFailed):
                    logger.exception("link state listener failed")
                else:
                    self._fail(e)

    def _fail_generation(self, error: LinkError) -> None:
        """Fail every exchange sent in the session instance that just ended."""
        for ex in list(self._exchanges.values()):
            if ex.msg_id is not None and ex.generation == self._generation:
                ex.fail(error)

    def _on_message(self, event: MessageReceived) -> None:
        kind = event.kind
        try:
            msg, corr, reply_to = messages.decode(kind, event.payload)
        except messages.InvalidMessage as e:
            self._count("rejected")
            logger.warning("rejected message of kind %#04x: %s", kind, e.reason)
            if e.reply_to is not None:
                ex = self._exchanges.get(e.reply_to)
                if ex is not None and not ex.one_way:
                    ex.fail(e)
            elif e.corr_id is not None and self._may_serve(kind):
                self._reply(_error_reply("bad_message", e.reason), e.corr_id, self._generation)
            return
        if reply_to is not None:
            self._on_reply(msg, reply_to)
            return
        if not self._may_serve(kind):
            self._count("refused")  # against the direction rules
            return
        size = len(event.payload)
        if (
            len(self._incoming) >= MAX_QUEUED_REQUESTS
            or self._incoming_bytes + size > MAX_QUEUED_BYTES
        ):
            self._count("busy")
            self._reply(
                _error_reply("busy", "too many requests waiting", BUSY_RETRY_AFTER),
                corr,
                self._generation,
            )
            return
        self._incoming.append(_Incoming(msg, corr, self._generation, size))
        self._incoming_bytes += size
        self._incoming_ready.set()

    def _may_serve(self, kind: int) -> bool:
        if kind in MAINTENANCE_RANGE:
            return True
        return self._config.role is Role.SERVER and kind in REQUEST_RANGE

    def _on_reply(self, msg: messages.Message, reply_to: int) -> None:
        if msg.KIND in REPLY_RANGE and self._config.role is not Role.CLIENT:
            self._count("refused")
            return
        ex = self._exchanges.get(reply_to)
        if ex is None or ex.one_way or ex.future.done() or ex.generation != self._generation:
            self._count("late_replies")  # timed out, cancelled, or not ours
            return
        if isinstance(msg, messages.ServicePart) and msg.KIND is ex.part_kind:
            self._on_part(ex, msg)
        elif isinstance(msg, messages.Service) and msg.KIND is ex.expect and msg.streamed:
            try:
                ex.parts.end(msg)
                self._try_join(ex)
            except messages.InvalidMessage as e:
                ex.fail(e)
        elif isinstance(msg, messages.Error) or msg.KIND is ex.expect:
            ex.parts = PartJoiner()  # an inline reply replaces whatever was streamed
            ex.future.set_result(msg)
        else:
            ex.fail(
                messages.InvalidMessage(
                    f"{msg.KIND.name} does not answer {ex.kind.name}", reply_to=reply_to
                )
            )

    def _on_part(self, ex: _Exchange, part: messages.ServicePart) -> None:
        try:
            if not ex.parts.add(part):
                self._count("parts_repeated")
                return
            self._count("parts_received")
            if ex.on_part is not None:
                ex.on_part(part)
            self._try_join(ex)
        except Exception as e:  # a bad part, or the caller's listener failed
            ex.fail(e)

    def _try_join(self, ex: _Exchange) -> None:
        ex.parts.check()
        whole = ex.parts.joined()
        if whole is not None and not ex.future.done():
            ex.future.set_result(whole)

    # -- background tasks --------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            data = await self._transport.read()
            if not data:
                error = LinkDown(f"{self._transport.name}: the peer closed the connection")
                self._session.force_down(error, self._loop.time())
                self._dispatch()
                raise error
            self._session.receive_bytes(data, self._loop.time())
            self._dispatch()
            self._wake.set()

    async def _pump_loop(self) -> None:
        session = self._session
        while True:
            now = self._loop.time()
            deadline = session.next_deadline()
            if deadline is not None and now >= deadline:
                session.handle_deadline(now)
            data = session.bytes_to_send(now)
            self._dispatch()
            if data:
                await self._transport.write(data)
                continue
            self._wake.clear()
            deadline = session.next_deadline()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = deadline - self._loop.time()
            if delay <= 0:
                self._count("pump_spins")
                delay = SPIN_GUARD
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:  # the loops never return; treat it as a bug
            error = LocalProtocolError(f"{task.get_name()} ended unexpectedly")
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self._failure is not None or self._closed:
            return
        self._failure = error
        logger.error("link on %s failed: %r", self._transport.name, error)
        for task in self._tasks:
            task.cancel()
        for ex in list(self._exchanges.values()):
            ex.fail(error)
        self._fail_waiters(error)
        self._up.set()
        self._incoming_ready.set()
        self._notify(LinkFailed(error))

    def _fail_waiters(self, error: BaseException) -> None:
        waiters, self._sent_waiters = self._sent_waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)

    def _count(self, name: str) -> None:
        self._stats[name] = self._stats.get(name, 0) + 1


async def _each(items: Iterable[messages.Message]) -> AsyncIterator[messages.Message]:
    for item in items:
        yield item


def _error_reply(code: str, detail: str, retry_after: float | None = None) -> messages.Error:
    """Build an Error reply, coercing code and detail into their bounds."""
    if not messages.ERROR_CODE_PATTERN.fullmatch(code) or len(code) > messages.MAX_CODE:
        code = "remote_error"
    detail = detail.encode("utf-8", "replace")[: messages.MAX_DETAIL].decode("utf-8", "ignore")
    if retry_after is not None and not 0 <= retry_after <= messages.MAX_RETRY_AFTER:
        retry_after = None
    return messages.Error(code=code, detail=detail, retry_after=retry_after)
