"""The board loop (pump) with fake hardware: forwarding, queues, power lines, watchdog, LED."""

import json
from typing import Any

import pytest

from firmware.common.link.framing import FrameDecoder, FrameType
from firmware.common.link.kinds import Kind
from firmware.isolator import pump, suite, vectors
from firmware.isolator.fakeboard import FakePin, FakeUart, FakeWdt
from firmware.isolator.filtercore import A_TO_B, B_TO_A, Filter, FilterConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def make(write_limit: int | None = None) -> tuple[pump.Pump, dict[str, Any]]:
    core = Filter(FilterConfig(suite.shipped_config()))
    uarts = {"outer": FakeUart(write_limit), "inner": FakeUart(write_limit)}
    names = [src for src, _ in pump.POWER_MIRRORS] + [dst for _, dst in pump.POWER_MIRRORS]
    pins = {name: FakePin() for name in [*names, *pump.OWN_POWER]}
    hw: dict[str, Any] = {"uarts": uarts, "pins": pins, "wdt": FakeWdt(), "led": FakePin()}
    return pump.Pump(core, uarts, pins, hw["wdt"], hw["led"]), hw


def test_allowed_frames_cross_and_nothing_else() -> None:
    box, hw = make()
    reply = suite.data_frame(Kind.SERVICE, A_TO_B, b"sealed")
    request = suite.data_frame(Kind.FETCH_SERVICE, B_TO_A, b"svc")
    command = suite.data_frame(Kind.FETCH_SERVICE, A_TO_B, b"outer must not ask")
    hw["uarts"]["outer"].inject(b"\x00noise\x00" + reply + command)
    hw["uarts"]["inner"].inject(request + b"\xff" * 50)
    box.step(0)
    assert hw["uarts"]["inner"].take() == reply
    assert hw["uarts"]["outer"].take() == request
    stats = box.status()["filter"]
    assert stats[A_TO_B]["frames_out"] == 1
    assert stats[A_TO_B]["dropped_kind"] == 1


def test_power_lines_cross_over_and_own_power_is_reported() -> None:
    box, hw = make()
    pins = hw["pins"]
    assert pins["own_power_to_outer"].level == pins["own_power_to_inner"].level == 1
    for outer, inner in [(1, 0), (1, 1), (0, 1), (0, 0)]:
        pins["outer_power_in"].level = outer
        pins["inner_power_in"].level = inner
        box.step(0)
        assert pins["inner_power_out"].level == outer  # the inner module sees the outer's power
        assert pins["outer_power_out"].level == inner
        assert box.status()["power"] == {"outer": outer, "inner": inner}


def test_active_low_power_sense_fails_safe() -> None:
    core = Filter(FilterConfig(suite.shipped_config()))
    uarts = {"outer": FakeUart(), "inner": FakeUart()}
    pins = {name: FakePin(1) for src_dst in pump.POWER_MIRRORS for name in src_dst}
    box = pump.Pump(core, uarts, pins, power_in_active_low=True)
    box.step(0)  # inputs high: an open wire or a dark coupler
    assert pins["inner_power_out"].level == pins["outer_power_out"].level == 0
    pins["outer_power_in"].level = 0  # the outer module's coupler conducts
    box.step(1)
    assert pins["inner_power_out"].level == 1
    assert pins["outer_power_out"].level == 0
    assert box.status()["power"] == {"outer": 1, "inner": 0}


def test_watchdog_is_fed_every_step() -> None:
    box, hw = make()
    for t in range(25):
        box.step(t)
    assert hw["wdt"].feeds == 25


def test_slow_uart_gets_whole_frames_in_order() -> None:
    box, hw = make(write_limit=97)
    frames = [
        suite.data_frame(Kind.SERVICE, A_TO_B, bytes([i]) * 1500, msg_len=1 << 20, flags=0)
        for i in range(4)
    ]
    hw["uarts"]["outer"].inject(b"".join(frames))
    got = bytearray()
    for t in range(200):
        box.step(t)
        got += hw["uarts"]["inner"].take()
    assert bytes(got) == b"".join(frames)
    assert box.status()["filter"][A_TO_B]["tx_pending"] == 0


def test_stuck_receiver_overflows_by_whole_frames() -> None:
    box, hw = make(write_limit=0)
    frame = suite.data_frame(Kind.SERVICE, A_TO_B, bytes(3000), msg_len=1 << 20, flags=0)
    for t in range(8):
        hw["uarts"]["outer"].inject(frame)
        box.step(t)
    status = box.status()["filter"][A_TO_B]
    assert status["tx_overflow"] == 8 - pump.PENDING_MAX // len(frame)
    assert status["tx_pending"] <= pump.PENDING_MAX
    hw["uarts"]["inner"].write_limit = None
    box.step(9)
    decoder = FrameDecoder()
    assert len(decoder.feed(hw["uarts"]["inner"].take())) == pump.PENDING_MAX // len(frame)
    assert set(decoder.statistics()) == {"frames", "bytes_in"}


def test_led_beats_slowly_and_fast_after_drops() -> None:
    box, hw = make()
    for t in range(0, 2001, 10):
        box.step(t)
    assert len(hw["led"].history) == 5  # toggles at 0, 500, 1000, 1500, 2000
    hw["uarts"]["outer"].inject(b"\x00\x05garbage\x00")
    for t in range(2010, 3001, 10):
        box.step(t)
    assert len(hw["led"].history) - 5 >= 9  # every 100 ms while alarmed
    for t in range(3010, 9001, 10):
        box.step(t)
    # the alarm holds 3 s after the last drop, then the heartbeat returns
    toggles_late = len(hw["led"].history)
    for t in range(9010, 11001, 10):
        box.step(t)
    assert len(hw["led"].history) - toggles_late == 4


def test_snapshot_is_published_and_json_ready() -> None:
    box, hw = make()
    assert box.snapshot is None
    hw["uarts"]["inner"].inject(suite.control_frame(FrameType.PING, B_TO_A))
    box.step(1000)
    first = box.snapshot
    assert first is not None
    assert json.loads(json.dumps(first))["filter"][B_TO_A]["frames_out"] == 1
    box.step(1100)
    assert box.snapshot is first  # republished only every SNAPSHOT_MS
    box.step(1000 + pump.SNAPSHOT_MS)
    assert box.snapshot is not first
    assert box.snapshot["uptime_ms"] == pump.SNAPSHOT_MS


def test_pump_vector_harness() -> None:
    ping = suite.control_frame(FrameType.PING, A_TO_B).hex()
    line = json.dumps(
        {"config": suite.shipped_config(), "steps": [[0, ping, "", 1, 0], [600, "", "", 0, 1]]}
    )
    result = json.loads(vectors.run_pump(line))
    assert result["steps"][0]["to_inner"] == ping
    assert result["steps"][0]["pins"]["inner_power_out"] == 1
    assert result["steps"][1]["pins"]["outer_power_out"] == 1
    assert result["feeds"] == 2
