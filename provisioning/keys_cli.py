"""``optogate keys``: make the keys of central and of each gateway.

::

    optogate keys init-central DIR
        DIR/central.key   central's Ed25519 signing key (0600; keep it on central only)
        DIR/central.pub   its public key (goes into every gateway)

    optogate keys gateway NAME --out DIR --central-pub FILE
                          [--dns NAME ...] [--ip ADDR ...] [--pq] [--force]
        DIR/inner/   hpke.key/.pub (X25519, or ML-KEM-768+X25519 with --pq),
                     signing.key/.pub (Ed25519, signs usage records),
                     tls.key/tls.crt (LAN API, P-256), tls-ca.crt, central.pub
        DIR/outer/   signing.key/.pub (Ed25519, authenticates to central), central.pub
        DIR/ca/      ca.key/ca.crt: the gateway's own TLS CA; keep it off both modules
        DIR/inner/identity.json, DIR/outer/identity.json   name, key ids, and (inner)
                     the provisioning time: the floor of the inner module's trusted time
        DIR/gateway.json   ids and public keys, read by central's `gateway register`
                           (through provisioning.gateway_file.read_gateway_description)

    optogate keys id FILE        print the key id of a key file
    optogate keys api-key        issue an API key: the key once, and its stored hash

No private key of the inner module is ever written under outer/: the outer
module faces the internet and must be unable to read what it relays.
Existing key files are never overwritten without ``--force``; private keys
are written mode 0600 and directories 0700.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import sys
from pathlib import Path

from firmware.common.crypto.apikeys import generate_api_key
from firmware.common.crypto.errors import InsecureKeyFile, KeyFileError
from firmware.common.crypto.keys import (
    MAX_KEY_FILE_BYTES,
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    VerifyKey,
)
from firmware.common.crypto.tls import (
    certificate_fingerprint,
    issue_server_certificate,
    make_gateway_ca,
)
from firmware.common.errors import OptogateError
from firmware.common.store.atomic import PRIVATE_MODE, atomic_write
from provisioning.gateway_file import GATEWAY_FORMAT, GATEWAY_NAME_RE

#: Public files (certificates, public keys, gateway.json) may be read by anyone.
PUBLIC_MODE = 0o644

#: Directories holding private keys: owner only.
DIR_MODE = 0o700


class Refused(OptogateError):
    """The command would overwrite keys or was given unusable input."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_free(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        listing = ", ".join(str(p) for p in existing)
        raise Refused(f"refusing to overwrite existing files (use --force): {listing}")


def _mkdir(path: Path, *, holds_keys: bool) -> None:
    """Create ``path`` mode 0700; tighten an existing one only if it is ours to hold keys."""
    if not path.exists():
        path.mkdir(parents=True)
        path.chmod(DIR_MODE)
    elif holds_keys:
        path.chmod(DIR_MODE)


def init_central(directory: Path, *, force: bool = False) -> SigningKey:
    """Create central's signing key in ``directory``; return it. Raise Refused."""
    key_path, pub_path = directory / "central.key", directory / "central.pub"
    _check_free([key_path, pub_path], force)
    _mkdir(directory, holds_keys=False)
    key = SigningKey.generate()
    key.save(key_path)
    key.public.save(pub_path)
    return key


