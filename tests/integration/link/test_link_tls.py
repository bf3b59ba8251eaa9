"""The Link over TLS on loopback: the uplink's carrier, with a throwaway certificate."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from firmware.common.adapters.tcp import StreamTransport, connect_tcp, serve_tcp
from firmware.common.errors import PortError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1; return (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "central test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def echo(msg: m.Message) -> m.Message | None:
    if isinstance(msg, m.Status):
        return m.StatusReport(fields={"tls": True})
    return None


async def test_request_over_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    links: list[Link] = []
    served = asyncio.Event()

    async def on_connect(transport: StreamTransport) -> None:
        link = Link(transport, SessionConfig(Role.SERVER, baud=None))
        links.append(link)
        serving = asyncio.create_task(link.serve(echo))
        await served.wait()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await link.aclose()

    listener = await serve_tcp("127.0.0.1", 0, on_connect, ssl_context=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        transport = await connect_tcp("127.0.0.1", port, ssl_context=client_ctx)
        async with Link(transport, SessionConfig(Role.CLIENT, baud=None)) as client:
            report = await client.request(m.Status(), expect=m.StatusReport, timeout=10)
            assert report.fields == {"tls": True}
    finally:
        served.set()
        listener.close()
        await listener.wait_closed()


async def test_untrusted_certificate_is_a_port_error(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def on_connect(transport: StreamTransport) -> None:
        return None

    listener = await serve_tcp("127.0.0.1", 0, on_connect, ssl_context=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        with pytest.raises(PortError, match="cannot connect"):
            await connect_tcp("127.0.0.1", port, ssl_context=ssl.create_default_context())
    finally:
        listener.close()
        await listener.wait_closed()
