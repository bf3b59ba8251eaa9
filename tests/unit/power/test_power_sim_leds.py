"""The sim GPIO backend's pins, and the LED pattern core over time."""

from __future__ import annotations

import pytest

from firmware.common.errors import ConfigError, LocalProtocolError
from firmware.common.power.config import Pull
from firmware.common.power.leds import STATE_PATTERNS, LedPatternCore, LinkState
from firmware.common.power.sim import SimGpio

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


class FakeClock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_sim_input_reports_edges_with_timestamps() -> None:
    clock = FakeClock()
    gpio = SimGpio(clock)
    line = gpio.input(17, Pull.UP)
    assert line.read() is True  # undriven: the pull-up
    seen: list[tuple[bool, float]] = []
    line.on_edge(lambda level, stamp: seen.append((level, stamp)))
    pin = gpio.pin(17)
    clock.now = 51.0
    pin.drive(False)
    clock.now = 51.5
    pin.drive(False)  # no change, no edge
    clock.now = 52.0
    pin.release()  # back to the pull-up
    assert seen == [(False, 51.0), (True, 52.0)]
    assert pin.history[-3:] == [(50.0, True), (51.0, False), (52.0, True)]
    line.on_edge(None)
    pin.drive(False)
    assert len(seen) == 2


def test_sim_pin_driven_before_configuration_keeps_its_level() -> None:
    gpio = SimGpio(FakeClock())
    gpio.pin(5).drive(False)
    assert gpio.input(5, Pull.UP).read() is False
    gpio.pin(6).drive(True)
    assert gpio.input(6, Pull.DOWN).read() is True
    assert gpio.input(7, Pull.DOWN).read() is False


def test_sim_output_records_history_and_refuses_a_second_driver() -> None:
    clock = FakeClock()
    gpio = SimGpio(clock)
    out = gpio.output(22, initial=True)
    clock.now = 51.0
    out.write(False)
    assert gpio.pin(22).history[-2:] == [(50.0, True), (51.0, False)]
    with pytest.raises(LocalProtocolError):
        gpio.pin(22).drive(True)
    with pytest.raises(ConfigError, match="already configured"):
        gpio.input(22, Pull.UP)
    with pytest.raises(ConfigError):
        gpio.output(22)
    gpio.close()
    gpio.output(22)  # free again after close


def lit_over(core: LedPatternCore, start: float, end: float, step: float) -> list[bool]:
    out = []
    t = start
    while t < end - 1e-9:
        out.append(core.leds(t)["status"])
        t += step
    return out


def test_slow_blink_idle() -> None:
    core = LedPatternCore(now=10.0)
    assert core.state is LinkState.IDLE
    # 1 Hz, on for the first half: sampled every 250 ms.
    assert lit_over(core, 10.0, 12.0, 0.25) == [True, True, False, False] * 2
    assert core.leds(10.3)["fault"] is False


def test_fast_blink_dialling_and_state_change_restarts_phase() -> None:
    core = LedPatternCore(now=0.0)
    core.set_state(LinkState.DIALLING, 0.73)
    assert lit_over(core, 0.73, 1.13, 0.05) == [True, True, False, False] * 2
    core.set_state(LinkState.DIALLING, 0.80)  # same state: the pattern carries on
    assert core.leds(0.83)["status"] is False  # phase still counted from 0.73
    assert core.leds(0.94)["status"] is True


def test_double_flash_syncing() -> None:
    core = LedPatternCore(now=0.0, state=LinkState.SYNCING)
    # 1.5 s period: on 0-100 ms and 250-350 ms, sampled every 50 ms.
    expected = [True, True, False, False, False, True, True] + [False] * 23
    assert lit_over(core, 0.0, 1.5, 0.05) == expected
    assert lit_over(core, 1.5, 3.0, 0.05) == expected


def test_link_up_steady_and_error_on_fault_led() -> None:
    core = LedPatternCore(now=0.0, state=LinkState.LINK_UP)
    assert all(core.leds(t / 7)["status"] for t in range(100))
    assert core.next_deadline(3.0) is None
    core.set_state(LinkState.ERROR, 5.0)
    assert core.leds(5.0) == {"status": False, "fault": True}
    assert core.leds(5.15) == {"status": False, "fault": False}


@pytest.mark.parametrize("state", list(LinkState))
def test_next_deadline_is_exactly_where_the_leds_change(state: LinkState) -> None:
    core = LedPatternCore(now=3.3, state=state)
    now = 3.3
    for _ in range(40):
        deadline = core.next_deadline(now)
        patterns = STATE_PATTERNS[state].values()
        if all(p.period is None for p in patterns):
            assert deadline is None
            return
        assert deadline is not None
        assert deadline > now
        before = core.leds(deadline - 1e-4)
        # Nothing changes between now and just before the deadline ...
        assert core.leds(now + (deadline - now) / 2) == core.leds(now) == before
        # ... and something changes at it.
        assert core.leds(deadline) != before
        now = deadline
