"""A real SERVER-role Link peer speaking central's gateway protocol, for the uplink tests.

It runs the real session, messages and sealed-object code: a TLS listener
(the internet transport, certificate from a test CA) and a plain TCP listener
(what a modem emulator's phone book points at, standing for central's
answering modem).  It authenticates with the documented transcript and
answers FetchService, Sync, UsageReport and Status with objects sealed by
test keys.  It records every connection and request so tests can count calls.

What it does not model: central's repository, licensing and audit; every
gateway gets the same bundle and licence set.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from firmware.common.adapters.tcp import StreamTransport, serve_tcp
from firmware.common.crypto.errors import InvalidSignature
from firmware.common.crypto.keys import RecipientKey, SigningKey
from firmware.common.crypto.sealed import Kind, seal
from firmware.common.crypto.tls import issue_server_certificate, make_gateway_ca
from firmware.common.errors import OptogateError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from firmware.common.uplink import auth_transcript

NOW = 1_767_225_600
GATEWAY = "gw-test"
LICENCE_VERSION = 7  # of the licence set the peer serves


@dataclass
class Keys:
    """Central's, the inner module's and the outer module's keys, and central's TLS files."""

    central: SigningKey = field(default_factory=SigningKey.generate)
    inner: RecipientKey = field(default_factory=RecipientKey.generate)
    outer: SigningKey = field(default_factory=SigningKey.generate)

    def write_outer_dir(self, directory: Path) -> Path:
        """Write what `optogate keys gateway` puts under outer/; return the directory."""
        directory.mkdir(parents=True, exist_ok=True)
        self.outer.save(directory / "signing.key")
        self.central.public.save(directory / "central.pub")
        (directory / "identity.json").write_text(json.dumps({"format": 1, "gateway": GATEWAY}))
        return directory

    def write_tls(self, directory: Path) -> tuple[Path, Path, Path]:
        """Write central's CA, certificate (for 127.0.0.1) and key; return the paths."""
        now = datetime.datetime.now(datetime.UTC)
        ca = make_gateway_ca("central-test", now)
        leaf = issue_server_certificate(
            ca, common_name="central", dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now
        )
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / "ca.crt", directory / "central.crt", directory / "central.key")
        paths[0].write_bytes(ca.cert_pem)
        paths[1].write_bytes(leaf.cert_pem)
        paths[2].write_bytes(leaf.key_pem)
        os.chmod(paths[2], 0o600)
        return paths


def sealed(keys: Keys, kind: Kind, subject: str, version: int, payload: bytes) -> bytes:
    """Return ``payload`` sealed to the inner module and signed by central."""
    return seal(
        payload,
        kind=kind,
        subject=subject,
        version=version,
        created=NOW,
        expires=NOW + 86400 * 3650,
        issuer=keys.central,
        recipient=keys.inner.public,
    )


