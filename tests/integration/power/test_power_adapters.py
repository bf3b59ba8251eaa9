"""The asyncio adapters on the sim backend, and the link-simulator follower.

The follower is tested twice: against a small Unix socket server in this
file that speaks the watch contract (a test of the client, including the
failures a real simulator rarely produces), and against the real link
simulator from host_tools.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from firmware.common.power.config import PowerConfig
from firmware.common.power.gpio import NoGpio
from firmware.common.power.leds import LinkState
from firmware.common.power.monitor import (
    OwnPowerFailing,
    PeerPowerLost,
    PeerPowerRestored,
    PowerEvent,
    Signal,
)
from firmware.common.power.sim import SimGpio
from firmware.common.power.simlink import (
    PowerState,
    SimLinkError,
    SimLinkFollower,
    SimLinkProtocolError,
    parse_event,
)
from firmware.common.power.watcher import LedDriver, PowerWatcher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

CONFIG = PowerConfig(backend="sim")  # peer 17 (active low), own 27 (active high)
PEER = CONFIG.peer_power.bcm
OWN = 27


#: Bound on any wait for a condition (a bound against hangs, not a speed claim).
WAIT_S = 5.0


async def eventually(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds, at most WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        # Polling: the conditions are on sim pins and cores, which have no Event.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class Watching:
    """A PowerWatcher running in a task, its events in a list."""

    def __init__(self, watcher: PowerWatcher) -> None:
        self.watcher = watcher
        self.events: list[PowerEvent] = []
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watching:
        self.task = asyncio.create_task(self.watcher.run(self.events.append))
        await eventually(lambda: self.watcher.monitor is not None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def powered_gpio() -> SimGpio:
    gpio = SimGpio()
    gpio.pin(PEER).drive(CONFIG.peer_power.level_for(True))
    return gpio


async def test_watcher_reports_a_real_loss_and_ignores_a_glitch() -> None:
    gpio = powered_gpio()
    async with Watching(PowerWatcher(gpio, CONFIG)) as w:
        monitor = w.watcher.monitor
        assert monitor is not None
        assert monitor.peer_powered
        assert monitor.own_power_good  # pull-up, active high
        # A glitch: the two edges are stamped microseconds apart.
        gpio.pin(PEER).drive(True)
        gpio.pin(PEER).drive(False)
        await eventually(lambda: monitor.statistics()["peer_power_glitches"] == 1)
        gpio.pin(PEER).drive(True)  # peer off (active low)
        await eventually(lambda: len(w.events) == 1)
        lost = w.events[0]
        assert isinstance(lost, PeerPowerLost)
        assert lost.at - lost.since >= CONFIG.debounce_s
        gpio.pin(PEER).drive(False)
        await eventually(lambda: len(w.events) == 2)
        assert isinstance(w.events[1], PeerPowerRestored)
        gpio.pin(OWN).drive(False)
        await eventually(lambda: len(w.events) == 3)
        assert isinstance(w.events[2], OwnPowerFailing)
    # Stopped watching: no more callbacks.
    gpio.pin(PEER).drive(True)
    assert len(w.events) == 3


async def test_edges_from_another_thread_reach_the_loop() -> None:
    # RPi.GPIO calls back on its own thread; the sim calls back on the driver's.
    gpio = powered_gpio()
    async with Watching(PowerWatcher(gpio, CONFIG)) as w:
        driver = threading.Thread(target=gpio.pin(PEER).drive, args=(True,), name="edge-driver")
        driver.start()
        driver.join(timeout=5)
        await eventually(lambda: len(w.events) == 1)
        assert isinstance(w.events[0], PeerPowerLost)


async def test_failing_event_callback_ends_run_with_its_error() -> None:
    gpio = powered_gpio()

    def explode(event: PowerEvent) -> None:
        raise RuntimeError(f"consumer broke on {event}")

    task = asyncio.create_task(PowerWatcher(gpio, CONFIG).run(explode))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gpio.pin(PEER).drive(True)
    with pytest.raises(RuntimeError, match="consumer broke"):
        await asyncio.wait_for(task, 5)


async def test_none_backend_assumes_power_and_says_so() -> None:
    async with Watching(PowerWatcher(NoGpio(), CONFIG)) as w:
        assert w.watcher.monitor is not None
        assert w.watcher.monitor.peer_powered
        assert w.watcher.sensing == {Signal.PEER_POWER: False, Signal.OWN_POWER: False}
        assert w.watcher.monitor.next_deadline() is None


async def test_led_driver_applies_patterns_and_switches_off() -> None:
    gpio = SimGpio()
    leds = LedDriver(gpio, CONFIG, state=LinkState.LINK_UP)
    task = asyncio.create_task(leds.run())
    status, fault = gpio.pin(22), gpio.pin(23)
    await eventually(lambda: status.level)
    assert not fault.level
    leds.set_state(LinkState.ERROR)
    # Fast blink on the fault LED: wait for it to have toggled a few times.
    await eventually(lambda: not status.level and len(fault.history) >= 5)
    lit = [level for _, level in fault.history[-4:]]
    assert lit in ([True, False, True, False], [False, True, False, True])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not status.level
    assert not fault.level


@pytest.mark.parametrize("turns", range(6))
async def test_led_driver_stops_when_cancelled_as_its_state_changes(turns: int) -> None:
    """A cancel that lands while a state change wakes the driver still stops it.

    (``asyncio.wait_for`` on 3.11 swallowed such a cancel: the daemon then
    hung on its way out, deaf to SIGTERM.)
    """
    gpio = SimGpio()
    leds = LedDriver(gpio, CONFIG, state=LinkState.ERROR)  # blinking: a deadline pending
    task = asyncio.create_task(leds.run())
    await eventually(lambda: len(gpio.pin(23).history) >= 2)
    leds.set_state(LinkState.LINK_UP)
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT_S):
            await task
    assert task.cancelled()


# -- the follower against an in-test server speaking the watch contract ----------


class WatchServer:
    """A Unix socket that answers {"cmd":"watch"} with the lines it is given."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await reader.readline())
        while (line := await self.lines.get()) is not None:
            writer.write(line)
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> WatchServer:
        self.server = await asyncio.start_unix_server(self._session, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def send(self, obj: object) -> None:
        self.lines.put_nowait(json.dumps(obj).encode() + b"\n")


async def expect_end(task: Awaitable[None], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        await asyncio.wait_for(task, 5)


async def test_follower_drives_peer_and_own_pins(tmp_path: Path) -> None:
    gpio = SimGpio()
    async with WatchServer(tmp_path / "c.sock") as server:
        follower = SimLinkFollower(server.path, gpio, "b", CONFIG)
        task = asyncio.create_task(follower.run())
        server.send({"event": "power", "side": "a", "on": True})
        server.send({"event": "power", "side": "b", "on": True})
        await asyncio.wait_for(follower.synced.wait(), 5)
        assert server.requests == [b'{"cmd":"watch"}\n']
        assert gpio.pin(PEER).level is False  # powered peer: opto pulls low
        assert gpio.pin(OWN).level is True
        server.send({"event": "cut"})  # another kind of event: ignored
        server.send({"event": "power", "side": "a", "on": False})
        await eventually(lambda: gpio.pin(PEER).level is True)
        server.send({"event": "power", "side": "b", "on": False})
        await eventually(lambda: gpio.pin(OWN).level is False)
        assert follower.power == {"a": False, "b": False}
        server.lines.put_nowait(None)  # the simulator goes away
        await expect_end(task, SimLinkError, "closed")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"not json\n", "not a JSON line"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"ok": false, "error": "watch: unexpected fields"}\n', "refused"),
        (b'{"event": "power", "side": "c", "on": true}\n', "bad power event"),
        (b'{"event": "power", "side": "a", "on": 1}\n', "bad power event"),
        (b'{"hello": 1}\n', "not an event"),
        (b"x" * 5000 + b"\n", "longer than"),
    ],
)
async def test_follower_rejects_contract_breaches(tmp_path: Path, line: bytes, match: str) -> None:
    gpio = SimGpio()
    async with WatchServer(tmp_path / "c.sock") as server:
        task = asyncio.create_task(SimLinkFollower(server.path, gpio, "a", CONFIG).run())
        server.lines.put_nowait(line)
        await expect_end(task, SimLinkProtocolError, match)
        server.lines.put_nowait(None)


