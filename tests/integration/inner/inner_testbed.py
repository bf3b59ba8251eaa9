"""A test bench for the inner module: real keys, a real outer-side peer, a real daemon.

:class:`CentralPeer` plays the outer module *and* central behind it: a
SERVER-role :class:`~firmware.common.link.link.Link` over loopback TCP that
answers SYNC, FETCH_SERVICE and USAGE_REPORT with objects sealed by a test
central key to the gateway's real inner key - the protocol and the crypto
run unchanged, only the business logic of central is scripted here (it
publishes what the test says, stores usage batches by id once, signs acks).

What it does not model: the outer module's cache and dial-up, central's
database, a slow UART (the link runs as a stream).

:func:`provision` makes the gateway's keys with ``provisioning.keys_cli``
and writes an ``inner.toml``; :class:`DaemonRunner` runs
:class:`~firmware.inner.app.InnerDaemon` in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import os
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.common.adapters.tcp import StreamTransport, serve_tcp
from firmware.common.crypto.apikeys import IssuedApiKey, generate_api_key
from firmware.common.crypto.freshness import SyncMetadata
from firmware.common.crypto.keys import RecipientPublicKey, SigningKey, VerifyKey
from firmware.common.crypto.sealed import Kind, seal
from firmware.common.errors import OptogateError, RemoteError
from firmware.common.licence import Licence, LicenceSet
from firmware.common.link import messages
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from firmware.common.uplink import UsageAckPayload, encode_usage_ack, verify_usage_batch
from firmware.inner.app import InnerDaemon
from firmware.inner.config import load_config
from firmware.inner.observe import EventLog
from provisioning.bundle import Bundle, build_bundle, manifest_from_dict, pack
from provisioning.keys_cli import make_gateway

GW = "gw-test"
DAY = 86_400
REFERENCE = Path(__file__).resolve().parents[3] / "provisioning" / "reference"

ALGO = """
import time

def run(params, data):
    mode = params.get("mode", "echo")
    if mode == "sleep":
        time.sleep(params["seconds"])
    if mode == "crash":
        raise RuntimeError("secret internal detail")
    if mode == "refuse":
        raise ValueError("line 12: bad entity")
    if mode == "hang":
        while True:
            pass
    return {"params": params, "version": VERSION}, data
"""


def algo_bundle(name: str, version: int, *, timeout_s: float = 5.0) -> Bundle:
    """Return a Python test service whose ``run`` echoes, sleeps, crashes, refuses or hangs."""
    manifest = manifest_from_dict(
        {
            "name": name,
            "version": version,
            "runtime": "python",
            "entry": "algo:run",
            "description": f"test service {name} v{version}",
            "input_type": "application/octet-stream",
            "output_type": "application/octet-stream",
            "params": {
                "type": "object",
                "properties": {
                    "mode": {"enum": ["echo", "sleep", "crash", "refuse", "hang"]},
                    "seconds": {"type": "number", "minimum": 0, "maximum": 30},
                    "text": {"type": "string"},
                },
                "additionalProperties": True,
            },
            "limits": {"timeout_s": timeout_s, "memory_mb": 256, "max_result_bytes": 1 << 24},
        }
    )
    code = ALGO + f"\nVERSION = {version}\n"
    return pack(manifest, {"algo.py": code.encode()})


@dataclass
class Provisioned:
    """A provisioned gateway on disk and the test central's keys."""

    root: Path
    keys: Path
    state: Path
    config: Path
    ca_file: Path
    central: SigningKey
    inner_pub: RecipientPublicKey
    inner_sign: VerifyKey
    api_port: int


def free_port() -> int:
    """Return a TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provision(
    link_port: int, *, extra: str = "", pool_size: int = 1, link: str = ""
) -> Provisioned:
    """Make keys and an inner.toml in a fresh directory the sandbox user can traverse."""
    root = Path(tempfile.mkdtemp(prefix="optogate-inner-"))
    root.chmod(0o755)
    central = SigningKey.generate()
    central.save(root / "central.key")
    central.public.save(root / "central.pub")
    make_gateway(
        GW,
        root / "gw",
        root / "central.pub",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1),
    )
    keys = root / "gw" / "inner"
    port = free_port()
    config = root / "inner.toml"
    config.write_text(
        f"""