class CentralPeer:
    """The test's central; see the module docstring."""

    def __init__(self, keys: Keys, tls_files: tuple[Path, Path, Path], *, bundle_size: int = 2000):
        self.keys = keys
        self._tls_files = tls_files
        self.bundle_version = 3
        # incompressible, so the sealed bundle is as large as asked
        self.bundle = sealed(keys, Kind.BUNDLE, "dxf", self.bundle_version, os.urandom(bundle_size))
        self.licences = sealed(keys, Kind.LICENCE_SET, GATEWAY, LICENCE_VERSION, b"licences")
        self.connections = 0
        self.open_connections = 0
        self.requests: list[tuple[int, str]] = []
        self.since_versions: list[int] = []  # of every Sync, in order
        self.refuse_auth = False
        self.reply_delay = 0.0
        self.line_baud = 115200  # the session's pacing on the modem side
        self.muted = False  # True: the line goes silent both ways, the connection stays
        self.tls_port = 0
        self.plain_port = 0
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync_version = 100

    async def start(self) -> CentralPeer:
        """Listen on two loopback ports (TLS and plain); return self."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self._tls_files[1], self._tls_files[2])
        tls = await serve_tcp("127.0.0.1", 0, self._serve_tcp, ssl_context=ctx)
        plain = await serve_tcp("127.0.0.1", 0, self._serve_plain)
        self._servers = [tls, plain]
        self.tls_port = tls.sockets[0].getsockname()[1]
        self.plain_port = plain.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and end every connection."""
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def kinds(self) -> list[str]:
        """Return the kinds of every request served, in order."""
        return [kind for _, kind in self.requests]

    async def _serve_tcp(self, transport: StreamTransport) -> None:
        await self._serve(transport, None)

    async def _serve_plain(self, transport: StreamTransport) -> None:
        # the far end of a modem call: the session paced at the line rate
        await self._serve(transport, self.line_baud)

    async def _serve(self, transport: StreamTransport, baud: int | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open_connections += 1
        number = self.connections
        nonce = b""
        authenticated = False
        link = Link(_Mutable(transport, self), SessionConfig(role=Role.SERVER, baud=baud))

        async def handler(msg: m.Message) -> m.Message:
            nonlocal nonce, authenticated
            self.requests.append((number, msg.KIND.name))
            if self.reply_delay and not isinstance(msg, m.AuthBegin | m.AuthProof):
                await asyncio.sleep(self.reply_delay)
            if isinstance(msg, m.AuthBegin):
                if self.refuse_auth or msg.gateway_id != GATEWAY:
                    return m.Error(code="unknown_gateway", detail=msg.gateway_id, retry_after=None)
                nonce = os.urandom(32)
                return m.AuthChallenge(nonce=nonce)
            if isinstance(msg, m.AuthProof):
                transcript = auth_transcript(GATEWAY, nonce, self.keys.central.key_id)
                try:
                    self.keys.outer.public.verify(msg.signature, transcript)
                except InvalidSignature:
                    return m.Error(code="bad_signature", detail="", retry_after=None)
                authenticated = True
                return m.AuthOk()
            if not authenticated:
                return m.Error(code="auth_required", detail="", retry_after=None)
            if isinstance(msg, m.FetchService):
                if msg.service != "dxf":
                    return m.Error(code="unknown_service", detail=msg.service, retry_after=None)
                bundle = b"" if msg.have_version == self.bundle_version else self.bundle
                return m.Service(sealed_bundle=bundle, sealed_licence=self.licences)
            if isinstance(msg, m.Sync):
                self._sync_version += 1
                meta = sealed(self.keys, Kind.SYNC_METADATA, GATEWAY, self._sync_version, b"meta")
                self.since_versions.append(msg.since_version)
                # as central: the set the gateway names as held is listed, not resent
                held = msg.since_version == LICENCE_VERSION
                return m.SyncData(sealed=meta, sealed_licences=b"" if held else self.licences)
            if isinstance(msg, m.UsageReport):
                ack = sealed(self.keys, Kind.USAGE_ACK, GATEWAY, 1, b"ack")
                return m.UsageAck(batch_id="b1", sealed_ack=ack)
            if isinstance(msg, m.Status):
                return m.StatusReport(fields={"gateway": GATEWAY})
            return m.Error(code="unsupported", detail=msg.KIND.name, retry_after=None)

        try:
            with contextlib.suppress(OptogateError):
                await link.serve(handler)
        finally:
            self.open_connections -= 1
            with contextlib.suppress(OptogateError):
                await link.aclose()
            self._tasks.discard(task)


class _Mutable:
    """A transport that drops everything both ways while the peer is muted."""

    def __init__(self, inner: StreamTransport, peer: CentralPeer) -> None:
        self._inner = inner
        self._peer = peer
        self.name = inner.name

    async def read(self) -> bytes:
        while True:
            data = await self._inner.read()
            if not data or not self._peer.muted:
                return data

    async def write(self, data: bytes) -> None:
        if not self._peer.muted:
            await self._inner.write(data)

    async def aclose(self) -> None:
        await self._inner.aclose()
