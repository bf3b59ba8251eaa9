"""``optogate central``: administer and run the central server.

::

    optogate central (--state DIR | --config central.toml) COMMAND ...

    init [--dns NAME]... [--ip ADDR]... [--force]   state dir, database, TLS CA + certificate
    run [--listen HOST:PORT]...                      serve gateways (TLS, answering modems)
    status                                           what the running server last reported
    customer add ID --name NAME | customer list
    gateway register GATEWAY_JSON --customer ID | gateway revoke ID | gateway list
    service publish BUNDLE [--verify-key PUB]... | service list
    licence issue --customer ID --service NAME --from DATE --until DATE [--gateway ID]
    licence revoke LICENCE | licence list [--customer ID]
    payment record --licence LICENCE --amount 120.00 [--currency EUR] --extend 30d
    client-key issue --customer ID [--label TEXT]    prints the key once
    client-key revoke KEY | client-key list [--customer ID]
    usage report --customer ID --month YYYY-MM [--csv]
    audit [--limit N] [--csv]

``--state``/``--config`` may come before or after the command.  Dates are
``YYYY-MM-DD`` (UTC; ``--until`` includes the whole day) or ISO 8601 times
with a zone.  Exit status: 0 done, 1 refused (the reason on stderr; nothing
was written), 2 usage error.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from central_stub import admin
from central_stub import config as cfg
from central_stub.app import init_state, load_signing_key, main_run, status_of, with_listen
from central_stub.errors import InvalidInput, NotFound
from central_stub.repository import TinyRepository
from firmware.common.crypto.keys import VerifyKey
from firmware.common.errors import OptogateError


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state", type=Path, default=argparse.SUPPRESS, help="state directory")
    where.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="central.toml configuration"
    )


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate central``."""
    parser = argparse.ArgumentParser(prog=prog, description="Administer and run central.")
    _common(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    def leaf(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text)
        _common(p)
        return p

    p = leaf(sub, "init", "create the state directory, database and TLS certificate")
    p.add_argument("--dns", action="append", default=[], help="server DNS name (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="server IP address (repeatable)")
    p.add_argument("--force", action="store_true", help="renew the TLS server certificate")
    p = leaf(sub, "run", "serve gateways")
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT")
    leaf(sub, "status", "print what the running server last reported")

    group = sub.add_parser("customer", help="customers").add_subparsers(
        dest="action", required=True
    )
    p = leaf(group, "add", "add a customer")
    p.add_argument("id")
    p.add_argument("--name", required=True)
    leaf(group, "list", "list customers")

    group = sub.add_parser("gateway", help="gateways").add_subparsers(dest="action", required=True)
    p = leaf(group, "register", "register a gateway from its gateway.json")
    p.add_argument("gateway_json", type=Path)
    p.add_argument("--customer", required=True)
    p = leaf(group, "revoke", "refuse a gateway's outer module from now on")
    p.add_argument("id")
    leaf(group, "list", "list gateways")

    group = sub.add_parser("service", help="services").add_subparsers(dest="action", required=True)
    p = leaf(group, "publish", "publish a signed bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("--verify-key", type=Path, action="append", default=[], help="publisher key")
    leaf(group, "list", "list published bundle versions")

    group = sub.add_parser("licence", help="licences").add_subparsers(dest="action", required=True)
    p = leaf(group, "issue", "issue a licence")
    p.add_argument("--customer", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--from", dest="valid_from", required=True)
    p.add_argument("--until", dest="valid_until", required=True)
    p.add_argument("--gateway", help="only this gateway (default: all of the customer's)")
    p = leaf(group, "revoke", "revoke a licence")
    p.add_argument("id")
    p = leaf(group, "list", "list licences")
    p.add_argument("--customer")

    group = sub.add_parser("payment", help="payments").add_subparsers(dest="action", required=True)
    p = leaf(group, "record", "record a payment and extend the licence")
    p.add_argument("--licence", required=True)
    p.add_argument("--amount", required=True)
    p.add_argument("--currency", default="EUR")
    p.add_argument("--extend", required=True, help="e.g. 30d, 12h, 2w")

    group = sub.add_parser("client-key", help="client API keys").add_subparsers(
        dest="action", required=True
    )
    p = leaf(group, "issue", "issue a client API key (printed once)")
    p.add_argument("--customer", required=True)
    p.add_argument("--label", default="")
    p = leaf(group, "revoke", "revoke a client API key (it leaves every licence)")
    p.add_argument("id")
    p = leaf(group, "list", "list client keys (ids and hashes, never the keys)")
    p.add_argument("--customer")

    group = sub.add_parser("usage", help="usage").add_subparsers(dest="action", required=True)
    p = leaf(group, "report", "a customer's usage in one month")
    p.add_argument("--customer", required=True)
    p.add_argument("--month", required=True)
    p.add_argument("--csv", action="store_true")

    p = leaf(sub, "audit", "print the audit log")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--csv", action="store_true")
    return parser


def _config(args: argparse.Namespace) -> cfg.CentralConfig:
    if getattr(args, "config", None) is not None:
        return cfg.load(args.config)
    if getattr(args, "state", None) is not None:
        return cfg.for_state_dir(args.state)
    raise InvalidInput("give --state DIR or --config central.toml")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _csv(rows: list[list[str]], header: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")


def _when(seconds: int | None) -> str:
    return "-" if seconds is None else admin.format_time(seconds)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}") from e


def execute(args: argparse.Namespace, now: int, actor: str) -> str:
    """Run one parsed command; return what to print.  Raises OptogateError when refused."""
    conf = _config(args)
    command, action = args.command, getattr(args, "action", None)
    if command == "init":
        summary = init_state(conf, dns_names=args.dns, ip_addresses=args.ip, force=args.force)
        return "\n".join(f"{k}: {v}" for k, v in summary.items())
    if command == "status":
        return json.dumps(status_of(conf), indent=1, sort_keys=True)
    repo = TinyRepository(conf.state_dir)
    if not repo.path.exists():
        raise NotFound(f"{conf.state_dir} is not initialised: run 'optogate central init'")
    if command == "customer" and action == "add":
        c = admin.add_customer(repo, args.id, args.name, now=now, actor=actor)
        return f"customer {c.customer_id} added"
    if command == "customer":
        rows = [[c.customer_id, c.name, _when(c.created)] for c in repo.snapshot().list_customers()]
        return _table(rows, ["customer", "name", "created"])
    if command == "gateway" and action == "register":
        key = load_signing_key(conf)
        gw = admin.register_gateway(
            repo,
            _read(args.gateway_json),
            args.customer,
            central_key_id=key.key_id,
            now=now,
            actor=actor,
        )
        return f"gateway {gw.gateway_id} registered for customer {gw.customer_id}"
    if command == "gateway" and action == "revoke":
        gw = admin.revoke_gateway(repo, args.id, now=now, actor=actor)
        return f"gateway {gw.gateway_id} revoked"
    if command == "gateway":
        gws = repo.snapshot().list_gateways()
        rows = [[g.gateway_id, g.customer_id, _when(g.registered), _when(g.revoked)] for g in gws]
        return _table(rows, ["gateway", "customer", "registered", "revoked"])
    if command == "service" and action == "publish":
        trusted = [load_signing_key(conf).public]
        trusted += [VerifyKey.load(p) for p in (*conf.publisher_keys, *args.verify_key)]
        record, new = admin.publish_service(repo, _read(args.bundle), trusted, now=now, actor=actor)
        state = "published" if new else "already published"
        return f"service {record.service} version {record.version} {state} (sha256:{record.blob})"
    if command == "service":
        rows = [
            [b.service, str(b.version), str(b.size), b.blob[:16], _when(b.published)]
            for b in repo.snapshot().list_bundles()
        ]
        return _table(rows, ["service", "version", "bytes", "sha256", "published"])
    if command == "licence" and action == "issue":
        lic = admin.issue_licence(
            repo,
            customer_id=args.customer,
            service=args.service,
            valid_from=admin.parse_time(args.valid_from),
            valid_until=admin.parse_time(args.valid_until, end_of_day=True),
            gateway_id=args.gateway,
            now=now,
            actor=actor,
        )
        return (
            f"licence {lic.licence_id} issued: {lic.customer_id} / {lic.service} "
            f"{_when(lic.valid_from)} .. {_when(lic.valid_until)}"
        )
    if command == "licence" and action == "revoke":
        lic = admin.revoke_licence(repo, args.id, now=now, actor=actor)
        return f"licence {lic.licence_id} revoked (version {lic.version})"
    if command == "licence":
        rows = [
            [
                lic.licence_id,
                lic.customer_id,
                lic.service,
                lic.gateway_id or "*",
                _when(lic.valid_from),
                _when(lic.valid_until),
                str(lic.version),
                _when(lic.revoked),
            ]
            for lic in repo.snapshot().list_licences(args.customer)
        ]
        head = ["licence", "customer", "service", "gateway", "from", "until", "version", "revoked"]
        return _table(rows, head)
    if command == "payment":
        payment, lic = admin.record_payment(
            repo,
            licence_id=args.licence,
            amount_minor=admin.parse_amount(args.amount),
            currency=args.currency,
            extend_seconds=admin.parse_duration(args.extend),
            now=now,
            actor=actor,
        )
        return (
            f"payment {payment.payment_id} recorded: licence {lic.licence_id} valid until "
            f"{_when(lic.valid_until)} (version {lic.version})"
        )
    if command == "client-key" and action == "revoke":
        revoked = admin.revoke_client_key(repo, args.id, now=now, actor=actor)
        return f"client key {revoked.key_id} of {revoked.customer_id} revoked"
    if command == "client-key" and action == "list":
        rows = [
            [k.key_id, k.customer_id, k.label, k.key_hash[:16], _when(k.created), _when(k.revoked)]
            for k in repo.snapshot().list_client_keys(args.customer)
        ]
        return _table(rows, ["key", "customer", "label", "sha256", "created", "revoked"])
    if command == "client-key":
        issued = admin.issue_client_key(repo, args.customer, args.label, now=now, actor=actor)
        return (
            f"client key {issued.record.key_id} for {args.customer} (shown once): "
            f"{issued.secret}\nstored hash: {issued.record.key_hash}"
        )
    if command == "usage":
        lines = admin.usage_report(repo, args.customer, args.month)
        rows = [
            [
                u.service,
                u.licence_id,
                u.gateway_id,
                str(u.calls),
                str(u.units),
                str(u.failed),
                f"{u.duration_ms / 1000:.3f}",
                str(u.bytes_in),
                str(u.bytes_out),
            ]
            for u in lines
        ]
        head = [
            "service",
            "licence",
            "gateway",
            "calls",
            "units",
            "failed",
            "seconds",
            "bytes_in",
            "bytes_out",
        ]
        return _csv(rows, head) if args.csv else _table(rows, head)
    if command == "audit":
        if args.limit is not None and args.limit < 1:
            raise InvalidInput("--limit must be at least 1")
        rows = [
            [
                str(e.seq),
                _when(e.at),
                e.actor,
                e.action,
                e.target,
                "ok" if e.ok else "refused",
                e.detail,
            ]
            for e in repo.snapshot().list_audit(args.limit)
        ]
        head = ["seq", "time", "actor", "action", "target", "result", "detail"]
        return _csv(rows, head) if args.csv else _table(rows, head)
    raise InvalidInput(f"unknown command {command} {action or ''}")


def main(argv: Sequence[str], prog: str) -> int:
    """Run ``optogate central``; return the exit status (0 done, 1 refused, 2 usage)."""
    args = build_parser(prog).parse_args(list(argv))
    try:
        if args.command == "run":
            conf = with_listen(_config(args), args.listen)
            return main_run(conf)
        print(execute(args, int(time.time()), getpass.getuser()))
    except (OptogateError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0
