"""The isolator on the board: wire the filter core and the pump to the RP2040's hardware.

Theory of operation
-------------------
``start()`` (called by main.py at boot) reads isolator.json, builds the
filter (an invalid configuration raises here, before any UART is opened, so a
bad file fails closed: nothing is forwarded and ``status()`` says why), opens
the two UARTs and the power/LED pins, arms the hardware watchdog and runs the
pump loop on the second core (``_thread``).  Core 0 is left to the USB
console, so ``mpremote ... resume exec "import isolator_app;
isolator_app.status()"`` reads the counters without stopping the filter.  If
the loop raises or stalls, the watchdog stops being fed and resets the board.

The watchdog cannot be disarmed once started on the RP2040, which is why the
host's flash command uses ``mpremote resume`` (no soft reset: the loop keeps
feeding the watchdog while files are copied) and ends with a hard reset.

This file runs only on the board (it imports ``machine``); everything it
drives is tested on the host through filtercore.py and pump.py.
"""

import json
import time

import _thread
import machine

import filtercore
import pump

CONFIG_FILE = "isolator.json"
#: Receive/transmit buffers per UART: 8 KiB is two full frames of slack
#: while the loop judges the previous one (0.7 s of traffic at 115200 baud,
#: 80 ms at 1 Mbaud); four of them use 32 KiB of the RP2040's 264 KiB.
DEFAULT_RXBUF = 8192
DEFAULT_TXBUF = 8192

_state = {"running": False, "error": None, "pump": None}


def _uart(spec, baudrate, rxbuf, txbuf):
    return machine.UART(
        spec["id"],
        baudrate=baudrate,
        tx=machine.Pin(spec["tx"]),
        rx=machine.Pin(spec["rx"]),
        rxbuf=rxbuf,
        txbuf=txbuf,
        timeout=0,
    )


def _build(raw):
    core = filtercore.Filter(filtercore.FilterConfig(raw))
    board = raw["board"]
    baudrate = board["baudrate"]
    rxbuf = board.get("rxbuf", DEFAULT_RXBUF)
    txbuf = board.get("txbuf", DEFAULT_TXBUF)
    uarts = {
        "outer": _uart(board["outer_uart"], baudrate, rxbuf, txbuf),
        "inner": _uart(board["inner_uart"], baudrate, rxbuf, txbuf),
    }
    pins = {}
    active_low = board.get("power_in_active_low", True)
    # active low: the coupler's phototransistor pulls the pin down while the
    # module is powered, the pull-up makes an absent module (or a dead
    # coupler) read as unpowered
    pull = machine.Pin.PULL_UP if active_low else machine.Pin.PULL_DOWN
    for source, sink in pump.POWER_MIRRORS:
        pins[source] = machine.Pin(board[source], machine.Pin.IN, pull)
        pins[sink] = machine.Pin(board[sink], machine.Pin.OUT, value=0)
    for name in pump.OWN_POWER:
        pins[name] = machine.Pin(board[name], machine.Pin.OUT, value=0)
    led = machine.Pin(board.get("led", "LED"), machine.Pin.OUT, value=0)
    wdt = machine.WDT(timeout=board.get("watchdog_ms", 5000))
    return pump.Pump(core, uarts, pins, wdt, led, power_in_active_low=active_low)


def _loop(box):
    now = 0
    last = time.ticks_ms()
    try:
        while True:
            ticks = time.ticks_ms()
            # ticks_ms wraps; ticks_diff does not, so ``now`` is monotonic
            now += time.ticks_diff(ticks, last)
            last = ticks
            box.step(now)
    except Exception as e:  # noqa: BLE001 - reported on the console, then the watchdog resets
        _state["error"] = "loop: " + repr(e)
        _state["running"] = False


def start():
    """Load the configuration, arm the watchdog and start the filter on core 1."""
    try:
        with open(CONFIG_FILE) as f:
            raw = json.load(f)
        box = _build(raw)
    except Exception as e:  # noqa: BLE001 - fail closed, say why on the console
        _state["error"] = "start: " + repr(e)
        return False
    _state["pump"] = box
    _state["running"] = True
    _thread.start_new_thread(_loop, (box,))
    return True


def status():
    """Print the counters as one JSON line (read by ``optogate isolator status``)."""
    box = _state["pump"]
    snapshot = box.snapshot if box is not None else None
    print(
        json.dumps(
            {
                "running": _state["running"],
                "error": _state["error"],
                "status": snapshot,
            }
        )
    )
