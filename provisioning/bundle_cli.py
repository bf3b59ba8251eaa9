"""``optogate bundle``: pack a service directory into a bundle, and inspect bundles.

``build DIR [--out FILE] [--sign-key KEY]`` reads ``DIR/manifest.toml``, packs
the directory (see :mod:`provisioning.bundle`) and writes the bundle, by
default to ``NAME-VERSION.ogb`` in the current directory, atomically.
``inspect BUNDLE [--verify-key KEY]`` parses a bundle strictly and prints its
manifest, files, sizes and digest (and checks the signature when given a key).
Exit status: 0 on success, 1 when the bundle or directory is rejected (the
reason is printed on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from firmware.common.errors import OptogateError
from firmware.common.store.atomic import atomic_write
from provisioning.bundle import Bundle, build_bundle, load_bundle

#: Bundles are not secret: the vendor publishes them.  World-readable is fine.
BUNDLE_FILE_MODE = 0o644
BUNDLE_SUFFIX = ".ogb"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Pack and inspect service bundles.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="pack a directory holding manifest.toml")
    build.add_argument("directory", type=Path)
    build.add_argument("--out", type=Path, help="output file (default NAME-VERSION.ogb)")
    build.add_argument("--sign-key", type=Path, help="vendor/publisher Ed25519 signing key")
    inspect = sub.add_parser("inspect", help="print a bundle's manifest, files and digest")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--verify-key", type=Path, help="check the signature with this key")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def describe(bundle: Bundle) -> str:
    """Return the human-readable listing ``inspect`` prints."""
    m = bundle.manifest
    lines = [
        f"name:         {m.name}",
        f"version:      {m.version}",
        f"runtime:      {m.runtime}",
        f"entry:        {m.entry}",
        f"description:  {m.description}",
        f"input type:   {m.input_type}",
        f"output type:  {m.output_type}",
        f"limits:       timeout {m.limits.timeout_s:g} s, memory {m.limits.memory_mb} MiB, "
        f"result {m.limits.max_result_bytes} bytes",
        "params:       " + json.dumps(m.to_dict()["params"], sort_keys=True),
        f"digest:       sha256:{bundle.hexdigest}",
        "signature:    " + (f"key {bundle.signature.key_id}" if bundle.signature else "(unsigned)"),
        f"files:        {len(bundle.files)}, {sum(map(len, bundle.files.values()))} bytes",
    ]
    lines += [f"  {len(content):>10}  {path}" for path, content in bundle.files.items()]
    return "\n".join(lines)


def main(argv: list[str], prog: str) -> int:
    """Run the ``bundle`` command; return the exit status."""
    args = _parser(prog).parse_args(argv)
    try:
        if args.action == "build":
            sign_key = None
            if args.sign_key is not None:
                from firmware.common.crypto.keys import SigningKey

                sign_key = SigningKey.load(args.sign_key)
            bundle = build_bundle(args.directory, sign_key)
            out = args.out or Path(
                f"{bundle.manifest.name}-{bundle.manifest.version}{BUNDLE_SUFFIX}"
            )
            data = bundle.to_bytes()
            atomic_write(out, data, mode=BUNDLE_FILE_MODE)
            signed = f", signed by {bundle.signature.key_id}" if bundle.signature else ""
            print(f"{out}: {len(data)} bytes, sha256:{bundle.hexdigest}{signed}")
            return 0
        try:
            data = args.bundle.read_bytes()
        except OSError as e:
            print(f"{prog}: {args.bundle}: {e.strerror}", file=sys.stderr)
            return 1
        bundle = load_bundle(data)
        if args.verify_key is not None:
            from firmware.common.crypto.keys import VerifyKey

            bundle.verify(VerifyKey.load(args.verify_key))
        if args.json:
            doc = {
                "manifest": bundle.manifest.to_dict(),
                "files": {p: len(c) for p, c in bundle.files.items()},
                "digest": bundle.hexdigest,
                "key_id": bundle.signature.key_id if bundle.signature else None,
            }
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(describe(bundle))
            if args.verify_key is not None:
                print("signature:    verified")
        return 0
    except OptogateError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
