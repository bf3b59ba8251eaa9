"""``optogate call``: run a gateway service from any program, through a subprocess.

::

    optogate call dxf2svg --input drawing.dxf --output drawing.svg
    optogate call doc-encrypt --param op=encrypt --param password=s3cret \\
        --input report.docx --output report.docx.og --json

The gateway, key and CA come from ``--url``/``--api-key``/``--ca`` or from
the environment (``OPTOGATE_URL``, ``OPTOGATE_API_KEY``, ``OPTOGATE_CA``), so
the key need not appear in a process listing.  ``--param k=v`` values are read
as JSON when they parse (``3``, ``true``, ``[1,2]``) and as strings otherwise;
``--params`` takes a whole JSON object (or ``@file``).

Output: the binary output goes to ``--output`` (or to stdout when there is
no ``--output``, with the result on stderr); the JSON result goes to stdout.
With ``--json`` exactly one JSON object is printed: ``{"ok": true, "result":
..., "output_bytes": N}`` or ``{"ok": false, "status": 402, "code":
"payment_required", "message": ..., "error": {...}}``.  The exit code says
which error class happened (table in docs/api.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from host_tools.client import Client, GatewayError

EXIT_OK = 0
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments: exit 2 with the message."""


def parse_param(text: str) -> tuple[str, Any]:
    """Split ``k=v``; the value is JSON when it parses, a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--param wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def collect_params(params_json: str | None, pairs: list[str]) -> dict[str, Any]:
    """Merge ``--params`` (a JSON object or @file) and every ``--param``."""
    params: dict[str, Any] = {}
    if params_json:
        text = params_json
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as e:
                raise UsageError(f"cannot read {text[1:]}: {e.strerror}") from e
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--params is not valid JSON: {e}") from e
        if not isinstance(loaded, dict):
            raise UsageError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, value = parse_param(pair)
        params[key] = value
    return params


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a service on an optogate gateway.")
    p.add_argument("service")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--params", metavar="JSON|@FILE", help="all parameters as one JSON object")
    p.add_argument("--input", type=Path, help="binary input file ('-' for stdin)")
    p.add_argument("--output", type=Path, help="where to write the binary output")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--url", default=os.environ.get("OPTOGATE_URL"))
    p.add_argument("--api-key", default=os.environ.get("OPTOGATE_API_KEY"))
    p.add_argument("--ca", default=os.environ.get("OPTOGATE_CA"), help="the gateway's CA file")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--max-wait", type=float, default=60.0, help="total wait for 503/429 retries")
    return p


def _read_input(path: Path | None) -> bytes:
    if path is None:
        return b""
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate call``; return the exit code of docs/api.md."""
    args = build_parser(prog).parse_args(argv)
    try:
        if not args.url or not args.api_key:
            raise UsageError("need --url and --api-key (or OPTOGATE_URL / OPTOGATE_API_KEY)")
        params = collect_params(args.params, args.param)
        data = _read_input(args.input)
        with Client(
            args.url, args.api_key, args.ca, timeout=args.timeout, max_wait=args.max_wait
        ) as client:
            outcome = client.call(args.service, params, data)
        if args.output is not None:
            try:
                args.output.write_bytes(outcome.data)
            except OSError as e:
                raise UsageError(f"cannot write {args.output}: {e.strerror}") from e
    except UsageError as e:
        return _fail(args.json, EXIT_USAGE, {"code": "usage", "message": str(e)})
    except GatewayError as e:
        detail = {"status": e.status, "code": e.code, "message": str(e), "error": e.body}
        if e.retry_after is not None:
            detail["retry_after"] = e.retry_after
        return _fail(args.json, e.exit_code, detail)
    if args.json:
        print(json.dumps({"ok": True, "result": outcome.result, "output_bytes": len(outcome.data)}))
    elif args.output is None and outcome.data:
        sys.stdout.buffer.write(outcome.data)
        sys.stdout.flush()
        print(json.dumps(outcome.result), file=sys.stderr)
    else:
        print(json.dumps(outcome.result))
    return EXIT_OK


def _fail(as_json: bool, code: int, detail: dict[str, Any]) -> int:
    if as_json:
        print(json.dumps({"ok": False, **detail}))
    else:
        print(f"optogate call: {detail.get('message')}", file=sys.stderr)
    return code
