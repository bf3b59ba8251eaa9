"""The isolator as a middlebox for the link simulator (CPython).

``optogate sim link --isolator`` puts an :class:`IsolatorMiddlebox` on the
simulated optical line: every chunk of bytes travelling outer -> inner
(``"a->b"``) or inner -> outer (``"b->a"``) goes through :meth:`process`, and
only what it returns reaches the other side.  It is the board's filter core,
unchanged, with the C-accelerated codec when available (see fastcodec.py), so
the simulator exercises the very rules the board enforces.

What it does not model: the board's UART FIFOs and its CPU time (a real
RP2040 running pure-Python CRC is much slower than this), the power-sense
pass-through, the watchdog and the LED.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware.isolator import hostconfig
from firmware.isolator.fastcodec import best_codec
from firmware.isolator.filtercore import DIRECTIONS, Filter, PureCodec

#: The milliseconds the core counts in: token buckets refill per millisecond.
MS_PER_S = 1000


class IsolatorMiddlebox:
    """Filter the two directions of a simulated optical line.

    ``config``: a configuration dict (the JSON of isolator.json) or a path to
    one; None uses the shipped file.  ``maintenance`` overrides the file's
    setting; it defaults to True because the simulator's usual job is the
    technician's link test, which uses the link-maintenance kinds.  ``clock``
    returns seconds (monotonic) and drives the rate limits; pass the
    simulator's clock when it runs faster or slower than real time.
    ``fast=False`` forces the pure-Python codec the board runs.

    Raises IsolatorConfigError when the configuration is invalid.
    """

    def __init__(
        self,
        config: dict[str, Any] | Path | None = None,
        *,
        maintenance: bool | None = True,
        clock: Callable[[], float] = time.monotonic,
        fast: bool = True,
    ) -> None:
        raw = config if isinstance(config, dict) else hostconfig.load_raw(config)
        raw = dict(raw)
        if maintenance is not None:
            raw["maintenance"] = maintenance
        self._clock = clock
        self._core = Filter(hostconfig.parse(raw), best_codec() if fast else PureCodec)

    def process(self, direction: str, data: bytes) -> bytes:
        """Filter ``data`` travelling in ``direction``; return the bytes to forward.

        Raises ValueError when ``direction`` is not ``"a->b"`` or ``"b->a"``.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        return self._core.feed(direction, data, int(self._clock() * MS_PER_S))

    def statistics(self) -> dict[str, dict[str, int]]:
        """Return the counters by direction: bytes/frames in and out, drops by reason."""
        stats: dict[str, dict[str, int]] = self._core.statistics()
        return stats
