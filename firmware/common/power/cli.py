"""``optogate power``: watch the power-sense lines and exercise the status LEDs.

For the bench and the hardware acceptance checklist (docs/hardware.md):

* ``optogate power watch`` configures the power inputs exactly as the
  daemons do and prints one JSON line per event (``started`` with the
  initial state, then ``PeerPowerLost``, ``OwnPowerFailing``...), until
  SIGINT/SIGTERM or ``--seconds``.  With ``--backend sim --sim-link SOCKET
  --side a|b`` the pins follow the link simulator instead of wires.
* ``optogate power leds STATE`` shows one LED state (idle, dialling,
  syncing, link_up, error) for ``--seconds``, then switches the LEDs off.

The GPIO settings come from the ``[gpio]`` table of ``--config`` (a module's
TOML file) or the documented defaults; ``--backend`` overrides the backend.
Exit status: 0 when stopped, 2 for a configuration error (for example a
missing RPi.GPIO, named in the message), 1 for any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import tomllib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from firmware.common.errors import ConfigError, OptogateError

from .config import BACKENDS, PowerConfig
from .gpio import GpioBackend, load_backend
from .leds import LinkState
from .monitor import PowerEvent, PowerMonitor
from .sim import SimGpio
from .simlink import SIDES, SimLinkError, SimLinkFollower
from .watcher import LedDriver, PowerWatcher

#: How long ``watch --sim-link`` waits for the simulator's first power state:
#: it sends both sides at once on connecting, so this only bounds a hang.
SYNC_TIMEOUT_S = 5.0


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate power``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="GPIO power-sense lines and status LEDs of one module."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="module TOML file with a [gpio] table")
    common.add_argument("--backend", choices=BACKENDS, help="override gpio.backend")
    common.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: on a signal)"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    watch = sub.add_parser("watch", parents=[common], help="print power events as JSON lines")
    watch.add_argument("--sim-link", metavar="SOCKET", help="follow the link simulator (sim)")
    watch.add_argument("--side", choices=SIDES, help="this module's side in the simulator")
    leds = sub.add_parser("leds", parents=[common], help="show one LED state")
    leds.add_argument("state", choices=[s.value for s in LinkState])
    return parser


def load_config(path: Path | None, backend: str | None) -> PowerConfig:
    """The [gpio] settings of ``path`` (defaults if None), backend overridden.

    Raises ConfigError for an unreadable file, bad TOML or bad settings.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        gpio = document.get("gpio", {})
        if not isinstance(gpio, dict):
            raise ConfigError(f"{path}: [gpio] must be a table")
        data = dict(gpio)
    if backend is not None:
        data["backend"] = backend
    return PowerConfig.from_mapping(data)


def _emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _event_record(event: PowerEvent) -> dict[str, object]:
    fields = dataclasses.asdict(event)
    return {
        "event": type(event).__name__,
        **fields,
        "decided_after_ms": round((event.at - event.since) * 1000, 3),
    }


async def _until_stopped(seconds: float | None, *work: Awaitable[None]) -> None:
    """Run ``work`` until a signal, ``seconds`` or the first failure."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.ensure_future(w) for w in work]

    async def stopped() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()

    stopper: asyncio.Future[Any] = asyncio.ensure_future(stopped())
    everything: list[asyncio.Future[Any]] = [*tasks, stopper]
    try:
        done, _ = await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task in done:
                task.result()  # a failure ends the command with its error
    finally:
        for future in everything:
            future.cancel()
        for future in everything:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await future
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _watch(args: argparse.Namespace, config: PowerConfig, backend: GpioBackend) -> None:
    work: list[Awaitable[None]] = []
    if args.sim_link is not None:
        if not isinstance(backend, SimGpio) or args.side is None:
            raise ConfigError("--sim-link needs --backend sim (or gpio.backend) and --side")
        follower = SimLinkFollower(args.sim_link, backend, args.side, config)
        following = asyncio.ensure_future(follower.run())
        synced = asyncio.ensure_future(follower.synced.wait())
        try:
            await asyncio.wait(
                [following, synced], timeout=SYNC_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if following.done():
                following.result()  # the simulator could not be followed: say why
            if not follower.synced.is_set():
                raise SimLinkError(f"no power state from the link simulator in {SYNC_TIMEOUT_S} s")
        except BaseException:
            following.cancel()
            with contextlib.suppress(BaseException):
                await following
            raise
        finally:
            synced.cancel()
        work.append(following)
    watcher = PowerWatcher(backend, config)

    def on_ready(monitor: PowerMonitor) -> None:
        sensing = {sig.value: known for sig, known in watcher.sensing.items()}
        _emit(
            {
                "event": "started",
                "backend": config.backend,
                "peer_powered": monitor.peer_powered,
                "own_power_good": monitor.own_power_good,
                "sensing": sensing,
            }
        )

    def on_event(event: PowerEvent) -> None:
        _emit(_event_record(event))

    await _until_stopped(args.seconds, watcher.run(on_event, on_ready), *work)
    if watcher.monitor is not None:
        _emit({"event": "stopped", **watcher.monitor.statistics()})


async def _leds(args: argparse.Namespace, config: PowerConfig, backend: GpioBackend) -> None:
    driver = LedDriver(backend, config, state=LinkState(args.state))
    _emit({"event": "leds", "state": args.state, "backend": config.backend})
    await _until_stopped(args.seconds, driver.run())


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate power``; return the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        config = load_config(args.config, args.backend)
        backend = load_backend(config.backend)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        action = _watch if args.action == "watch" else _leds
        asyncio.run(action(args, config, backend))
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OptogateError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    return 0
