"""The per-gateway certificate authority and the LAN API's TLS server certificate.

The LAN API speaks TLS 1.3 only.  Its certificate cannot come from a public
CA (the inner module has no internet and usually no public DNS name), so each
gateway gets its **own CA** at provisioning: a self-signed P-256 certificate
constrained to issuing end-entity certificates (``pathlen=0``).  Customer PCs
trust exactly that CA (the client library pins it); nothing else it could
sign is ever trusted, and compromising one gateway's CA affects no other.

Keys are ECDSA P-256: every TLS 1.3 client supports it (Ed25519 certificates
are still missing from some stacks, e.g. older Windows schannel and Java).
Certificates carry the names and addresses the customer's programs use, as
subjectAltName entries (clients ignore the common name).

Pure apart from the CSPRNG: the caller passes ``now``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.common.crypto.errors import KeyFileError

#: The CA outlives the box: it must never expire under a working gateway.
CA_VALIDITY = datetime.timedelta(days=20 * 365)

#: The server certificate: the inner module cannot reach a CA to renew, so
#: it is long-lived; re-provisioning issues a new one (``keys gateway --force``).
SERVER_VALIDITY = datetime.timedelta(days=10 * 365)

#: Tolerate customer PCs whose clocks run a little behind the provisioning host.
BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class PemPair:
    """A private key and its certificate, both PEM (``key_pem`` is secret, hidden from repr)."""

    key_pem: bytes = field(repr=False)
    cert_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_gateway_ca(gateway: str, now: datetime.datetime) -> PemPair:
    """Return a new self-signed CA for ``gateway``, valid from ``now`` (minus a backdate)."""
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "optogate"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"optogate gateway {gateway} CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return PemPair(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def issue_server_certificate(
    ca: PemPair,
    *,
    common_name: str,
    dns_names: list[str],
    ip_addresses: list[str],
    now: datetime.datetime,
) -> PemPair:
    """Return a new P-256 key and a TLS server certificate for it, signed by ``ca``.

    Raises ValueError if no name or address is given or an address is not an
    IP address, and KeyFileError if ``ca`` is not a P-256 CA key and certificate.
    """
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    ips = [ipaddress.ip_address(a) for a in ip_addresses]
    try:
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    except ValueError as e:
        raise KeyFileError("not a CA key and certificate") from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyFileError("the CA key is not an EC key")
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "optogate"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return PemPair(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def certificate_fingerprint(cert_pem: bytes) -> str:
    """Return the SHA-256 fingerprint of a PEM certificate, hex; raise KeyFileError."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise KeyFileError("not a PEM certificate") from e
    return cert.fingerprint(hashes.SHA256()).hex()
