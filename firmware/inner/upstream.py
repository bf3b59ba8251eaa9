"""The inner module's side of the optical link: one CLIENT-role Link, kept alive.

Theory of operation
-------------------
:class:`Upstream` owns the :class:`~firmware.common.link.link.Link` to the
outer module.  Over a serial port one Link lives as long as the daemon (the
session re-handshakes by itself after a cut); over TCP (tests, demo) a closed
connection ends the Link, so :meth:`Upstream.run` dials again with a bounded
backoff and builds a new one.

The power line is faster than keepalives: :meth:`peer_power` with False
forces the session down at once (every exchange in flight fails) and makes
every later request fail immediately with :class:`UpstreamUnavailable` -
so a call for an unbuilt service gets its 503 at once instead of waiting
out a timeout.  Power back clears the flag; the session handshakes again and
``on_up`` (the daemon's "sync now, ship usage now") runs on every new
session.

The inner module only ever *asks* (FETCH_SERVICE, SYNC, USAGE_REPORT,
STATUS); what comes back is checked by the trust layer, never trusted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from firmware.common.adapters.transport import Transport
from firmware.common.errors import LinkDown, LinkError, OptogateError, RemoteError
from firmware.common.link import messages
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

logger = logging.getLogger(__name__)

#: How often the supervisor looks at the link's state (up/down/failed).
#: 50 ms is far below a human's notice and costs nothing.
POLL_S: Final = 0.05
#: Reconnect backoff bounds (TCP): quick at first, never hammering.
MIN_BACKOFF_S: Final = 0.2
MAX_BACKOFF_S: Final = 5.0

_R = TypeVar("_R", bound=messages.Message)


class UpstreamUnavailable(LinkError):
    """The outer module cannot be asked now (no link, its power is off)."""


class Upstream:
    """Keeps a CLIENT-role link to the outer module; see the module docstring."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Transport]],
        config: SessionConfig,
        *,
        on_up: Callable[[], None] | None = None,
        log: Callable[..., None] | None = None,
    ) -> None:
        if config.role is not Role.CLIENT:
            raise ValueError("the inner module is the CLIENT on the optical link")
        self._connect = connect
        self._config = config
        self._on_up = on_up
        self._log = log or (lambda event, **kw: None)
        self._link: Link | None = None
        self._powered = True
        self._changed = asyncio.Event()
        self.stats = {"connects": 0, "connect_failures": 0, "sessions": 0, "power_losses": 0}

    @property
    def connected(self) -> bool:
        """True while a session with the outer module is up."""
        return self._powered and self._link is not None and self._link.connected

    @property
    def peer_powered(self) -> bool:
        """False while the power line says the outer module is off."""
        return self._powered

    def link_statistics(self) -> dict[str, int]:
        """The current link's counters (empty without one)."""
        return self._link.statistics() if self._link is not None else {}

    def peer_power(self, on: bool) -> None:
        """Tell the upstream what the peer-power line says (see module docstring)."""
        if on == self._powered:
            return
        self._powered = on
        if not on:
            self.stats["power_losses"] += 1
            if self._link is not None and not self._link.failed:
                self._link.force_down(LinkDown("the outer module's power went off"))
        self._changed.set()

    async def request(self, msg: messages.Message, *, timeout: float, expect: type[_R]) -> _R:  # noqa: ASYNC109
        """Send ``msg`` to the outer module and return its reply.

        Raises UpstreamUnavailable at once when the peer's power is off or no
        link exists, RemoteError for an Error reply, LinkDown / LinkTimeout /
        InvalidMessage as :meth:`Link.request`.
        """
        if not self._powered:
            raise UpstreamUnavailable("the outer module is powered off")
        link = self._link
        if link is None or link.failed:
            raise UpstreamUnavailable("no link to the outer module")
        return await link.request(msg, timeout=timeout, expect=expect)

    async def run(self) -> None:
        """Keep a link up until cancelled (reconnecting TCP transports)."""
        backoff = MIN_BACKOFF_S
        try:
            while True:
                try:
                    transport = await self._connect()
                except OptogateError as e:
                    self.stats["connect_failures"] += 1
                    self._log("link_connect_failed", error=str(e))
                    await asyncio.sleep(backoff)
                    backoff = min(MAX_BACKOFF_S, backoff * 2)
                    continue
                self.stats["connects"] += 1
                backoff = MIN_BACKOFF_S
                link = Link(transport, self._config)
                self._link = link
                try:
                    await self._watch(link)
                finally:
                    self._link = None
                    with contextlib.suppress(OptogateError):
                        await link.aclose()
                await asyncio.sleep(backoff)
        finally:
            if self._link is not None:
                with contextlib.suppress(OptogateError):
                    await self._link.aclose()

    async def _watch(self, link: Link) -> None:
        was_up = False
        while not link.failed:
            up = link.connected and self._powered
            if up and not was_up:
                self.stats["sessions"] += 1
                self._log("link_up")
                if self._on_up is not None:
                    self._on_up()
            elif was_up and not up:
                self._log("link_down")
            was_up = up
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._changed.wait()
        if was_up:
            self._log("link_down")
        self._log("link_failed", error="transport closed or failed")


__all__ = ["RemoteError", "Upstream", "UpstreamUnavailable"]
