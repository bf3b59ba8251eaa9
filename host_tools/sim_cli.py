"""``optogate sim``: a small dispatcher to the simulators.

Each simulator exposes ``main(argv: list[str], prog: str) -> int`` in its own
module; this module only maps names to modules, so adding one is one line.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
SIMULATORS: dict[str, tuple[str, str]] = {
    "link": ("host_tools.sim.link", "two ptys joined like the optocoupled UART"),
    "modem": ("host_tools.sim.modem", "a Hayes modem on a pty; calls are TCP connections"),
}


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate sim NAME ...``; return the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Simulators that stand in for the appliance's hardware.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="simulators:\n"
        + "\n".join(f"  {name:<8} {text}" for name, (_, text) in sorted(SIMULATORS.items())),
    )
    parser.add_argument("simulator", choices=sorted(SIMULATORS), metavar="SIMULATOR")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    module_name, _ = SIMULATORS[args.simulator]
    module = importlib.import_module(module_name)
    result: int = module.main(list(args.args), f"{prog} {args.simulator}")
    return result
