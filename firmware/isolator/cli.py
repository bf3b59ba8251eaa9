"""``optogate isolator``: flash the optical isolation module and read its counters.

The board is a Raspberry Pi Pico running MicroPython; everything goes through
``mpremote`` over its USB console:

* ``flash --port DEV`` checks the configuration with the very rules the board
  applies, then copies the filter core, the loop, the board's composition root,
  main.py and the configuration (always named isolator.json on the board)
  and hard-resets the board.  ``resume`` keeps mpremote from soft-resetting
  first: the running filter keeps feeding its watchdog while files are copied.
* ``status --port DEV`` runs ``isolator_app.status()`` on the board (again with
  ``resume``, so the filter keeps running) and shows the counters.
* ``check-config [PATH]`` validates a configuration file without a board.

``--dry-run`` prints the mpremote command lines instead of running them.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from firmware.isolator import hostconfig
from firmware.isolator.errors import BoardError, IsolatorConfigError

ISOLATOR_DIR = Path(__file__).parent
#: Files the board runs, in copy order: main.py last, so an interrupted copy
#: leaves a board whose boot fails closed rather than a half-new firmware.
BOARD_FILES = (
    ISOLATOR_DIR / "filtercore.py",
    ISOLATOR_DIR / "pump.py",
    ISOLATOR_DIR / "board" / "isolator_app.py",
)
BOARD_MAIN = ISOLATOR_DIR / "board" / "main.py"
BOARD_CONFIG_NAME = "isolator.json"
STATUS_CODE = "import isolator_app; isolator_app.status()"
#: Copying ~40 KB at the console's speed takes seconds; a minute means the
#: board or the cable is wedged.
MPREMOTE_TIMEOUT_S = 60.0

EXIT_OK = 0
EXIT_NOT_RUNNING = 1
EXIT_ERROR = 2


def mpremote_argv(option: str | None = None) -> list[str]:
    """Return how to start mpremote: ``option`` split like a shell would, else this
    interpreter's own ``-m mpremote`` (the project depends on it, so it is there)."""
    return shlex.split(option) if option else [sys.executable, "-m", "mpremote"]


def flash_command(port: str, config: Path, mpremote: list[str] | None = None) -> list[str]:
    """Return the mpremote argument list that installs the firmware and ``config``."""
    cmd = [*(mpremote or mpremote_argv()), "connect", port, "resume"]
    copies = [(path, path.name) for path in BOARD_FILES]
    copies += [(config, BOARD_CONFIG_NAME), (BOARD_MAIN, BOARD_MAIN.name)]
    for path, name in copies:
        cmd += ["fs", "cp", str(path), f":{name}", "+"]
    return [*cmd, "reset"]


def status_command(port: str, mpremote: list[str] | None = None) -> list[str]:
    """Return the mpremote argument list that prints the board's status line."""
    return [*(mpremote or mpremote_argv()), "connect", port, "resume", "exec", STATUS_CODE]


def parse_status(output: str) -> dict[str, Any]:
    """Return the status object in the console ``output`` (its last JSON line).

    Raises BoardError when no line is a JSON object with the status keys.
    """
    for raw in reversed(output.splitlines()):
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and {"running", "error", "status"} <= set(obj):
            return obj
    raise BoardError(f"the board printed no status line: {output[-500:]!r}")


def run_mpremote(cmd: list[str], timeout: float = MPREMOTE_TIMEOUT_S) -> str:
    """Run ``cmd``; return its standard output.

    Raises BoardError when mpremote is missing, fails or times out.
    """
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise BoardError(f"{cmd[0]} not found: install the project (it depends on mpremote)") from e
    except subprocess.TimeoutExpired as e:
        raise BoardError(f"mpremote gave no result within {timeout:.0f} s") from e
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise BoardError(f"mpremote failed ({done.returncode}): {detail}")
    return done.stdout


def format_status(obj: dict[str, Any]) -> str:
    """Return a human-readable rendering of a status object."""
    lines = [f"running: {'yes' if obj['running'] else 'NO'}"]
    if obj["error"]:
        lines.append(f"error:   {obj['error']}")
    status = obj["status"]
    if status:
        power = status["power"]
        lines.append(
            f"uptime:  {status['uptime_ms'] / 1000:.1f} s   power: outer={power['outer']} "
            f"inner={power['inner']}   maintenance: {status['maintenance']}"
        )
        filters = status["filter"]
        names = sorted({k for counters in filters.values() for k in counters})
        directions = sorted(filters)
        lines.append(f"{'counter':<20}" + "".join(f"{d:>12}" for d in directions))
        for name in names:
            values = [filters[d].get(name, 0) for d in directions]
            if name.startswith("dropped_") and not any(values):
                continue
            lines.append(f"{name:<20}" + "".join(f"{v:>12}" for v in values))
    return "\n".join(lines)


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate isolator``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Flash and inspect the optical isolation module (Pico)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def board_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", required=True, help="the Pico's USB console, e.g. /dev/ttyACM0")
        p.add_argument("--mpremote", default=None, help="mpremote command (default: bundled)")
        p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")

    flash = sub.add_parser("flash", help="copy firmware and configuration, then reset")
    board_options(flash)
    flash.add_argument(
        "--config", type=Path, default=None, help="configuration file (default: shipped)"
    )
    status = sub.add_parser("status", help="read the filter's counters")
    board_options(status)
    status.add_argument("--json", action="store_true", help="print the raw status JSON")
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config", type=Path, nargs="?", default=None)
    return parser


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate isolator``; return the exit status (0 ok, 1 filter not running, 2 error)."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "check-config":
            config = hostconfig.parse(hostconfig.load_raw(args.config))
            print(
                f"ok: a->b kinds {sorted(hex(k) for k in config.allowed['a->b'])}, "
                f"b->a kinds {sorted(hex(k) for k in config.allowed['b->a'])}, "
                f"maintenance {'on' if config.maintenance else 'off'}"
            )
            return EXIT_OK
        if args.command == "flash":
            path = hostconfig.DEFAULT_CONFIG_PATH if args.config is None else args.config
            hostconfig.parse(hostconfig.load_raw(path))  # refuse to flash what the board refuses
            cmd = flash_command(args.port, path, mpremote_argv(args.mpremote))
            if args.dry_run:
                print(shlex.join(cmd))
                return EXIT_OK
            run_mpremote(cmd)
            print(f"flashed {args.port}; the board is restarting")
            return EXIT_OK
        cmd = status_command(args.port, mpremote_argv(args.mpremote))
        if args.dry_run:
            print(shlex.join(cmd))
            return EXIT_OK
        obj = parse_status(run_mpremote(cmd))
        print(json.dumps(obj, indent=2, sort_keys=True) if args.json else format_status(obj))
        return EXIT_OK if obj["running"] else EXIT_NOT_RUNNING
    except (IsolatorConfigError, BoardError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_ERROR
