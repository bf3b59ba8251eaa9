"""Failed-authentication limiter (sans-I/O): too many wrong keys from one address -> 429.

Each address keeps the times of its recent failures inside a sliding
``window``; the ``max_failures``-th failure blocks the address for ``block``
seconds, during which every request from it is answered 429 with the
remaining time as Retry-After.  A success does not erase failures: a
guesser who also holds one valid key gains nothing.

Memory is bounded: at most ``max_addresses`` addresses are tracked, the
least recently seen is forgotten first (an attacker who cycles through more
addresses than that could evade the limit; 256-bit keys make guessing
hopeless anyway - the limiter keeps logs and CPU quiet, it is not the
defence).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

#: Addresses tracked at once: a LAN has far fewer hosts.
MAX_ADDRESSES: Final = 4096


@dataclass
class _Address:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class FailureLimiter:
    """Counts failed authentications per address; ``now`` is the caller's monotonic clock."""

    def __init__(
        self,
        max_failures: int,
        window: float,
        block: float,
        *,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        if max_failures < 1 or window <= 0 or block <= 0 or max_addresses < 1:
            raise ValueError("limiter bounds must be positive")
        self._max = max_failures
        self._window = window
        self._block = block
        self._max_addresses = max_addresses
        self._by_addr: OrderedDict[str, _Address] = OrderedDict()
        self.blocks = 0

    def retry_after(self, addr: str, now: float) -> float | None:
        """Return seconds until ``addr`` may try again, or None if it is not blocked."""
        entry = self._by_addr.get(addr)
        if entry is None or now >= entry.blocked_until:
            return None
        return entry.blocked_until - now

    def failed(self, addr: str, now: float) -> float | None:
        """Record a failure; return the block's length if it blocked ``addr`` now, else None."""
        entry = self._by_addr.get(addr)
        if entry is None:
            entry = self._by_addr[addr] = _Address()
            while len(self._by_addr) > self._max_addresses:
                self._by_addr.popitem(last=False)
        else:
            self._by_addr.move_to_end(addr)
        while entry.failures and entry.failures[0] <= now - self._window:
            entry.failures.popleft()
        entry.failures.append(now)
        if len(entry.failures) >= self._max:
            entry.failures.clear()
            entry.blocked_until = now + self._block
            self.blocks += 1
            return self._block
        return None

    def tracked(self) -> int:
        """Return how many addresses are tracked."""
        return len(self._by_addr)