[gateway]
keys_dir = "gw/inner"
state_dir = "state"

[api]
host = "127.0.0.1"
port = {port}
max_body_bytes = 1048576
body_idle_timeout_s = 2.0
max_auth_failures = 5
auth_window_s = 60.0
auth_block_s = 30.0

[link]
{link or f'transport = "tcp"{chr(10)}address = "127.0.0.1:{link_port}"'}
fetch_timeout_s = 10.0
sync_timeout_s = 5.0
payment_sync_wait_s = 3.0
sync_interval_s = 3600.0
usage_interval_s = 3600.0
retry_after_s = 2.0

[runtime]
pool_size = {pool_size}

{extra}
"""
    )
    return Provisioned(
        root=root,
        keys=keys,
        state=root / "state",
        config=config,
        ca_file=keys / "tls-ca.crt",
        central=central,
        inner_pub=RecipientPublicKey.load(keys / "hpke.pub"),
        inner_sign=VerifyKey.load(keys / "signing.pub"),
        api_port=port,
    )


def cleanup(p: Provisioned) -> None:
    """Remove the gateway's directory."""
    shutil.rmtree(p.root, ignore_errors=True)


@dataclass
class Published:
    """A service central publishes: its bundle (encoded) and bundle object version."""

    raw: bytes
    version: int


