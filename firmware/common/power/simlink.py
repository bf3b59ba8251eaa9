"""Drive the ``sim`` GPIO backend's power pins from the link simulator.

The link simulator (``optogate sim link``) models both modules' supplies.
Its Unix control socket takes one JSON object per line; after
``{"cmd": "watch"}`` it sends no reply but streams
``{"event": "power", "side": "a"|"b", "on": true|false}`` lines: first the
current state of both sides, then one line per change, until either end
closes.  Side ``a`` is the outer module, side ``b`` the inner module.  A
refused command is answered ``{"ok": false, "error": "..."}``.

:class:`SimLinkFollower` is a module's view of that: for module ``side`` it
drives the peer-power input pin from the *other* side's state and the
own-power-good pin (if configured) from its own, at the electrical levels the
configuration says mean "powered" - so the module's
:class:`~.watcher.PowerWatcher` sees exactly the edges the real optocoupler
would produce, and the debounce and events run unchanged.

:func:`parse_event` is the pure part (one line in, a power state or nothing
out); the follower is the thin asyncio adapter around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass

from firmware.common.errors import PortError, RemoteProtocolError

from .config import PowerConfig
from .sim import SimGpio

#: The sides the simulator knows.
SIDES = ("a", "b")

#: Longest line accepted from the simulator: its lines are ~40 bytes; a
#: bound keeps a confused peer from growing our buffer without limit.
MAX_LINE = 4096


class SimLinkError(PortError):
    """The simulator's control socket could not be reached, or went away."""


class SimLinkProtocolError(RemoteProtocolError, ValueError):
    """The simulator sent something the watch contract does not allow."""


@dataclass(frozen=True)
class PowerState:
    """Side ``side`` is powered (``on``) according to the simulator."""

    side: str
    on: bool


def parse_event(line: bytes) -> PowerState | None:
    """Decode one line of a watch stream.

    Returns the power state, or None for a blank line or an event of another
    kind (the stream may grow new kinds).  Raises SimLinkProtocolError for
    anything else: not JSON, not an object, a malformed power event, or a
    refusal (``{"ok": false, "error": ...}``).
    """
    if not line.strip():
        return None
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise SimLinkProtocolError(f"not a JSON line: {line[:80]!r}") from e
    if not isinstance(message, dict):
        raise SimLinkProtocolError(f"not a JSON object: {line[:80]!r}")
    if message.get("ok") is False:
        raise SimLinkProtocolError(f"simulator refused the watch: {message.get('error')}")
    if "event" not in message:
        raise SimLinkProtocolError(f"not an event: {line[:80]!r}")
    if message["event"] != "power":
        return None
    side, on = message.get("side"), message.get("on")
    if side not in SIDES or not isinstance(on, bool):
        raise SimLinkProtocolError(f"bad power event: {line[:80]!r}")
    return PowerState(side, on)


class SimLinkFollower:
    """Make ``gpio``'s power pins follow the simulator, as module ``side``.

    ``run()`` connects to ``control_path``, watches and drives the pins
    until cancelled.  It raises SimLinkError if the socket cannot be reached
    or the simulator closes the stream, SimLinkProtocolError if it breaks the
    contract.  :attr:`synced` is set once both sides' states have arrived.
    """

    def __init__(
        self,
        control_path: str | os.PathLike[str],
        gpio: SimGpio,
        side: str,
        config: PowerConfig,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be 'a' or 'b', not {side!r}")
        self.control_path = os.fspath(control_path)
        self._gpio = gpio
        self.side = side
        self._config = config
        self.power: dict[str, bool] = {}
        self.synced = asyncio.Event()

    def apply(self, state: PowerState) -> None:
        """Drive the pin that ``state`` concerns for this module."""
        self.power[state.side] = state.on
        own = state.side == self.side
        pin = self._config.own_power_good if own else self._config.peer_power
        if pin is not None:
            self._gpio.pin(pin.bcm).drive(pin.level_for(state.on))
        if len(self.power) == len(SIDES):
            self.synced.set()

    async def run(self) -> None:
        """Follow the simulator until cancelled (see the class docstring)."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.control_path, limit=MAX_LINE)
        except OSError as e:
            raise SimLinkError(
                e.errno, f"cannot reach the link simulator at {self.control_path}: {e}"
            ) from e
        try:
            writer.write(b'{"cmd":"watch"}\n')
            await writer.drain()
            while True:
                try:
                    line = await reader.readline()
                except ValueError as e:  # LimitOverrunError: a line over MAX_LINE
                    raise SimLinkProtocolError(f"line longer than {MAX_LINE} bytes") from e
                except OSError as e:
                    raise SimLinkError(e.errno, f"link simulator connection failed: {e}") from e
                if not line:
                    raise SimLinkError("the link simulator closed the watch stream")
                if not line.endswith(b"\n"):
                    raise SimLinkError("the link simulator closed the stream mid-line")
                state = parse_event(line)
                if state is not None:
                    self.apply(state)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
