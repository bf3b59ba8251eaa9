"""``optogate inner``: run the inner module daemon, or show its status.

::

    optogate inner run --config inner.toml
    optogate inner status --config inner.toml [--json]

``run`` serves until SIGTERM/SIGINT (exit 0) or until its own power fails
(exit 75, so systemd restarts it); a configuration, key or state problem
exits 78 with one line saying what.  ``status`` reads the status file the
daemon rewrites every second in its state directory: link state, services,
licences and queued usage.  A file older than a few seconds means the daemon
is not running; ``status`` then exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

from firmware.common.errors import OptogateError
from firmware.inner.config import load_config

#: A status file not rewritten for this long belongs to a daemon that is gone.
STALE_AFTER_S: Final = 5.0


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate inner``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, type=Path, help="inner.toml")
    status = sub.add_parser("status", help="show the running daemon's state")
    status.add_argument("--config", required=True, type=Path, help="inner.toml")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    return parser


def _print_status(doc: dict[str, Any], age: float) -> None:
    link = doc.get("link", {})
    print(f"gateway      {doc.get('gateway')}   (pid {doc.get('pid')}, status {age:.1f} s old)")
    print(f"link         {link.get('state')}   peer powered: {link.get('peer_powered')}")
    print(f"trusted time {doc.get('trusted_time')}")
    services = doc.get("services", {})
    print(
        "services     "
        + (", ".join(f"{n} v{s['version']}" for n, s in services.items()) or "none built")
    )
    for lic in doc.get("licences", []):
        state = "revoked" if lic["revoked"] else ("valid" if lic["valid"] else "not valid now")
        what = f"{lic['customer']} / {lic['service']} until {lic['valid_until']}"
        print(f"licence      {lic['id']}: {what} ({state})")
    usage = doc.get("usage", {})
    entries, batches = usage.get("entries", 0), usage.get("batches", 0)
    print(f"usage queued {entries} entries in the journal, {batches} batches awaiting ack")


def status(config_path: Path, as_json: bool) -> int:
    """Print the daemon's status; return 0, or 1 when it is not running."""
    cfg = load_config(config_path)
    path = cfg.state_dir / "status.json"
    try:
        doc = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        print(f"no status at {path}: is the daemon running?", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({**doc, "age_s": round(age, 3)}, indent=1, sort_keys=True))
    else:
        _print_status(doc, age)
    if doc.get("stopped"):
        print(f"the daemon stopped (exit status {doc.get('exit')})", file=sys.stderr)
        return 1
    if age > STALE_AFTER_S:
        print(f"status is {age:.0f} s old: the daemon is not running", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate inner``; return the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "status":
            return status(args.config, args.json)
        from firmware.inner.app import EXIT_START, InnerDaemon

        config = load_config(args.config)
        try:
            return asyncio.run(InnerDaemon(config).run())
        except OptogateError as e:
            print(f"{prog}: cannot start: {e}", file=sys.stderr)
            return EXIT_START
    except OptogateError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