@dataclass
class CentralPeer:
    """The outer module + central, scripted (see the module docstring)."""

    gw: Provisioned
    window: int = 7 * DAY
    services: dict[str, Published] = field(default_factory=dict)
    licences: list[Licence] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    batches: dict[str, bytes] = field(default_factory=dict)
    batch_sends: list[str] = field(default_factory=list)
    fetch_delay: float = 0.0
    # "", "bundle-bit", "wrong-recipient", "rollback", "no-ack-signature",
    # "strip-licences" (a sync sends the metadata without the licence set it lists),
    # "claim-unchanged" (a sync asked with any since_version but 0 sends no set)
    tamper: str = ""
    since_versions: list[int] = field(default_factory=list)  # of every Sync, in order
    ack_usage: bool = True
    replay_bundle: bytes = b""  # served instead of the current bundle (a replay attack)
    replay_metadata: bytes = b""  # served instead of fresh metadata
    port: int = 0
    _meta_version: int = 0
    _set_version: int = 0
    _lic_set: bytes = b""
    _server: asyncio.Server | None = None
    _links: set[Link] = field(default_factory=set)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _sealed_bundles: dict[str, bytes] = field(default_factory=dict)

    # -- what central publishes ---------------------------------------------

    def now(self) -> int:
        return int(time.time())

    def _seal(self, payload: bytes, kind: Kind, subject: str, version: int, **kw: Any) -> bytes:
        recipient = kw.pop("recipient", self.gw.inner_pub)
        now = self.now()
        return seal(
            payload,
            kind=kind,
            subject=subject,
            version=version,
            created=now,
            expires=kw.pop("expires", now + self.window),
            issuer=self.gw.central,
            recipient=recipient,
        )

    def publish(self, bundle: Bundle) -> None:
        """Publish (or republish, newer) a bundle; version = its manifest version."""
        raw = bundle.to_bytes()
        version = bundle.manifest.version
        self.services[bundle.manifest.name] = Published(raw, version)
        self._sealed_bundles[bundle.manifest.name] = self._seal(
            raw, Kind.BUNDLE, bundle.manifest.name, version
        )

    def grant(
        self,
        service: str,
        key: IssuedApiKey,
        *,
        lic_id: str | None = None,
        customer: str = "acme",
        valid_from: int | None = None,
        valid_until: int | None = None,
    ) -> str:
        """Add or replace a licence; return its id."""
        lic_id = lic_id or f"L-{service}-{len(self.licences) + 1}"
        old = [x for x in self.licences if x.licence_id == lic_id]
        version = (old[0].version + 1) if old else 1
        self.licences = [x for x in self.licences if x.licence_id != lic_id]
        self.licences.append(
            Licence(
                lic_id,
                customer,
                GW,
                service,
                self.now() - DAY if valid_from is None else valid_from,
                self.now() + 30 * DAY if valid_until is None else valid_until,
                frozenset({key.key_hash}),
                version,
            )
        )
        self._lic_set = b""
        return lic_id

    def revoke(self, lic_id: str) -> None:
        self.revoked.add(lic_id)
        self._lic_set = b""

    def licence_set(self) -> bytes:
        if not self._lic_set:
            self._set_version += 1
            payload = LicenceSet(GW, tuple(self.licences), frozenset(self.revoked)).to_payload()
            self._lic_set = self._seal(payload, Kind.LICENCE_SET, GW, self._set_version)
        return self._lic_set

    def metadata(self) -> bytes:
        objects = [self.licence_set(), *self._sealed_bundles.values()]
        meta = SyncMetadata.listing(GW, objects, self.gw.central.public)
        self._meta_version += 1
        return self._seal(meta.to_payload(), Kind.SYNC_METADATA, GW, self._meta_version)

    # -- the link -------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    async def handle(self, msg: messages.Message) -> messages.Message | None:
        if isinstance(msg, messages.Sync):
            self._count("sync")
            self.since_versions.append(msg.since_version)
            meta = self.replay_metadata or self.metadata()
            # as central: the set the gateway says it holds is listed, not resent
            unchanged = msg.since_version == self._set_version or (
                self.tamper == "claim-unchanged" and msg.since_version != 0
            )
            licences = self.licence_set()
            if unchanged or self.tamper == "strip-licences":
                licences = b""
            return messages.SyncData(sealed=meta, sealed_licences=licences)
        if isinstance(msg, messages.FetchService):
            self._count("fetch")
            if self.fetch_delay:
                await asyncio.sleep(self.fetch_delay)
            if msg.service not in self.services:
                raise RemoteError("unknown_service", msg.service)
            return messages.Service(
                sealed_bundle=self._bundle_for(msg.service), sealed_licence=self.licence_set()
            )
        if isinstance(msg, messages.UsageReport):
            self._count("usage")
            batch = verify_usage_batch(msg.batch, self.gw.inner_sign)
            self.batch_sends.append(batch.batch_id)
            if batch.batch_id in self.batches:
                assert self.batches[batch.batch_id] == msg.batch, "same id, other bytes"
            self.batches[batch.batch_id] = msg.batch
            if not self.ack_usage:
                raise RemoteError("central_unreachable", "no ack today", 1.0)
            ack = encode_usage_ack(
                UsageAckPayload(
                    GW, batch.batch_id, hashlib.sha256(msg.batch).digest(), len(batch.records)
                )
            )
            sealed = (
                b"" if self.tamper == "no-ack-signature" else self._seal(ack, Kind.USAGE_ACK, GW, 1)
            )
            return messages.UsageAck(batch_id=batch.batch_id, sealed_ack=sealed)
        raise RemoteError("unsupported", msg.KIND.name)

    def sealed_bundle(self, service: str) -> bytes:
        """The sealed bundle central serves now (tests keep it to replay it later)."""
        return self._sealed_bundles[service]

    def _bundle_for(self, service: str) -> bytes:
        if self.replay_bundle:
            return self.replay_bundle
        sealed = self._sealed_bundles[service]
        if self.tamper == "bundle-bit":
            mid = len(sealed) // 2
            return sealed[:mid] + bytes([sealed[mid] ^ 1]) + sealed[mid + 1 :]
        if self.tamper == "wrong-recipient":
            from firmware.common.crypto.keys import RecipientKey

            pub = self.services[service]
            return self._seal(
                pub.raw, Kind.BUNDLE, service, pub.version, recipient=RecipientKey.generate().public
            )
        return sealed

    def records(self) -> list[Any]:
        """Every usage record central stored (each batch id counted once)."""
        out = []
        for blob in self.batches.values():
            out.extend(verify_usage_batch(blob, self.gw.inner_sign).records)
        return out

    async def start(self, port: int = 0) -> None:
        async def on_connect(transport: StreamTransport) -> None:
            link = Link(transport, SessionConfig(role=Role.SERVER, baud=None))
            self._links.add(link)
            try:
                await link.serve(self.handle)
            except OptogateError:
                pass
            finally:
                self._links.discard(link)
                with contextlib.suppress(OptogateError):
                    await link.aclose()

        self._server = await serve_tcp("127.0.0.1", port or self.port, on_connect)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Power the outer module off: stop listening, drop every link."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            with contextlib.suppress(OptogateError):
                await link.aclose()
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None