async def test_follower_without_simulator_is_a_port_error(tmp_path: Path) -> None:
    follower = SimLinkFollower(tmp_path / "absent.sock", SimGpio(), "a", CONFIG)
    await expect_end(follower.run(), SimLinkError, "cannot reach")


def test_parse_event_ignores_blank_lines_and_rejects_bad_side_name() -> None:
    assert parse_event(b"\n") is None
    assert parse_event(b'{"event":"power","side":"a","on":false}') == PowerState("a", False)
    with pytest.raises(ValueError, match="side"):
        SimLinkFollower("x", SimGpio(), "c", CONFIG)


# -- against the real link simulator ---------------------------------------------


async def test_follower_and_watcher_against_the_link_simulator(tmp_path: Path) -> None:
    from host_tools.sim.link import LinkSimulator

    control = tmp_path / "ctl.sock"
    async with LinkSimulator(control_path=control) as sim:
        gpio = SimGpio()  # the inner module's pins
        follower = SimLinkFollower(control, gpio, "b", CONFIG)
        following = asyncio.create_task(follower.run())
        try:
            await asyncio.wait_for(follower.synced.wait(), 5)
            async with Watching(PowerWatcher(gpio, CONFIG)) as w:
                monitor = w.watcher.monitor
                assert monitor is not None
                assert monitor.peer_powered
                sim.power("a", False)  # the outer module loses power
                await eventually(lambda: len(w.events) == 1)
                assert isinstance(w.events[0], PeerPowerLost)
                sim.power("a", True)
                await eventually(lambda: len(w.events) == 2)
                assert isinstance(w.events[1], PeerPowerRestored)
                sim.power("b", False)  # our own supply
                await eventually(lambda: len(w.events) == 3)
                assert isinstance(w.events[2], OwnPowerFailing)
        finally:
            following.cancel()
            with pytest.raises(asyncio.CancelledError):
                await following
