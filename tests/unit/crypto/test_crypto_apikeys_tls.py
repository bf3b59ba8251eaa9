"""API keys (shape, hashing, matching) and the gateway TLS CA (a real TLS 1.3 handshake)."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.apikeys import (
    API_KEY_PREFIX,
    api_key_matches,
    generate_api_key,
    hash_api_key,
    is_api_key_shaped,
)
from firmware.common.crypto.errors import InvalidApiKey, KeyFileError
from firmware.common.crypto.tls import (
    PemPair,
    certificate_fingerprint,
    issue_server_certificate,
    make_gateway_ca,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_api_key_shape_and_hash() -> None:
    issued = generate_api_key()
    assert issued.secret.startswith(API_KEY_PREFIX)
    assert len(issued.secret) == len(API_KEY_PREFIX) + 52
    assert is_api_key_shaped(issued.secret)
    assert issued.key_hash == hashlib.sha256(issued.secret.encode()).hexdigest()
    assert hash_api_key(issued.secret) == issued.key_hash
    assert issued.secret not in repr(issued)
    assert api_key_matches(issued.secret, issued.key_hash)
    assert not api_key_matches(generate_api_key().secret, issued.key_hash)
    assert not api_key_matches("og_live_nope", issued.key_hash)


def test_api_keys_are_distinct() -> None:
    assert len({generate_api_key().secret for _ in range(200)}) == 200


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "og_live_",
        "og_test_" + "a" * 52,
        "og_live_" + "A" * 52,
        "og_live_" + "a" * 51,
        "og_live_" + "1" * 52,
    ],
)
def test_malformed_api_keys(bad: str) -> None:
    with pytest.raises(InvalidApiKey):
        hash_api_key(bad)


@given(st.text(max_size=80))
def test_hash_api_key_is_total(text: str) -> None:
    try:
        h = hash_api_key(text)
    except InvalidApiKey:
        assert not is_api_key_shaped(text)
        return
    assert len(h) == 64


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def ca() -> PemPair:
    return make_gateway_ca("gw-1", NOW)


def test_ca_and_server_certificate_fields(ca: PemPair) -> None:
    server = issue_server_certificate(
        ca, common_name="gw-1", dns_names=["gw-1.local"], ip_addresses=["192.0.2.7"], now=NOW
    )
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert = x509.load_pem_x509_certificate(server.cert_pem)
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert bc.path_length == 0
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw-1.local"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert len(certificate_fingerprint(server.cert_pem)) == 64
    assert "PRIVATE KEY" not in repr(server)


def test_server_certificate_needs_a_name(ca: PemPair) -> None:
    with pytest.raises(ValueError):
        issue_server_certificate(ca, common_name="x", dns_names=[], ip_addresses=[], now=NOW)
    with pytest.raises(ValueError):
        issue_server_certificate(ca, common_name="x", dns_names=[], ip_addresses=["nope"], now=NOW)
    with pytest.raises(KeyFileError):
        issue_server_certificate(
            PemPair(b"junk", ca.cert_pem),
            common_name="x",
            dns_names=["x"],
            ip_addresses=[],
            now=NOW,
        )


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> str:
    """Run a TLS handshake in memory (no sockets, no threads); return the client's version."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, end in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    version = client.version()
    assert version is not None
    return version


def test_real_tls13_handshake_with_hostname_and_ip(ca: PemPair, tmp_path: Path) -> None:
    server = issue_server_certificate(
        ca,
        common_name="gw-1",
        dns_names=["gw-1.local"],
        ip_addresses=["192.0.2.7"],
        now=datetime.datetime.now(datetime.UTC),
    )
    (tmp_path / "tls.crt").write_bytes(server.cert_pem + ca.cert_pem)
    (tmp_path / "tls.key").write_bytes(server.key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    assert _handshake(server_ctx, client_ctx, "gw-1.local") == "TLSv1.3"
    assert _handshake(server_ctx, client_ctx, "192.0.2.7") == "TLSv1.3"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "other.local")
    stranger = ssl.create_default_context(cadata=make_gateway_ca("gw-2", NOW).cert_pem.decode())
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, stranger, "gw-1.local")
