"""The one console script, ``optogate``, and its subcommands.

Each subcommand lives beside the code it drives and exposes
``main(argv: list[str], prog: str) -> int``.  This module only knows their
names, so ``optogate --help`` and every command start without importing the
whole project (a Pi 3 takes seconds to import cryptography and aiohttp).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help).  Keep alphabetical within each group.
COMMANDS: dict[str, tuple[str, str]] = {
    "bundle": ("provisioning.bundle_cli", "pack and inspect service bundles"),
    "central": ("central_stub.cli", "the central server: administer and run it"),
    "keys": ("provisioning.keys_cli", "make central and gateway keys, issue API keys"),
    "isolator": ("firmware.isolator.cli", "flash / status of the optical isolation module"),
    "call": ("host_tools.call", "run a service on a gateway (for any program, via subprocess)"),
    "demo": ("host_tools.demo", "the whole appliance on this machine (--tour walks through it)"),
    "inner": ("firmware.inner.cli", "the inner module daemon: run, status"),
    "link": ("firmware.common.link.cli", "test the optical UART link (echo / test)"),
    "image": ("provisioning.image_cli", "build the SD card images of the two modules"),
    "outer": ("firmware.outer.cli", "the outer module daemon: run it, show its status"),
    "power": ("firmware.common.power.cli", "watch the power-sense lines, show LED states"),
    "sim": ("host_tools.sim_cli", "simulators: the optical link, the modem"),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser (subcommands parse their own arguments)."""
    parser = argparse.ArgumentParser(
        prog="optogate",
        description="optogate: licensing and private-compute appliance.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {text}" for name, (_, text) in sorted(COMMANDS.items())),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optogate``; return the process exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    module_name, _ = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    result: int = module.main(list(args.args), f"optogate {args.command}")
    return result


if __name__ == "__main__":
    sys.exit(main())