class DaemonRunner:
    """Runs :class:`InnerDaemon` in the current loop; ``log`` collects its lines."""

    def __init__(self, gw: Provisioned) -> None:
        self.gw = gw
        self.out = io.StringIO()
        self.daemon = InnerDaemon(load_config(gw.config), log=EventLog(self.out))
        self.task: asyncio.Task[int] | None = None
        self.url = f"https://127.0.0.1:{gw.api_port}"

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.daemon.run())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.task.done():
                self.task.result()
            if '"event":"started"' in self.out.getvalue():
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("the daemon did not start")

    async def stop(self) -> int:
        if self.task is None:
            return 0
        self.daemon.stop(0, "test over")
        async with asyncio.timeout(20):
            return await self.task

    def events(self, name: str) -> list[str]:
        return [line for line in self.out.getvalue().splitlines() if f'"event":"{name}"' in line]

    async def wait_for(self, cond: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.02)


def ssl_context(gw: Provisioned) -> ssl.SSLContext:
    """Return a client context pinning the gateway's CA, TLS 1.3."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@contextlib.contextmanager
def provisioned(
    link_port: int, extra: str = "", pool_size: int = 1, link: str = ""
) -> Iterator[Provisioned]:
    gw = provision(link_port, extra=extra, pool_size=pool_size, link=link)
    try:
        yield gw
    finally:
        cleanup(gw)


@dataclass
class Bed:
    """What the inner tests get: a gateway, its peer, its daemon, a licensed key, a client."""

    gw: Provisioned
    peer: CentralPeer
    daemon: DaemonRunner
    key: IssuedApiKey
    http: Any

    def auth(self, key: IssuedApiKey | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {(key or self.key).secret}"}


@dataclass
class Gateway:
    """What the client-library tests get: a running gateway and its licensed key."""

    gw: Provisioned
    peer: CentralPeer
    daemon: DaemonRunner
    key: IssuedApiKey
    url: str


__all__ = [
    "GW",
    "Bed",
    "Gateway",
    "REFERENCE",
    "CentralPeer",
    "DaemonRunner",
    "Provisioned",
    "algo_bundle",
    "build_bundle",
    "free_port",
    "generate_api_key",
    "provisioned",
    "ssl_context",
]


class DaemonProcess:
    """Runs ``optogate inner run`` as a child process (for kill -9 tests)."""

    def __init__(self, gw: Provisioned, env: dict[str, str] | None = None) -> None:
        self.gw = gw
        self.env = env
        self.url = f"https://127.0.0.1:{gw.api_port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = gw.root / "daemon.log"

    async def start(self) -> None:
        import sys

        with self.log_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import sys; from host_tools.cli import main; sys.exit(main())",
                "inner",
                "run",
                "--config",
                str(self.gw.config),
                stdout=out,
                stderr=out,
                env={**os.environ, **(self.env or {})},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-2000:]}")
            if self.log_path.read_text().count('"event":"started"') > self.starts:
                self.starts += 1
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the daemon did not start")

    starts = 0

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            async with asyncio.timeout(20):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise TimeoutError(f"daemon did not stop: {self.log()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text()
