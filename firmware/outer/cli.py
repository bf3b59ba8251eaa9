"""``optogate outer``: run the outer module daemon, or show its status.

::

    optogate outer run --config outer.toml
    optogate outer status --config outer.toml [--json]

``run`` starts the daemon (firmware/outer/app.py) and returns its exit
status: 0 after SIGTERM/SIGINT, 1 when it cannot start or its optical port
fails, 3 when its own power failed.  ``status`` prints the status file the
daemon rewrites every two seconds (modem state, last call, last sync, the
queue of requests waiting for central, counters); it exits 1 when there is
no status or the daemon that wrote it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Final

from firmware.outer.app import STATUS_INTERVAL, OuterDaemon
from firmware.outer.config import load_config
from firmware.outer.errors import OuterConfigError

#: A status file older than this many rewrite periods means the daemon is gone.
STALE_PERIODS: Final = 5

#: Fields shown first by ``status``, in this order (everything else follows, sorted).
HEADLINE: Final = (
    "outer.state",
    "optical.connected",
    "uplink.state",
    "uplink.transport",
    "modem.state",
    "uplink.pending",
    "last_call.transport",
    "last_call.started",
    "last_call.ended",
    "last_call.end_reason",
    "last_sync",
    "uplink.last_error",
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate outer``."""
    parser = argparse.ArgumentParser(prog=prog, description="The outer module daemon.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="outer.toml")
    status = sub.add_parser("status", help="show the running daemon's status")
    status.add_argument("--config", required=True, help="outer.toml")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    return parser


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate outer``; return the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        config = load_config(args.config)
    except OuterConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.command == "run":
        return asyncio.run(OuterDaemon(config).run())
    return _status(config.status_path, as_json=args.json, prog=prog)


def _status(path: os.PathLike[str], *, as_json: bool, prog: str) -> int:
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        print(f"{prog}: no status ({e}); is the daemon running?", file=sys.stderr)
        return 1
    running = fields.get("outer.state") == "running" and _alive(fields.get("outer.pid"))
    age = time.time() - float(fields.get("outer.time", 0))
    if age > STALE_PERIODS * STATUS_INTERVAL:
        running = False
    if as_json:
        print(json.dumps(fields, indent=2, sort_keys=True))
    else:
        keys = [k for k in HEADLINE if k in fields]
        keys += sorted(k for k in fields if k not in HEADLINE)
        width = max((len(k) for k in keys), default=0)
        for key in keys:
            value = fields[key]
            if key in ("last_call.started", "last_call.ended", "last_sync", "outer.time"):
                value = f"{value} ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(value))} UTC)"
            print(f"{key:<{width}}  {value}")
        if not running:
            print(f"(the daemon is not running; this status is {age:.0f} s old)")
    return 0 if running else 1


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
