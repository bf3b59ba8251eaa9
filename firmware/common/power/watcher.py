"""Asyncio adapters: GPIO edges into the power monitor, LED patterns onto pins.

:class:`PowerWatcher` configures the power inputs on a backend, feeds their
edges (which may arrive on a backend thread) into
:class:`~.monitor.PowerMonitor` on the event loop, arms one timer for the
monitor's next deadline and hands each event to a callback.

:class:`LedDriver` runs :class:`~.leds.LedPatternCore` against the status
LED outputs: it writes the levels, sleeps until the next change or a new
state, and turns the LEDs off when it stops.

Both take a ``clock`` (default ``time.monotonic``, the clock the backends
stamp edges with) so tests can check decisions against edge timestamps.
An exception in the event callback ends :meth:`PowerWatcher.run` with that
exception - nothing dies silently inside a loop callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

from .config import OutputPin, PowerConfig
from .gpio import GpioBackend, OutputLine
from .leds import LEDS, LedPatternCore, LinkState
from .monitor import PowerEvent, PowerMonitor, Signal


class PowerWatcher:
    """Watch the power inputs named in ``config`` on ``backend``.

    An input that cannot be sensed (the ``none`` backend) counts as
    asserted: powered / good, as :mod:`.gpio` documents.  ``own_power_good``
    None in config likewise means "assumed good".
    """

    def __init__(
        self,
        backend: GpioBackend,
        config: PowerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._config = config
        self._clock = clock
        self._monitor: PowerMonitor | None = None
        self._sensing: dict[Signal, bool] = {}

    @property
    def monitor(self) -> PowerMonitor | None:
        """The core, once :meth:`run` has started (for status and statistics)."""
        return self._monitor

    @property
    def sensing(self) -> Mapping[Signal, bool]:
        """Which signals are really sensed (False: assumed asserted)."""
        return dict(self._sensing)

    async def run(
        self,
        on_event: Callable[[PowerEvent], None],
        on_ready: Callable[[PowerMonitor], None] | None = None,
    ) -> None:
        """Report power events to ``on_event`` until cancelled.

        ``on_ready`` is called once with the monitor when the inputs are
        configured and their initial levels read (the initial state produces
        no event).  Raises whatever a callback raises (the watch stops then),
        and ConfigError if a pin cannot be configured.
        """
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        timer: asyncio.TimerHandle | None = None
        pins = {Signal.PEER_POWER: self._config.peer_power}
        if self._config.own_power_good is not None:
            pins[Signal.OWN_POWER] = self._config.own_power_good
        lines = {signal: self._backend.input(pin.bcm, pin.pull) for signal, pin in pins.items()}

        def drain_and_rearm() -> None:
            nonlocal timer
            assert self._monitor is not None
            try:
                while (event := self._monitor.next_event()) is not None:
                    on_event(event)
            except Exception as e:
                if not failed.done():
                    failed.set_exception(e)
                return
            if timer is not None:
                timer.cancel()
                timer = None
            deadline = self._monitor.next_deadline()
            if deadline is not None:
                timer = loop.call_later(max(0.0, deadline - self._clock()), on_deadline)

        def on_deadline() -> None:
            assert self._monitor is not None
            self._monitor.handle_deadline(self._clock())
            drain_and_rearm()

        def on_edge(signal: Signal, level: bool, stamp: float) -> None:
            assert self._monitor is not None
            self._monitor.input_changed(signal, pins[signal].asserted(level), stamp)
            drain_and_rearm()

        def edge_callback(signal: Signal) -> Callable[[bool, float], None]:
            def callback(level: bool, stamp: float) -> None:
                # May run on a backend thread: hop to the loop.
                with contextlib.suppress(RuntimeError):  # loop closed: we are gone
                    loop.call_soon_threadsafe(on_edge, signal, level, stamp)

            return callback

        levels: dict[Signal, bool] = {}
        for signal, line in lines.items():
            line.on_edge(edge_callback(signal))
            raw = line.read()
            self._sensing[signal] = raw is not None
            levels[signal] = True if raw is None else pins[signal].asserted(raw)
        self._sensing.setdefault(Signal.OWN_POWER, False)
        self._monitor = PowerMonitor(
            peer_powered=levels[Signal.PEER_POWER],
            own_power_good=levels.get(Signal.OWN_POWER, True),
            debounce=self._config.debounce_s,
            now=self._clock(),
        )
        try:
            if on_ready is not None:
                on_ready(self._monitor)
            await failed
        finally:
            for line in lines.values():
                line.on_edge(None)
            if timer is not None:
                timer.cancel()


class LedDriver:
    """Show a :class:`~.leds.LinkState` on the LED outputs in ``config``.

    ``set_state`` may be called from the event loop at any time; ``run``
    applies it at once and keeps the pattern going until cancelled.
    """

    def __init__(
        self,
        backend: GpioBackend,
        config: PowerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        state: LinkState = LinkState.IDLE,
    ) -> None:
        self._backend = backend
        self._pins: dict[str, OutputPin] = {n: p for n, p in config.leds.items() if n in LEDS}
        self._clock = clock
        self._core = LedPatternCore(clock(), state)
        self._changed: asyncio.Event | None = None

    @property
    def state(self) -> LinkState:
        """The state being shown."""
        return self._core.state

    def set_state(self, state: LinkState) -> None:
        """Show ``state`` from now on."""
        self._core.set_state(state, self._clock())
        if self._changed is not None:
            self._changed.set()

    async def run(self) -> None:
        """Drive the LEDs until cancelled; they are switched off on the way out."""
        self._changed = asyncio.Event()
        outputs: dict[str, tuple[OutputLine, OutputPin]] = {
            name: (self._backend.output(pin.bcm, pin.level_for(False)), pin)
            for name, pin in self._pins.items()
        }
        try:
            while True:
                now = self._clock()
                lit = self._core.leds(now)
                for name, (line, pin) in outputs.items():
                    line.write(pin.level_for(lit[name]))
                deadline = self._core.next_deadline(now)
                self._changed.clear()
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()
        finally:
            for line, pin in outputs.values():
                line.write(pin.level_for(False))
            self._changed = None
