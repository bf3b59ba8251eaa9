"""``gateway.json``: what provisioning tells central about a new gateway.

``optogate keys gateway`` writes it; central's ``gateway register`` reads it
with :func:`read_gateway_description`, which checks every field and turns
the public keys into key objects, so central never stores a key whose id
does not match its bytes.  Layout (format 1)::

    {
      "format": 1,
      "gateway": "gw-7",                       DNS label
      "created": "2026-01-01T00:00:00+00:00",  ISO 8601, informational
      "provisioned_at": 1767225600,            Unix seconds (trusted-time floor)
      "central_key_id": "<32 hex>",
      "inner": {
        "hpke":    {"key_id": "<32 hex>", "suite": "X25519_HKDF_SHA256_CHACHA20POLY1305"
                    | "MLKEM768X25519_HKDF_SHA256_CHACHA20POLY1305", "public": "<base64 raw>"},
        "signing": {"key_id": "<32 hex>", "public": "<base64 raw>"},
        "tls": {"dns": [...], "ip": [...], "server_fingerprint_sha256": "<64 hex>",
                "ca_fingerprint_sha256": "<64 hex>", "ca_cert_pem": "<PEM>"}
      },
      "outer": {"signing": {"key_id": "<32 hex>", "public": "<base64 raw>"}}
    }
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

from firmware.common.crypto.errors import KeyFileError
from firmware.common.crypto.keys import RecipientPublicKey, VerifyKey
from firmware.common.crypto.tls import certificate_fingerprint
from firmware.common.errors import ConfigError

#: The format ``keys gateway`` writes.
GATEWAY_FORMAT = 1

#: gateway.json is a few KB (the CA certificate, a hybrid key); 1 MiB is generous.
MAX_GATEWAY_FILE_BYTES = 1024 * 1024

#: A gateway name is a DNS label, so it can also be the server's host name.
GATEWAY_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class GatewayFileError(ConfigError):
    """gateway.json is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class GatewayDescription:
    """A checked gateway.json: names, times and the gateway's public keys."""

    gateway: str
    provisioned_at: int
    central_key_id: str
    inner_hpke: RecipientPublicKey
    inner_signing: VerifyKey
    outer_signing: VerifyKey
    tls_dns: tuple[str, ...]
    tls_ip: tuple[str, ...]
    tls_ca_cert_pem: bytes
    tls_ca_fingerprint: str


def _obj(doc: object, where: str) -> dict[str, object]:
    if not isinstance(doc, dict):
        raise GatewayFileError(f"{where}: expected an object")
    return doc


def _str(doc: dict[str, object], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise GatewayFileError(f"{where}.{key}: expected a string")
    return value


def _raw(doc: dict[str, object], where: str) -> tuple[str, bytes]:
    key_id = _str(doc, "key_id", where)
    if not _KEY_ID_RE.fullmatch(key_id):
        raise GatewayFileError(f"{where}.key_id: expected 32 hex digits")
    try:
        raw = base64.b64decode(_str(doc, "public", where), validate=True)
    except binascii.Error as e:
        raise GatewayFileError(f"{where}.public: not base64") from e
    return key_id, raw


def parse_gateway_description(data: bytes) -> GatewayDescription:
    """Return the checked description in ``data``.

    Raises GatewayFileError for anything malformed, and when a key id does
    not match its key, the HPKE suite does not match the key, or the CA
    fingerprint does not match the certificate.
    """
    try:
        doc = _obj(json.loads(data), "gateway.json")
    except (ValueError, RecursionError) as e:
        raise GatewayFileError("gateway.json is not JSON") from e
    if doc.get("format") != GATEWAY_FORMAT:
        raise GatewayFileError("gateway.json: unknown format")
    name = _str(doc, "gateway", "gateway.json")
    if not GATEWAY_NAME_RE.fullmatch(name):
        raise GatewayFileError("gateway.json.gateway: expected a DNS label")
    provisioned_at = doc.get("provisioned_at")
    if type(provisioned_at) is not int or provisioned_at < 0:
        raise GatewayFileError("gateway.json.provisioned_at: expected Unix seconds")
    central_key_id = _str(doc, "central_key_id", "gateway.json")
    if not _KEY_ID_RE.fullmatch(central_key_id):
        raise GatewayFileError("gateway.json.central_key_id: expected 32 hex digits")
    inner = _obj(doc.get("inner"), "inner")
    outer = _obj(doc.get("outer"), "outer")
    hpke_doc = _obj(inner.get("hpke"), "inner.hpke")
    tls = _obj(inner.get("tls"), "inner.tls")
    try:
        hpke_id, hpke_raw = _raw(hpke_doc, "inner.hpke")
        hpke = RecipientPublicKey.from_raw(hpke_raw)
        inner_id, inner_raw = _raw(_obj(inner.get("signing"), "inner.signing"), "inner.signing")
        inner_signing = VerifyKey.from_raw(inner_raw)
        outer_id, outer_raw = _raw(_obj(outer.get("signing"), "outer.signing"), "outer.signing")
        outer_signing = VerifyKey.from_raw(outer_raw)
        ca_pem = _str(tls, "ca_cert_pem", "inner.tls").encode("ascii", "replace")
        ca_fp = certificate_fingerprint(ca_pem)
    except KeyFileError as e:
        raise GatewayFileError(f"gateway.json: {e}") from e
    for what, claimed, key_id in (
        ("inner.hpke", hpke_id, hpke.key_id),
        ("inner.signing", inner_id, inner_signing.key_id),
        ("outer.signing", outer_id, outer_signing.key_id),
    ):
        if claimed != key_id:
            raise GatewayFileError(f"{what}.key_id does not match its public key")
    if _str(hpke_doc, "suite", "inner.hpke") != hpke.suite.name:
        raise GatewayFileError("inner.hpke.suite does not match its public key")
    if _str(tls, "ca_fingerprint_sha256", "inner.tls") != ca_fp:
        raise GatewayFileError("inner.tls.ca_fingerprint_sha256 does not match the certificate")
    if len({hpke.key_id, inner_signing.key_id, outer_signing.key_id}) != 3:
        raise GatewayFileError("gateway.json: the same key appears twice")
    dns, ips = tls.get("dns"), tls.get("ip")
    if not (isinstance(dns, list) and all(isinstance(x, str) for x in dns)):
        raise GatewayFileError("inner.tls.dns: expected a list of names")
    if not (isinstance(ips, list) and all(isinstance(x, str) for x in ips)):
        raise GatewayFileError("inner.tls.ip: expected a list of addresses")
    return GatewayDescription(
        gateway=name,
        provisioned_at=provisioned_at,
        central_key_id=central_key_id,
        inner_hpke=hpke,
        inner_signing=inner_signing,
        outer_signing=outer_signing,
        tls_dns=tuple(dns),
        tls_ip=tuple(ips),
        tls_ca_cert_pem=ca_pem,
        tls_ca_fingerprint=ca_fp,
    )


def read_gateway_description(path: Path | str) -> GatewayDescription:
    """Return the checked description in the file at ``path``; raise GatewayFileError."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_GATEWAY_FILE_BYTES:
            raise GatewayFileError(f"{p} is too large to be a gateway.json")
        data = p.read_bytes()
    except OSError as e:
        raise GatewayFileError(f"cannot read {p}: {e.strerror or e}") from e
    return parse_gateway_description(data)
