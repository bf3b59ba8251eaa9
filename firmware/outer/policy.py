"""The uplink's call policy: when to connect, when to sync, when to hang up (sans-I/O).

Theory of operation
-------------------
A dial-up call costs money and takes tens of seconds to connect, so the
outer module connects only when something needs central, does everything
pending on that one call, and hangs up once the call has been idle for a
while.  The same rules drive the internet transport (an idle TLS connection
is closed too), so one policy serves both.

:class:`CallPolicy` is the pure core of those decisions.  It holds no socket
and reads no clock: every method takes ``now`` (seconds on a monotonic
clock) and the asyncio adapter (:mod:`firmware.outer.uplink`) asks it what to
do and reports what happened.  The states::

    IDLE ──connect_started──► CONNECTING ──connected──► UP
      ▲                           │                      │
      └──────connect_failed───────┘ (backoff)            │
      └──────────────────call_ended──────────────────────┘

* **Pending work keeps a call up.**  ``request_started``/``request_finished``
  count the exchanges in flight (relayed requests and the uplink's own
  syncs); a call with one pending is never hung up.
* **Idle hang-up.**  ``should_hang_up(now)`` is true once a call is up,
  nothing is pending, and nothing happened for ``idle_hangup`` seconds.
* **Periodic sync.**  A sync is due every ``sync_interval`` seconds after
  the last good one (at once after start when ``sync_at_start``).  A failed
  sync is retried when the connect backoff allows, never sooner.
* **Batching.**  While a call is up anyway, a sync due within
  ``sync_batch_window`` seconds is pulled forward onto it, so the periodic
  sync rarely needs a call of its own; requests arriving while a call is
  being set up wait for it and share it.
* **Backoff.**  Each failed connect (every transport tried) doubles the wait
  before the next attempt, from ``backoff_initial`` up to ``backoff_max``;
  a success resets it.  During the backoff requests are refused at once
  with :meth:`retry_after` seconds, so the inner module never hangs.
* **Fallback order.**  ``order`` names the transports to try, first to last,
  on every connect (for example internet first, dial-up as fallback).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from firmware.common.errors import ConfigError, LocalProtocolError

#: The transports the uplink knows.
TRANSPORTS: Final = ("internet", "dialup")

#: A refused request is told to retry no sooner than this: a retry storm
#: from the inner module buys nothing while a connect is being backed off.
MIN_RETRY_AFTER: Final = 1.0


class CallState(enum.Enum):
    """Where the uplink's call stands."""

    IDLE = "idle"
    CONNECTING = "connecting"
    UP = "up"


@dataclass(frozen=True)
class PolicyConfig:
    """The call policy's knobs; every duration is in seconds.

    Raises ConfigError (from construction) for values that cannot work.
    """

    order: tuple[str, ...] = ("internet", "dialup")
    #: Dial-up: a minute of silence costs a minute of call; 30 s still lets a
    #: follow-up request (the inner module syncs, then ships usage) share it.
    idle_hangup: float = 30.0
    #: Central's freeze window is a week; an hourly sync keeps licences and
    #: trusted time fresh at the price of about 24 short calls a day.
    sync_interval: float = 3600.0
    #: A sync due within this much of a call that is up anyway rides on it.
    sync_batch_window: float = 900.0
    sync_at_start: bool = True
    backoff_initial: float = 10.0
    backoff_factor: float = 2.0
    backoff_max: float = 600.0

    def __post_init__(self) -> None:
        if not self.order:
            raise ConfigError("uplink.order must name at least one transport")
        for name in self.order:
            if name not in TRANSPORTS:
                raise ConfigError(f"uplink.order: unknown transport {name!r}")
        if len(set(self.order)) != len(self.order):
            raise ConfigError("uplink.order names a transport twice")
        for name in ("idle_hangup", "sync_interval", "backoff_initial"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"uplink.{name} must be positive")
        if self.sync_batch_window < 0 or self.sync_batch_window >= self.sync_interval:
            raise ConfigError("uplink.sync_batch_window must be in [0, sync_interval)")
        if self.backoff_factor < 1 or self.backoff_max < self.backoff_initial:
            raise ConfigError("uplink backoff must not shrink")


