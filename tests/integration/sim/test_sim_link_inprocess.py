"""LinkSimulator in-process: the methods behind the control socket, watch, middlebox."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from firmware.common.errors import PortError
from host_tools.sim.line import ImpairmentError, PowerChanged, UnknownSide
from host_tools.sim.link import ControlError, LinkSimulator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]


@contextlib.contextmanager
def opened(*paths: str) -> Iterator[list[int]]:
    fds = [os.open(p, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK) for p in paths]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


READ_TIMEOUT = 5.0


async def read_exactly(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from a non-blocking fd, waiting at most READ_TIMEOUT."""
    buf = bytearray()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(READ_TIMEOUT):
            while len(buf) < n:
                try:
                    buf += os.read(fd, n - len(buf))
                except BlockingIOError:
                    await asyncio.sleep(0.005)
    return bytes(buf)


async def both_open(sim: LinkSimulator) -> None:
    """Wait (at most 5 s) until the simulator has seen both sides opened."""
    for _ in range(1000):
        if sim.stats()["listening"] == {"a": True, "b": True}:
            return
        await asyncio.sleep(0.005)
    pytest.fail("the simulator did not see both sides open")


class Rot13Box:
    """A middlebox that rewrites letters and counts what it saw, per direction."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def process(self, direction: str, data: bytes) -> bytes:
        self.seen[direction] = self.seen.get(direction, 0) + len(data)
        return data.translate(ROT13)

    def statistics(self) -> dict[str, int]:
        return dict(self.seen)


_L = b"abcdefghijklmnopqrstuvwxyz"
ROT13 = bytes.maketrans(_L + _L.upper(), _L[13:] + _L[:13] + _L.upper()[13:] + _L.upper()[:13])


class ExplodingBox:
    def process(self, direction: str, data: bytes) -> bytes:
        raise RuntimeError("middlebox failed")


@pytest.fixture
async def sim() -> AsyncIterator[LinkSimulator]:
    async with LinkSimulator(baud=230400, seed=2) as s:
        yield s


async def test_bytes_cross_and_drain_empties_the_line(sim: LinkSimulator) -> None:
    with opened(sim.a_path, sim.b_path) as (a, b):
        await both_open(sim)
        os.write(a, b"ping" * 100)
        os.write(b, b"pong" * 50)
        assert await read_exactly(b, 400) == b"ping" * 100
        assert await read_exactly(a, 200) == b"pong" * 50
        async with asyncio.timeout(5):
            await sim.drain()
    stats = sim.stats()
    assert stats["a->b"]["bytes_delivered"] == 400  # type: ignore[index]
    assert stats["b->a"]["bytes_delivered"] == 200  # type: ignore[index]


async def test_watch_starts_with_both_sides_then_reports_changes(sim: LinkSimulator) -> None:
    events = sim.watch()
    assert await anext(events) == PowerChanged("a", True)
    assert await anext(events) == PowerChanged("b", True)
    sim.power("b", False)
    sim.power("b", False)  # no change, no event
    sim.power("a", False)
    assert await anext(events) == PowerChanged("b", False)
    assert await anext(events) == PowerChanged("a", False)
    assert not sim.powered("a")
    await events.aclose()


async def test_watchers_end_when_the_simulator_closes() -> None:
    async with LinkSimulator() as s:
        events = s.watch()
        await anext(events)
        await anext(events)
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.01)
    with pytest.raises(StopAsyncIteration):
        await pending


async def test_a_middlebox_sees_each_direction_and_its_output_is_delivered() -> None:
    box = Rot13Box()
    async with LinkSimulator(baud=230400, middlebox=box) as s:
        with opened(s.a_path, s.b_path) as (a, b):
            await both_open(s)
            os.write(a, b"Hello")
            assert await read_exactly(b, 5) == b"Uryyb"
            os.write(b, b"abc")
            assert await read_exactly(a, 3) == b"nop"
        assert s.stats()["middlebox"] == {"a->b": 5, "b->a": 3}


async def test_injected_bytes_go_through_the_middlebox_as_if_that_side_sent_them() -> None:
    box = Rot13Box()
    async with LinkSimulator(baud=230400, middlebox=box) as s:
        with opened(s.a_path, s.b_path) as (a, b):
            await both_open(s)
            assert s.handle_command({"cmd": "inject", "side": "a", "hex": b"Hi".hex()}) == {
                "ok": True
            }
            assert await read_exactly(b, 2) == b"Uv"
            s.handle_command({"cmd": "inject", "side": "b", "hex": "00ff"})
            assert await read_exactly(a, 2) == b"\x00\xff"
        assert s.stats()["middlebox"] == {"a->b": 2, "b->a": 2}


async def test_a_failing_relay_is_raised_not_swallowed() -> None:
    async def run() -> None:
        async with LinkSimulator(middlebox=ExplodingBox()) as s:
            with opened(s.a_path, s.b_path) as (a, _):
                await both_open(s)
                os.write(a, b"x")
                async with asyncio.timeout(5):
                    await s.wait_failed()

    with pytest.raises(RuntimeError, match="middlebox failed"):
        await run()


async def test_commands_mirror_the_methods(sim: LinkSimulator) -> None:
    assert sim.handle_command({"cmd": "cut"}) == {"ok": True}
    assert sim.stats()["cut"] is True
    assert sim.handle_command({"cmd": "restore"}) == {"ok": True}
    reply = sim.handle_command({"cmd": "set", "drop": 0.5, "latency": 0.01})
    assert reply == {"ok": True, "ber": 0.0, "drop": 0.5, "latency": 0.01}
    assert sim.handle_command({"cmd": "power", "side": "a", "on": False}) == {"ok": True}
    stats = sim.handle_command({"cmd": "stats"})["stats"]
    assert stats["power"] == {"a": False, "b": True}  # type: ignore[index]


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ({"cmd": "set", "ber": 1.5}, ImpairmentError),
        ({"cmd": "set", "latency": -1}, ImpairmentError),
        ({"cmd": "set", "bits": 1}, ControlError),
        ({"cmd": "power", "side": "c", "on": True}, UnknownSide),
        ({"cmd": "power", "side": "a", "on": 0}, ControlError),
        ({"cmd": "power", "on": False}, ControlError),
        ({"cmd": "reboot"}, ControlError),
        ({"cmd": "inject", "side": "a", "hex": "zz"}, ControlError),
        ({"cmd": "inject", "side": "a"}, ControlError),
        ({"cmd": "inject", "side": "c", "hex": "00"}, UnknownSide),
        ({"cmd": "inject", "side": "a", "hex": "00" * 65537}, ControlError),
        ({"command": "cut"}, ControlError),
        (["cut"], ControlError),
    ],
)
async def test_bad_commands_raise_typed_errors_and_change_nothing(
    sim: LinkSimulator, command: object, error: type[Exception]
) -> None:
    before = sim.stats()
    with pytest.raises(error):
        sim.handle_command(command)
    after = sim.stats()
    for key in ("impairments", "power", "cut"):
        assert after[key] == before[key]


async def test_bad_settings_are_refused_before_anything_is_opened() -> None:
    with pytest.raises(ImpairmentError):
        LinkSimulator(ber=-1)
    with pytest.raises(ImpairmentError):
        LinkSimulator(baud=1)


async def test_an_unusable_control_path_is_a_port_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-socket"
    blocker.write_text("keep me")
    with pytest.raises(PortError):
        async with LinkSimulator(control_path=blocker):
            pass
    assert blocker.read_text() == "keep me"


async def test_a_receiver_that_never_reads_overruns_and_the_counters_say_so() -> None:
    total = 300_000  # far more than a pty holds (tens of kilobytes)
    async with LinkSimulator(baud=4_000_000) as s:
        with opened(s.a_path, s.b_path) as (a, _b):
            await both_open(s)
            sent = 0
            async with asyncio.timeout(10):
                while sent < total:
                    try:
                        sent += os.write(a, bytes(min(4096, total - sent)))
                    except BlockingIOError:
                        await asyncio.sleep(0.002)
                await s.drain()
            c = s.stats()["a->b"]
    assert isinstance(c, dict)
    assert c["overrun"] > 0
    assert c["bytes_delivered"] < total
    assert c["bytes_in"] == total == c["bytes_delivered"] + c["overrun"]
