"""One conformance suite for every GPIO backend: an output jumpered to an input.

Runs against the sim backend (with :meth:`SimGpio.jumper`) everywhere, and
against RPi.GPIO on a Raspberry Pi with two header pins joined by a wire:

    OPTOGATE_GPIO_LOOPBACK=5,6 pytest tests/integration/power/test_power_gpio_conformance.py

(BCM 5 is the output, BCM 6 the input; pick two pins the box does not use.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest

from firmware.common.errors import ConfigError
from firmware.common.power.config import Pull
from firmware.common.power.gpio import GpioBackend
from firmware.common.power.sim import SimGpio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

#: Bound on waiting for an edge callback (a bound against hangs, not a speed claim).
EDGE_WAIT_S = 5.0

LOOPBACK = os.environ.get("OPTOGATE_GPIO_LOOPBACK", "")


def _sim() -> tuple[GpioBackend, int, int]:
    gpio = SimGpio()
    gpio.jumper(5, 6)
    return gpio, 5, 6


def _rpigpio() -> tuple[GpioBackend, int, int]:
    from firmware.common.power.rpigpio import RpiGpio

    out_bcm, in_bcm = (int(n) for n in LOOPBACK.split(","))
    return RpiGpio(), out_bcm, in_bcm


BACKENDS: list[object] = [
    pytest.param(_sim, id="sim"),
    pytest.param(
        _rpigpio,
        id="rpigpio",
        marks=pytest.mark.skipif(
            not LOOPBACK, reason="set OPTOGATE_GPIO_LOOPBACK=OUT,IN on a Pi with a jumper"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def loopback(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[GpioBackend, int, int]]:
    factory: Callable[[], tuple[GpioBackend, int, int]] = request.param
    gpio, out_bcm, in_bcm = factory()
    try:
        yield gpio, out_bcm, in_bcm
    finally:
        gpio.close()


class Edges:
    """Collects edge callbacks (possibly from a backend thread)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, float]] = []
        self._cond = threading.Condition()

    def __call__(self, level: bool, stamp: float) -> None:
        with self._cond:
            self.seen.append((level, stamp))
            self._cond.notify_all()

    def wait_for(self, count: int) -> list[tuple[bool, float]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.seen) >= count, EDGE_WAIT_S)
            return list(self.seen)


def test_input_reads_what_the_output_drives(loopback: tuple[GpioBackend, int, int]) -> None:
    gpio, out_bcm, in_bcm = loopback
    out = gpio.output(out_bcm, initial=False)
    line = gpio.input(in_bcm, Pull.OFF)
    assert line.bcm == in_bcm
    assert out.bcm == out_bcm
    assert line.read() is False
    out.write(True)
    assert line.read() is True
    out.write(False)
    assert line.read() is False


def test_edges_are_reported_in_order_with_timestamps(
    loopback: tuple[GpioBackend, int, int],
) -> None:
    gpio, out_bcm, in_bcm = loopback
    out = gpio.output(out_bcm, initial=False)
    line = gpio.input(in_bcm, Pull.DOWN)
    edges = Edges()
    line.on_edge(edges)
    out.write(True)
    edges.wait_for(1)
    out.write(False)
    seen = edges.wait_for(2)
    assert [level for level, _ in seen[:2]] == [True, False]
    assert seen[0][1] <= seen[1][1]
    line.on_edge(None)
    out.write(True)
    out.write(False)
    assert len(edges.seen) == 2  # no callbacks once stopped


def test_a_pin_is_configured_once_until_close(loopback: tuple[GpioBackend, int, int]) -> None:
    gpio, out_bcm, in_bcm = loopback
    gpio.output(out_bcm)
    gpio.input(in_bcm, Pull.UP)
    with pytest.raises(ConfigError, match="already configured"):
        gpio.input(out_bcm, Pull.UP)
    with pytest.raises(ConfigError, match="already configured"):
        gpio.output(in_bcm)
    gpio.close()
    gpio.output(in_bcm)  # free again
