"""Run filter vectors: the one harness both interpreters execute.

A vector is one JSON line::

    {"config": {...isolator.json...}, "steps": [["a->b", now_ms, "hex bytes"], ...]}

:func:`run_vector` feeds the steps, in order, to a fresh
:class:`filtercore.Filter` with the pure codec and returns one JSON line::

    {"out": ["hex forwarded by step 0", ...], "stats": {"a->b": {...}, "b->a": {...}}}

:func:`run_pump` does the same for the board loop (pump.py) with the fake
hardware of fakeboard.py.

The tests run the same lines through this module under CPython and under
MicroPython (the WebAssembly port, see wasmpy.py) and require equal results,
so this file, like filtercore.py, sticks to the subset both interpreters
share.  A malformed vector raises ValueError/KeyError: it is a test bug, not
wire input.
"""

import json

try:
    from firmware.isolator import fakeboard, filtercore, pump
except ImportError:  # on MicroPython the modules sit side by side
    import fakeboard  # type: ignore[no-redef]
    import filtercore  # type: ignore[no-redef]
    import pump  # type: ignore[no-redef]


def run_vector(line: str) -> str:
    """Run the vector in ``line``; return the result as one JSON line."""
    vector = json.loads(line)
    core = filtercore.Filter(filtercore.FilterConfig(vector["config"]))
    out = []
    for direction, now, data in vector["steps"]:
        out.append(core.feed(direction, bytes.fromhex(data), now).hex())
    return json.dumps({"out": out, "stats": core.statistics()})


def run_pump(line: str) -> str:
    """Run a board vector through the pump with fake hardware; return the result line.

    The vector: ``{"config": ..., "write_limit": n or null,
    "power_in_active_low": bool, "steps": [[now_ms, "hex from outer",
    "hex from inner", outer_power_pin, inner_power_pin], ...]}``.
    The result: per step the hex written to the inner and outer UARTs and the
    levels of every output pin and the LED, then the watchdog feeds and the
    pump's final status.
    """
    vector = json.loads(line)
    core = filtercore.Filter(filtercore.FilterConfig(vector["config"]))
    uarts = {
        "outer": fakeboard.FakeUart(vector.get("write_limit")),
        "inner": fakeboard.FakeUart(vector.get("write_limit")),
    }
    pins = {}
    for name in ("outer_power_in", "inner_power_in", "inner_power_out", "outer_power_out"):
        pins[name] = fakeboard.FakePin()
    for name in pump.OWN_POWER:
        pins[name] = fakeboard.FakePin()
    wdt = fakeboard.FakeWdt()
    led = fakeboard.FakePin()
    active_low = bool(vector.get("power_in_active_low", False))
    box = pump.Pump(core, uarts, pins, wdt, led, power_in_active_low=active_low)
    steps = []
    for now, from_outer, from_inner, outer_power, inner_power in vector["steps"]:
        uarts["outer"].inject(bytes.fromhex(from_outer))
        uarts["inner"].inject(bytes.fromhex(from_inner))
        pins["outer_power_in"].level = outer_power
        pins["inner_power_in"].level = inner_power
        box.step(now)
        levels = {}
        for name in sorted(pins):
            levels[name] = pins[name].level
        levels["led"] = led.level
        steps.append(
            {
                "to_inner": uarts["inner"].take().hex(),
                "to_outer": uarts["outer"].take().hex(),
                "pins": levels,
            }
        )
    return json.dumps({"steps": steps, "feeds": wdt.feeds, "status": box.status()})
