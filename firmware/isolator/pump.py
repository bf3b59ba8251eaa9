"""The isolator's main loop body: UARTs through the filter, power lines across, watchdog, LED.

Theory of operation
-------------------
:meth:`Pump.step` is called in a tight loop on the board (on the RP2040's
second core, see board/isolator_app.py) with the current time in
milliseconds.  Each step

1. reads whatever the outer module's UART received and feeds it to the
   filter's a->b direction, then queues what passes for the inner module's
   UART; and the same for b->a;
2. writes the queues; a UART that takes only part of a queue keeps the rest
   for the next step, and a queue that would grow past ``PENDING_MAX`` drops
   the newly filtered frames (counted as ``tx_overflow``) rather than block:
   the filter only ever emits whole frames, so the peer's ARQ recovers;
3. copies each module's power-sense input to the other module's
   power-sense output and holds the isolator's own power lines high, so each
   module sees the other's power through the isolator, and sees the isolator
   itself go dark if it loses power or resets;
4. feeds the hardware watchdog: if the loop stalls, the board resets;
5. blinks the LED: a slow heartbeat, fast while frames are being dropped;
6. every ``SNAPSHOT_MS`` publishes a fresh counters dict in
   :attr:`Pump.snapshot`.  Replacing one reference is atomic, so the USB
   console (the other core) reads a consistent snapshot without a lock.

Hardware is reached only through ``machine``-like objects: a UART has
``read() -> bytes | None`` and ``write(buf) -> int | None``, a pin has
``value([v])``, the watchdog has ``feed()``.  firmware/isolator/fakeboard.py
provides in-process fakes with the same methods.  Like filtercore.py, this
module runs unchanged on MicroPython and CPython.
"""

# MicroPython has neither typing nor contextlib, and never evaluates annotations
try:  # noqa: SIM105
    from typing import Any
except ImportError:
    pass

try:
    from firmware.isolator import filtercore
except ImportError:  # on the board the modules sit side by side
    import filtercore  # type: ignore[no-redef]

#: Per-direction transmit queue bound.  Two full frames (2 x 4,139 bytes) plus
#: slack: more than that means the receiving side is not keeping up, and
#: holding more would only add latency the peer's retransmit timers see as loss.
PENDING_MAX = 10240
#: Heartbeat half-period: the LED toggles twice a second when all is well ...
HEARTBEAT_MS = 500
#: ... and five times faster while frames are being dropped, for this long
#: after the last drop, so a technician sees trouble at a glance.
ALARM_MS = 100
ALARM_HOLD_MS = 3000
#: How often the counters are republished for the console; the console is
#: read by a human or a CLI, so twice a second is fresh enough.
SNAPSHOT_MS = 500

#: Power-line names in the configuration: (input, the output it drives).
POWER_MIRRORS = (("outer_power_in", "inner_power_out"), ("inner_power_in", "outer_power_out"))
OWN_POWER = ("own_power_to_outer", "own_power_to_inner")


class Pump:
    """Drive one filter between two UARTs.

    ``uarts``: {"outer": uart, "inner": uart}; ``pins``: the power pins by
    their configuration names (see POWER_MIRRORS and OWN_POWER); ``wdt`` and
    ``led`` may be None.  ``power_in_active_low``: a power-sense input reads 0
    while its module is powered (a phototransistor pulling a pulled-up pin
    low, as docs/hardware.md wires it), so a dead coupler or an open wire reads
    as "unpowered".  Outputs are active high: 1 lights the next coupler's LED.
    """

    def __init__(
        self,
        core: Any,
        uarts: dict[str, Any],
        pins: dict[str, Any],
        wdt: Any = None,
        led: Any = None,
        power_in_active_low: bool = False,
    ) -> None:
        self.core = core
        self.power_in_active_low = power_in_active_low
        self.routes = (
            (filtercore.A_TO_B, uarts["outer"], uarts["inner"]),
            (filtercore.B_TO_A, uarts["inner"], uarts["outer"]),
        )
        self.pins = pins
        self.wdt = wdt
        self.led = led
        self.pending = {filtercore.A_TO_B: b"", filtercore.B_TO_A: b""}
        self.tx_overflow = {filtercore.A_TO_B: 0, filtercore.B_TO_A: 0}
        self.steps = 0
        self.started: int | None = None
        self.now = 0
        self.power = {"outer": 0, "inner": 0}
        self._led_on = 0
        self._led_at: int | None = None
        self._last_drops = 0
        self._alarm_until: int | None = None
        self._snapshot_at: int | None = None
        self.snapshot: dict[str, Any] | None = None
        for name in OWN_POWER:
            pin = pins.get(name)
            if pin is not None:
                pin.value(1)

    def step(self, now: int) -> None:
        """Run one iteration of the loop at ``now`` milliseconds."""
        if self.started is None:
            self.started = now
        self.now = now
        self.steps += 1
        for direction, rx, tx in self.routes:
            data = rx.read()
            if data:
                out = self.core.feed(direction, data, now)
                if out:
                    if len(self.pending[direction]) + len(out) > PENDING_MAX:
                        self.tx_overflow[direction] += 1
                    else:
                        self.pending[direction] += out
            queued = self.pending[direction]
            if queued:
                written = tx.write(queued)
                if written is None:  # a UART that timed out wrote nothing
                    written = 0
                self.pending[direction] = queued[written:]
        self._mirror_power()
        if self.wdt is not None:
            self.wdt.feed()
        self._blink(now)
        if self._snapshot_at is None or now - self._snapshot_at >= SNAPSHOT_MS:
            self._snapshot_at = now
            self.snapshot = self.status()

    def _mirror_power(self) -> None:
        pins = self.pins
        for source, sink in POWER_MIRRORS:
            inp = pins.get(source)
            out = pins.get(sink)
            if inp is None:
                continue
            level = 1 if inp.value() else 0
            if self.power_in_active_low:
                level = 1 - level
            self.power["outer" if source == "outer_power_in" else "inner"] = level
            if out is not None:
                out.value(level)

    def _dropped(self) -> int:
        total = 0
        for counters in self.core.statistics().values():
            for key, value in counters.items():
                if key.startswith("dropped_"):
                    total += value
        for value in self.tx_overflow.values():
            total += value
        return total

    def _blink(self, now: int) -> None:
        if self.led is None:
            return
        if self._led_at is not None and now - self._led_at < ALARM_MS:
            return  # nothing to decide more often than the fastest blink
        dropped = self._dropped()
        if dropped != self._last_drops:
            self._last_drops = dropped
            self._alarm_until = now + ALARM_HOLD_MS
        alarm = self._alarm_until is not None and now < self._alarm_until
        period = ALARM_MS if alarm else HEARTBEAT_MS
        if self._led_at is None or now - self._led_at >= period:
            self._led_at = now
            self._led_on = 1 - self._led_on
            self.led.value(self._led_on)

    def status(self) -> dict[str, Any]:
        """Return the counters and line states as a JSON-ready dict."""
        filters = self.core.statistics()
        for direction, counters in filters.items():
            counters["tx_overflow"] = self.tx_overflow[direction]
            counters["tx_pending"] = len(self.pending[direction])
        return {
            "uptime_ms": 0 if self.started is None else self.now - self.started,
            "steps": self.steps,
            "power": dict(self.power),
            "maintenance": self.core.config.maintenance,
            "filter": filters,
        }