def make_gateway(
    name: str,
    out: Path,
    central_pub: Path,
    *,
    dns_names: list[str],
    ip_addresses: list[str],
    pq: bool = False,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> dict[str, object]:
    """Create every key of gateway ``name`` under ``out``; return the gateway.json content.

    Raises Refused (bad name, or files exist without ``force``), KeyFileError
    (``central_pub`` is not an Ed25519 public key), ValueError (bad address).
    """
    if not GATEWAY_NAME_RE.fullmatch(name):
        raise Refused(f"gateway name {name!r} must be a DNS label: a-z, 0-9 and '-'")
    for addr in ip_addresses:
        try:
            ipaddress.ip_address(addr)
        except ValueError as e:
            raise Refused(f"{addr!r} is not an IP address") from e
    central = VerifyKey.load(central_pub)
    when = now or datetime.datetime.now(datetime.UTC)
    dns = dns_names or [name, f"{name}.local"]

    inner, outer, ca_dir = out / "inner", out / "outer", out / "ca"
    files = {
        "inner_hpke": inner / "hpke.key",
        "inner_hpke_pub": inner / "hpke.pub",
        "inner_sign": inner / "signing.key",
        "inner_sign_pub": inner / "signing.pub",
        "inner_tls_key": inner / "tls.key",
        "inner_tls_crt": inner / "tls.crt",
        "inner_tls_ca": inner / "tls-ca.crt",
        "inner_central": inner / "central.pub",
        "outer_sign": outer / "signing.key",
        "outer_sign_pub": outer / "signing.pub",
        "outer_central": outer / "central.pub",
        "ca_key": ca_dir / "ca.key",
        "ca_crt": ca_dir / "ca.crt",
        "inner_identity": inner / "identity.json",
        "outer_identity": outer / "identity.json",
        "gateway": out / "gateway.json",
    }
    _check_free(list(files.values()), force)
    _mkdir(out, holds_keys=False)
    for d in (inner, outer, ca_dir):
        _mkdir(d, holds_keys=True)

    hpke_key = RecipientKey.generate(pq=pq)
    inner_sign = SigningKey.generate()
    outer_sign = SigningKey.generate()
    ca = make_gateway_ca(name, when)
    server = issue_server_certificate(
        ca, common_name=dns[0] if dns else name, dns_names=dns, ip_addresses=ip_addresses, now=when
    )

    hpke_key.save(files["inner_hpke"])
    hpke_key.public.save(files["inner_hpke_pub"])
    inner_sign.save(files["inner_sign"])
    inner_sign.public.save(files["inner_sign_pub"])
    atomic_write(files["inner_tls_key"], server.key_pem, PRIVATE_MODE)
    atomic_write(files["inner_tls_crt"], server.cert_pem + ca.cert_pem, PUBLIC_MODE)
    atomic_write(files["inner_tls_ca"], ca.cert_pem, PUBLIC_MODE)
    central.save(files["inner_central"])
    outer_sign.save(files["outer_sign"])
    outer_sign.public.save(files["outer_sign_pub"])
    central.save(files["outer_central"])
    atomic_write(files["ca_key"], ca.key_pem, PRIVATE_MODE)
    atomic_write(files["ca_crt"], ca.cert_pem, PUBLIC_MODE)

    provisioned_at = int(when.timestamp())
    _write_json(
        files["inner_identity"],
        {
            "format": GATEWAY_FORMAT,
            "gateway": name,
            "provisioned_at": provisioned_at,
            "central_key_id": central.key_id,
            "hpke_key_id": hpke_key.key_id,
            "signing_key_id": inner_sign.key_id,
        },
    )
    _write_json(
        files["outer_identity"],
        {
            "format": GATEWAY_FORMAT,
            "gateway": name,
            "central_key_id": central.key_id,
            "signing_key_id": outer_sign.key_id,
        },
    )
    description: dict[str, object] = {
        "format": GATEWAY_FORMAT,
        "gateway": name,
        "created": when.replace(microsecond=0).isoformat(),
        "provisioned_at": provisioned_at,
        "central_key_id": central.key_id,
        "inner": {
            "hpke": {
                "key_id": hpke_key.key_id,
                "suite": hpke_key.suite.name,
                "public": _b64(hpke_key.public.raw),
            },
            "signing": {"key_id": inner_sign.key_id, "public": _b64(inner_sign.public.raw)},
            "tls": {
                "dns": dns,
                "ip": ip_addresses,
                "server_fingerprint_sha256": certificate_fingerprint(server.cert_pem),
                "ca_fingerprint_sha256": certificate_fingerprint(ca.cert_pem),
                "ca_cert_pem": ca.cert_pem.decode("ascii"),
            },
        },
        "outer": {
            "signing": {"key_id": outer_sign.key_id, "public": _b64(outer_sign.public.raw)},
        },
    }
    _write_json(files["gateway"], description)
    return description


def _write_json(path: Path, doc: dict[str, object]) -> None:
    atomic_write(path, json.dumps(doc, indent=2).encode() + b"\n", PUBLIC_MODE)


def key_id_of_file(path: Path) -> str:
    """Return the key id of any optogate key file (private or public); raise KeyFileError."""
    if not path.is_file():
        raise KeyFileError(f"no key file at {path}")
    private = b"PRIVATE KEY-----" in path.read_bytes()[:MAX_KEY_FILE_BYTES]
    loaders = (
        (SigningKey.load, RecipientKey.load)
        if private
        else (VerifyKey.load, RecipientPublicKey.load)
    )
    for load in loaders:
        try:
            return load(path).key_id
        except InsecureKeyFile:
            raise
        except KeyFileError:
            continue
    raise KeyFileError(f"{path} is not an optogate key file")


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate keys``."""
    parser = argparse.ArgumentParser(prog=prog, description="Make central and gateway keys.")
    sub = parser.add_subparsers(dest="action", required=True)

    p = sub.add_parser("init-central", help="create central's signing key")
    p.add_argument("dir", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite existing keys")

    p = sub.add_parser("gateway", help="create the keys of one gateway")
    p.add_argument("name")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--central-pub", type=Path, required=True, help="central's public key")
    p.add_argument("--dns", action="append", default=[], help="LAN API DNS name (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="LAN API IP address (repeatable)")
    p.add_argument("--pq", action="store_true", help="ML-KEM-768+X25519 hybrid HPKE key")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")

    p = sub.add_parser("id", help="print the key id of a key file")
    p.add_argument("file", type=Path)

    sub.add_parser("api-key", help="issue an API key (shown once) and its hash")
    return parser


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate keys``; return the exit status (0 done, 1 refused or failed)."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.action == "init-central":
            key = init_central(args.dir, force=args.force)
            print(f"central key {key.key_id} written to {args.dir}")
        elif args.action == "gateway":
            desc = make_gateway(
                args.name,
                args.out,
                args.central_pub,
                dns_names=args.dns,
                ip_addresses=args.ip,
                pq=args.pq,
                force=args.force,
            )
            inner = desc["inner"]
            assert isinstance(inner, dict)
            print(f"gateway {args.name}: keys in {args.out}; hpke key {inner['hpke']['key_id']}")
        elif args.action == "id":
            print(key_id_of_file(args.file))
        else:
            issued = generate_api_key()
            print(f"api key (shown once): {issued.secret}")
            print(f"stored hash:          {issued.key_hash}")
    except (OptogateError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0
