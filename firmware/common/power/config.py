"""GPIO configuration: which backend, which pins, which levels mean what.

Pin numbers are BCM (Broadcom GPIO) numbers, not header positions.  Every
input says which pull resistor the SoC enables and which electrical level
means *asserted* ("the peer is powered", "our supply is good"); every LED
says which level lights it.  docs/hardware.md draws the default wiring.

The TOML form, as the daemons' config files carry it::

    [gpio]
    backend = "rpigpio"           # "rpigpio", "sim" or "none"
    debounce_ms = 20

    [gpio.peer_power]              # the other module's supply, via an optocoupler
    bcm = 17
    pull = "up"
    active = "low"                 # the opto's transistor pulls low while the peer is on

    [gpio.own_power_good]          # `own_power_good = {}` runs without the input
    bcm = 27
    pull = "up"
    active = "high"

    [gpio.leds.status]
    bcm = 22
    active = "high"

    [gpio.leds.fault]
    bcm = 23
    active = "high"

Validation is strict: an unknown key, a pin used twice, a pin the link UART or
the HAT EEPROM owns, or a debounce the 100 ms report guarantee cannot keep is
a :class:`~firmware.common.errors.ConfigError`, never a silent default.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from firmware.common.errors import ConfigError

#: Backends ``load_backend`` knows.  "none" is an explicit choice, never a fallback.
BACKENDS = ("rpigpio", "sim", "none")

#: The 40-pin header brings out BCM 0-27.
BCM_RANGE = range(28)

#: Pins that belong to something else: 0/1 are the HAT ID EEPROM bus (the
#: firmware probes it at boot), 14/15 are the optical link's UART (TXD/RXD).
RESERVED_PINS: Mapping[int, str] = {
    0: "the HAT ID EEPROM (ID_SD)",
    1: "the HAT ID EEPROM (ID_SC)",
    14: "the link UART (TXD)",
    15: "the link UART (RXD)",
}

#: A power loss must be reported within this time of the line changing: the
#: link session treats the power line as a faster dead-peer detector than its
#: keepalives, which only helps if it is well under a keepalive interval.
REPORT_DEADLINE_S = 0.100

#: Default debounce: optocoupler outputs and supply-supervisor lines ring for
#: a few ms when a supply is plugged or a motor starts nearby; 20 ms rejects
#: that with a wide margin and still leaves 80 ms of the report deadline.
DEFAULT_DEBOUNCE_S = 0.020

#: Below 1 ms a debounce rejects nothing the 50-100 us opto edges produce.
MIN_DEBOUNCE_S = 0.001

#: The report deadline minus 20 ms for timer lateness and callback latency
#: (RPi.GPIO's event thread, a busy asyncio loop on a Pi 3).
MAX_DEBOUNCE_S = REPORT_DEADLINE_S - 0.020


class Pull(enum.Enum):
    """The SoC's internal pull resistor on an input."""

    UP = "up"
    DOWN = "down"
    OFF = "off"


def _level(text: object, where: str) -> bool:
    if text == "high":
        return True
    if text == "low":
        return False
    raise ConfigError(f"{where}: active must be 'high' or 'low', not {text!r}")


def _check_bcm(bcm: object, where: str) -> int:
    if isinstance(bcm, bool) or not isinstance(bcm, int) or bcm not in BCM_RANGE:
        raise ConfigError(f"{where}: bcm must be a BCM GPIO number 0-27, not {bcm!r}")
    if bcm in RESERVED_PINS:
        raise ConfigError(f"{where}: BCM {bcm} is reserved for {RESERVED_PINS[bcm]}")
    return bcm


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


@dataclass(frozen=True)
class InputPin:
    """An input: BCM pin, pull resistor, and the level that means asserted."""

    bcm: int
    pull: Pull = Pull.UP
    active_high: bool = True

    def __post_init__(self) -> None:
        _check_bcm(self.bcm, "input")
        if not isinstance(self.pull, Pull):
            raise ConfigError(f"input BCM {self.bcm}: pull must be a Pull, not {self.pull!r}")
        if not isinstance(self.active_high, bool):
            raise ConfigError(f"input BCM {self.bcm}: active_high must be a bool")

    def asserted(self, level: bool) -> bool:
        """Whether the electrical ``level`` means asserted."""
        return level == self.active_high

    def level_for(self, asserted: bool) -> bool:
        """The electrical level that means ``asserted`` (for simulators)."""
        return asserted == self.active_high

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> InputPin:
        """Parse ``{bcm, pull, active}``; raises ConfigError."""
        _check_keys(data, {"bcm", "pull", "active"}, where)
        if "bcm" not in data:
            raise ConfigError(f"{where}: bcm is required")
        try:
            pull = Pull(data.get("pull", "up"))
        except ValueError:
            raise ConfigError(f"{where}: pull must be up, down or off") from None
        return cls(_check_bcm(data["bcm"], where), pull, _level(data.get("active", "high"), where))


