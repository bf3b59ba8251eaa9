"""PowerConfig validation and backend loading."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from firmware.common.errors import ConfigError
from firmware.common.power.config import (
    MAX_DEBOUNCE_S,
    REPORT_DEADLINE_S,
    InputPin,
    OutputPin,
    PowerConfig,
    Pull,
)
from firmware.common.power.gpio import NoGpio, load_backend
from firmware.common.power.sim import SimGpio

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def test_defaults_are_valid_and_documented_values() -> None:
    config = PowerConfig()
    assert config.backend == "none"
    assert config.peer_power == InputPin(17, Pull.UP, active_high=False)
    assert config.own_power_good == InputPin(27, Pull.UP, active_high=True)
    assert config.leds == {"status": OutputPin(22), "fault": OutputPin(23)}
    assert config.debounce_s == 0.020


def test_debounce_cap_keeps_the_report_deadline() -> None:
    # 20 ms of the 100 ms budget is kept for timer and callback latency.
    assert MAX_DEBOUNCE_S <= REPORT_DEADLINE_S - 0.020 + 1e-12
    PowerConfig(debounce_s=MAX_DEBOUNCE_S)
    with pytest.raises(ConfigError, match="within 100 ms"):
        PowerConfig(debounce_s=MAX_DEBOUNCE_S + 0.001)
    with pytest.raises(ConfigError):
        PowerConfig(debounce_s=0.0)
    with pytest.raises(ConfigError):
        PowerConfig(debounce_s=True)


def test_from_mapping_full() -> None:
    config = PowerConfig.from_mapping(
        {
            "backend": "sim",
            "debounce_ms": 30,
            "peer_power": {"bcm": 5, "pull": "down", "active": "high"},
            "own_power_good": {"bcm": 6, "active": "low"},
            "leds": {"status": {"bcm": 12}, "fault": {"bcm": 13, "active": "low"}},
        }
    )
    assert config == PowerConfig(
        backend="sim",
        debounce_s=0.030,
        peer_power=InputPin(5, Pull.DOWN, True),
        own_power_good=InputPin(6, Pull.UP, False),
        leds={"status": OutputPin(12), "fault": OutputPin(13, active_high=False)},
    )


def test_from_mapping_empty_own_power_table_disables_it() -> None:
    assert PowerConfig.from_mapping({"own_power_good": {}}).own_power_good is None
    assert PowerConfig.from_mapping({}) == PowerConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": "gpiod"}, "one of rpigpio, sim, none"),
        ({"bogus": 1}, "unknown keys"),
        ({"debounce_ms": "20"}, "must be a number"),
        ({"debounce_ms": 150}, "within 100 ms"),
        ({"peer_power": {"bcm": 14}}, "link UART"),
        ({"peer_power": {"bcm": 15}}, "link UART"),
        ({"peer_power": {"bcm": 0}}, "EEPROM"),
        ({"peer_power": {"bcm": 28}}, "0-27"),
        ({"peer_power": {"bcm": True}}, "0-27"),
        ({"peer_power": {"bcm": "17"}}, "0-27"),
        ({"peer_power": {}}, "bcm is required"),
        ({"peer_power": {"bcm": 17, "pull": "sideways"}}, "pull must be"),
        ({"peer_power": {"bcm": 17, "active": 1}}, "active must be"),
        ({"peer_power": {"bcm": 17, "colour": "red"}}, "unknown keys"),
        ({"peer_power": 17}, "must be a table"),
        ({"peer_power": {"bcm": 22}}, "already gpio.peer_power"),
        ({"leds": {"blue": {"bcm": 24}}}, "unknown LEDs"),
        ({"leds": {"status": {"bcm": 17}}}, "already"),
    ],
)
def test_bad_config_is_a_config_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PowerConfig.from_mapping(data)


def test_levels_map_through_active_setting() -> None:
    low_active = InputPin(17, Pull.UP, active_high=False)
    assert low_active.asserted(False)
    assert not low_active.asserted(True)
    assert low_active.level_for(True) is False
    assert OutputPin(22, active_high=False).level_for(True) is False


def test_load_backend_by_name() -> None:
    assert isinstance(load_backend("none"), NoGpio)
    assert isinstance(load_backend("sim"), SimGpio)
    with pytest.raises(ConfigError, match="unknown GPIO backend"):
        load_backend("wiringpi")


@pytest.mark.skipif(
    importlib.util.find_spec("RPi") is not None, reason="RPi.GPIO is installed here"
)
def test_missing_rpi_gpio_fails_loudly_naming_the_package() -> None:
    with pytest.raises(ConfigError) as info:
        load_backend("rpigpio")
    text = str(info.value)
    assert "RPi.GPIO" in text
    assert "rpi-lgpio" in text
    assert isinstance(info.value.__cause__, ImportError)


def test_none_backend_senses_nothing_and_ignores_writes() -> None:
    gpio = NoGpio()
    line = gpio.input(17, Pull.UP)
    assert line.read() is None
    line.on_edge(lambda level, stamp: pytest.fail("no wire, no edge"))
    out = gpio.output(22, initial=True)
    out.write(False)
    assert (line.bcm, out.bcm) == (17, 22)
    gpio.close()