class CallPolicy:
    """The decisions of one uplink; see the module docstring."""

    def __init__(self, config: PolicyConfig, now: float) -> None:
        self.config = config
        self.state = CallState.IDLE
        self.transport: str | None = None
        self.pending = 0
        self.syncing = False
        self.failures = 0
        self.calls = 0
        self.backoff_until: float | None = None
        self.last_activity = now
        self.call_started: float | None = None
        self.last_sync: float | None = None
        self.next_sync_at = now if config.sync_at_start else now + config.sync_interval

    # -- reports from the adapter ------------------------------------------------

    def request_started(self, now: float) -> None:
        """An exchange needing central has begun."""
        self.pending += 1
        self.last_activity = now

    def request_finished(self, now: float) -> None:
        """An exchange needing central has ended (answered or failed).

        Raises LocalProtocolError when none was pending (a bug in the adapter).
        """
        if self.pending <= 0:
            raise LocalProtocolError("request_finished without request_started")
        self.pending -= 1
        self.last_activity = now

    def connect_started(self, now: float) -> None:
        """A connect (trying every transport in order) has begun.

        Raises LocalProtocolError unless the policy is IDLE.
        """
        if self.state is not CallState.IDLE:
            raise LocalProtocolError(f"connect_started while {self.state.value}")
        self.state = CallState.CONNECTING
        self.last_activity = now

    def connected(self, transport: str, now: float) -> None:
        """The call is up on ``transport`` and authenticated; the backoff resets."""
        if self.state is not CallState.CONNECTING:
            raise LocalProtocolError(f"connected while {self.state.value}")
        self.state = CallState.UP
        self.transport = transport
        self.failures = 0
        self.backoff_until = None
        self.calls += 1
        self.call_started = now
        self.last_activity = now

    def connect_failed(self, now: float, retry_after: float | None = None) -> float:
        """Every transport failed; return the seconds until the next attempt.

        ``retry_after`` (a hint from central) lengthens the backoff, never shortens it.
        """
        if self.state is not CallState.CONNECTING:
            raise LocalProtocolError(f"connect_failed while {self.state.value}")
        self.state = CallState.IDLE
        self.failures += 1
        cfg = self.config
        wait = min(cfg.backoff_initial * cfg.backoff_factor ** (self.failures - 1), cfg.backoff_max)
        if retry_after is not None:
            wait = max(wait, retry_after)
        self.backoff_until = now + wait
        return wait

    def call_ended(self, now: float) -> None:
        """The call is over (hung up, dropped or closed)."""
        self.state = CallState.IDLE
        self.transport = None
        self.call_started = None
        self.last_activity = now

    def sync_started(self, now: float) -> None:
        """The periodic sync has begun."""
        self.syncing = True
        self.last_activity = now

    def sync_finished(self, now: float, *, ok: bool) -> None:
        """The periodic sync ended; schedule the next one."""
        self.syncing = False
        if ok:
            self.last_sync = now
            self.next_sync_at = now + self.config.sync_interval
        else:
            retry = self.backoff_until if self.backoff_until is not None else 0.0
            self.next_sync_at = max(retry, now + self.config.backoff_initial)

    # -- questions ------------------------------------------------------------------

    def may_connect(self, now: float) -> bool:
        """Return True when a new connect may start now (IDLE and not backing off)."""
        if self.state is not CallState.IDLE:
            return False
        return self.backoff_until is None or now >= self.backoff_until

    def retry_after(self, now: float) -> float:
        """Return the retry hint for a request refused now (seconds, at least MIN_RETRY_AFTER)."""
        wait = self.config.backoff_initial
        if self.backoff_until is not None and self.backoff_until > now:
            wait = self.backoff_until - now
        return max(MIN_RETRY_AFTER, wait)

    def sync_due(self, now: float) -> bool:
        """Return True when the periodic sync should start now.

        A sync is due on schedule, or early (within ``sync_batch_window``)
        when a call is up anyway; never while one runs, nor during a backoff.
        """
        if self.syncing:
            return False
        if self.state is CallState.UP:
            return now >= self.next_sync_at - self.config.sync_batch_window
        return now >= self.next_sync_at and self.may_connect(now)

    def should_hang_up(self, now: float) -> bool:
        """Return True when the call is up, idle, and has been for ``idle_hangup``."""
        return (
            self.state is CallState.UP
            and self.pending == 0
            and not self.syncing
            and now >= self.last_activity + self.config.idle_hangup
        )

    def next_deadline(self) -> float | None:
        """Return when a question above may next change its answer, or None."""
        candidates: list[float] = []
        # While connecting nothing can change until the connect ends (and the
        # adapter reports it): a sync already due must not make the caller spin.
        if not self.syncing and self.state is not CallState.CONNECTING:
            if self.state is CallState.UP:
                candidates.append(self.next_sync_at - self.config.sync_batch_window)
            else:
                due = self.next_sync_at
                if self.backoff_until is not None:
                    due = max(due, self.backoff_until)
                candidates.append(due)
        if self.state is CallState.UP and self.pending == 0 and not self.syncing:
            candidates.append(self.last_activity + self.config.idle_hangup)
        return min(candidates) if candidates else None
