"""``optogate image``: SD card images for the outer and inner modules.

::

    optogate image build --base RASPIOS.img[.xz] --role outer|inner --gateway DIR --out FILE.img
                         [--wheelhouse DIR | --skip-app] [--board pi4|pi5] [--baud N]
                         [--gpio rpigpio|none] [--force] [--grow]
                         outer:  [--central HOST:PORT --central-ca FILE [--central-name NAME]]
                                 [--dial NUMBER [--modem DEVICE]]
                         inner:  [--api-port PORT]
    optogate image wheelhouse --python 3.11|3.13 [--out DIR]
    optogate image releases

``build`` writes FILE.img (mode 0600: it holds the module's private keys)
and FILE.img.manifest.json.  Exit status: 0 built, 1 refused or failed
(nothing written), 2 bad usage.  ``wheelhouse`` downloads the aarch64 wheels
``build`` installs from (the only step that needs the network); without
``--wheelhouse``, ``build`` uses the cached one for the image's Python.
``releases`` prints the table of known Raspberry Pi OS releases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from firmware.common.errors import OptogateError


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate image``."""
    from provisioning.image.bootconfig import BOARDS

    parser = argparse.ArgumentParser(prog=prog, description="SD card images for the modules.")
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build one module's image from a stock Pi OS image")
    b.add_argument("--base", type=Path, required=True, help="Raspberry Pi OS .img or .img.xz")
    b.add_argument("--role", choices=("outer", "inner"), required=True)
    b.add_argument("--gateway", type=Path, required=True, help="`optogate keys gateway` --out DIR")
    b.add_argument("--out", type=Path, required=True, help="the image to write")
    app = b.add_mutually_exclusive_group()
    app.add_argument("--wheelhouse", type=Path, help="aarch64 wheels (default: the cache)")
    app.add_argument(
        "--skip-app",
        action="store_true",
        help="leave the application out (layout checks only; the module cannot run)",
    )
    b.add_argument("--board", choices=BOARDS, default="pi4", help="pi4 (Pi 3/4, default) or pi5")
    b.add_argument("--baud", type=int, default=115200, help="optical UART speed")
    b.add_argument(
        "--gpio",
        choices=("rpigpio", "none"),
        default="rpigpio",
        help="GPIO backend (none: no power sense, no LEDs)",
    )
    b.add_argument("--central", type=_host_port, help="outer: central's HOST:PORT (internet)")
    b.add_argument("--central-ca", type=Path, help="outer: central's tls/ca.crt")
    b.add_argument("--central-name", default="", help="outer: name in central's certificate")
    b.add_argument("--dial", default="", help="outer: central's phone number (dial-up)")
    b.add_argument(
        "--modem", default="/dev/ttyACM0", help="outer: modem device (prefer /dev/serial/by-id/...)"
    )
    b.add_argument("--api-port", type=int, default=8443, help="inner: LAN API port")
    b.add_argument("--force", action="store_true", help="build from a release not in the table")
    b.add_argument("--grow", action="store_true", help="enlarge the image if the root is too full")

    w = sub.add_parser("wheelhouse", help="download the aarch64 wheels the image installs")
    w.add_argument("--python", choices=("3.11", "3.13"), required=True)
    w.add_argument("--out", type=Path, help="directory (default: the cache in the checkout)")

    sub.add_parser("releases", help="list the known Raspberry Pi OS releases")
    return parser


def _build(args: argparse.Namespace, prog: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from provisioning.image.bootconfig import SERIAL_DEVICE
    from provisioning.image.build import BuildRequest, build
    from provisioning.image.errors import ImageInputError
    from provisioning.image.plan import Site

    console = Console(stderr=True)
    if args.role == "inner" and (args.central or args.dial):
        raise ImageInputError("--central and --dial are for the outer module")
    central_ca = b""
    if args.central_ca is not None:
        try:
            central_ca = args.central_ca.read_bytes()
        except OSError as e:
            raise ImageInputError(f"cannot read --central-ca {args.central_ca}: {e}") from e
    host, port = args.central or ("", 7443)
    site = Site(
        board=args.board,
        serial_device=SERIAL_DEVICE[args.board],
        baud=args.baud,
        gpio_backend=args.gpio,
        api_port=args.api_port,
        central_host=host,
        central_port=port,
        central_server_name=args.central_name,
        central_ca=central_ca,
        dial_number=args.dial,
        modem_device=args.modem,
    )
    request = BuildRequest(
        base=args.base,
        role=args.role,
        gateway_dir=args.gateway,
        out=args.out,
        site=site,
        wheelhouse=args.wheelhouse,
        skip_app=args.skip_app,
        force=args.force,
        grow=args.grow,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        copy_task = bar.add_task("copying the base image", total=None)

        def on_copy(done: int, total: int) -> None:
            bar.update(copy_task, completed=done, total=total)

        def on_step(text: str) -> None:
            bar.console.print(f"[bold]·[/bold] {text}")

        result = build(request, progress=on_step, copy_progress=on_copy)
    entries = result.document["entries"]
    count = len(entries) if isinstance(entries, list) else 0
    console.print(
        f"[green]built[/green] {result.image} (mode 0600), {count} entries in {result.manifest}"
    )
    return 0


def _releases() -> int:
    from rich.console import Console
    from rich.table import Table

    from provisioning.image.releases import RELEASES

    table = Table(title="Raspberry Pi OS releases (arm64) the image builder knows")
    for column in ("release", "Debian", "Python", "boot partition mounted at"):
        table.add_column(column)
    for r in RELEASES:
        table.add_row(r.name, r.codename.debian, r.codename.python, r.codename.boot_mount)
    Console().print(table)
    return 0


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate image``; return the exit status (0 done, 1 refused or failed, 2 usage)."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.action == "build":
            return _build(args, prog)
        if args.action == "wheelhouse":
            from provisioning.image.wheelhouse import default_wheelhouse, make_wheelhouse

            dest = args.out or default_wheelhouse(args.python)
            names = make_wheelhouse(dest, args.python)
            print(f"{len(names)} wheels for CPython {args.python} aarch64 in {dest}")
            return 0
        return _releases()
    except OptogateError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