@dataclass(frozen=True)
class OutputPin:
    """An output (an LED): BCM pin and the level that lights it."""

    bcm: int
    active_high: bool = True

    def __post_init__(self) -> None:
        _check_bcm(self.bcm, "output")
        if not isinstance(self.active_high, bool):
            raise ConfigError(f"output BCM {self.bcm}: active_high must be a bool")

    def level_for(self, on: bool) -> bool:
        """The electrical level that turns the output ``on``."""
        return on == self.active_high

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> OutputPin:
        """Parse ``{bcm, active}``; raises ConfigError."""
        _check_keys(data, {"bcm", "active"}, where)
        if "bcm" not in data:
            raise ConfigError(f"{where}: bcm is required")
        return cls(_check_bcm(data["bcm"], where), _level(data.get("active", "high"), where))


@dataclass(frozen=True)
class PowerConfig:
    """The GPIO side of a module.  Defaults match docs/hardware.md.

    ``own_power_good`` is None when the module has no supply supervisor or
    UPS signal wired; ``leds`` maps LED names ("status", "fault") to pins.
    """

    backend: str = "none"
    peer_power: InputPin = InputPin(17, Pull.UP, active_high=False)
    own_power_good: InputPin | None = InputPin(27, Pull.UP, active_high=True)
    leds: Mapping[str, OutputPin] = field(
        default_factory=lambda: {"status": OutputPin(22), "fault": OutputPin(23)}
    )
    debounce_s: float = DEFAULT_DEBOUNCE_S

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"gpio.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}"
            )
        if isinstance(self.debounce_s, bool) or not isinstance(self.debounce_s, int | float):
            raise ConfigError("gpio.debounce must be a number")
        if not MIN_DEBOUNCE_S <= self.debounce_s <= MAX_DEBOUNCE_S:
            raise ConfigError(
                f"gpio.debounce must be {MIN_DEBOUNCE_S * 1000:g}-{MAX_DEBOUNCE_S * 1000:g} ms"
                f" so a power loss is reported within {REPORT_DEADLINE_S * 1000:g} ms,"
                f" not {self.debounce_s * 1000:g} ms"
            )
        unknown_leds = set(self.leds) - {"status", "fault"}
        if unknown_leds:
            raise ConfigError(f"gpio.leds: unknown LEDs {sorted(unknown_leds)}")
        used: dict[int, str] = {}
        named: list[tuple[str, InputPin | OutputPin | None]] = [
            ("peer_power", self.peer_power),
            ("own_power_good", self.own_power_good),
            *((f"leds.{name}", pin) for name, pin in self.leds.items()),
        ]
        for name, pin in named:
            if pin is None:
                continue
            if pin.bcm in used:
                raise ConfigError(f"gpio.{name}: BCM {pin.bcm} is already gpio.{used[pin.bcm]}")
            used[pin.bcm] = name

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PowerConfig:
        """Build from the ``[gpio]`` table of a TOML config; raises ConfigError.

        Missing keys take the defaults above, except that a present
        ``peer_power``/``own_power_good``/``leds`` table replaces the default
        entirely (so a config never half-inherits a pin).
        """
        _check_keys(
            data, {"backend", "debounce_ms", "peer_power", "own_power_good", "leds"}, "gpio"
        )
        defaults = cls()
        kwargs: dict[str, Any] = {}
        if "backend" in data:
            kwargs["backend"] = data["backend"]
        if "debounce_ms" in data:
            ms = data["debounce_ms"]
            if isinstance(ms, bool) or not isinstance(ms, int | float):
                raise ConfigError(f"gpio.debounce_ms must be a number, not {ms!r}")
            kwargs["debounce_s"] = ms / 1000
        kwargs["peer_power"] = (
            InputPin.from_mapping(_table(data["peer_power"], "gpio.peer_power"), "gpio.peer_power")
            if "peer_power" in data
            else defaults.peer_power
        )
        if "own_power_good" in data:
            table = _table(data["own_power_good"], "gpio.own_power_good")
            kwargs["own_power_good"] = (
                InputPin.from_mapping(table, "gpio.own_power_good") if table else None
            )
        if "leds" in data:
            leds = _table(data["leds"], "gpio.leds")
            kwargs["leds"] = {
                str(name): OutputPin.from_mapping(
                    _table(t, f"gpio.leds.{name}"), f"gpio.leds.{name}"
                )
                for name, t in leds.items()
            }
        return cls(**kwargs)


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table")
    return value
