"""A real central in a temporary directory, for tests and the benchmark.

:func:`make_central` runs the same steps an operator does — ``keys
init-central``, ``central init``, ``customer add``, ``keys gateway`` +
``gateway register``, ``bundle build --sign-key`` + ``service publish``,
``licence issue``, ``client-key issue`` — through the library calls the CLI
uses, and returns the paths and keys a test needs to act as a gateway.
Nothing is faked: the keys, certificates, bundle and database are real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from central_stub import admin
from central_stub.app import init_state
from central_stub.config import CentralConfig, for_state_dir
from central_stub.repository import TinyRepository
from firmware.common.crypto.keys import RecipientKey, SigningKey, VerifyKey
from provisioning.bundle import build_bundle
from provisioning.keys_cli import init_central, make_gateway

#: The smallest reference service: its directory holds manifest.toml and echo.py.
ECHO_DIR = Path(__file__).resolve().parent.parent / "provisioning" / "reference" / "echo"
#: The test licence starts this long before ``now`` and ends this long after.
LICENCE_BEFORE = 30 * 86400
LICENCE_AFTER = 335 * 86400


@dataclass(frozen=True)
class GatewayKeys:
    """The private keys of one provisioned gateway (what its two modules hold)."""

    name: str
    directory: Path
    outer: SigningKey
    inner_signing: SigningKey
    inner_hpke: RecipientKey


@dataclass
class TempCentral:
    """A central initialised under ``root``; see :func:`make_central`."""

    root: Path
    config: CentralConfig
    key: SigningKey
    repo: TinyRepository
    bundle: bytes
    gateways: dict[str, GatewayKeys] = field(default_factory=dict)
    api_keys: dict[str, str] = field(default_factory=dict)

    @property
    def public(self) -> VerifyKey:
        """Central's public key (what every gateway image carries)."""
        return self.key.public

    @property
    def ca_cert(self) -> Path:
        """Central's CA certificate: what an outer module pins."""
        return self.config.tls_dir / "ca.crt"

    def add_gateway(
        self, name: str, customer: str, *, now: int, register: bool = True
    ) -> GatewayKeys:
        """Provision gateway ``name`` (and register it for ``customer`` unless told not to)."""
        out = self.root / "gateways" / name
        make_gateway(name, out, self.root / "keys" / "central.pub", dns_names=[], ip_addresses=[])
        keys = GatewayKeys(
            name=name,
            directory=out,
            outer=SigningKey.load(out / "outer" / "signing.key"),
            inner_signing=SigningKey.load(out / "inner" / "signing.key"),
            inner_hpke=RecipientKey.load(out / "inner" / "hpke.key"),
        )
        if register:
            admin.register_gateway(
                self.repo,
                (out / "gateway.json").read_bytes(),
                customer,
                central_key_id=self.key.key_id,
                now=now,
                actor="test",
            )
        self.gateways[name] = keys
        return keys


def make_central(root: Path, *, now: int, gateways: int = 1, customer: str = "acme") -> TempCentral:
    """Return a central under ``root`` with one customer, ``gateways`` gateways
    (``gw1``...), the echo service published and licensed around ``now``, and one
    client key.  Raises whatever the operator's commands would.
    """
    keys_dir = root / "keys"
    key = init_central(keys_dir)
    state = root / "state"
    config = for_state_dir(state)
    state.mkdir(mode=0o700)
    (state / "central.key").write_bytes((keys_dir / "central.key").read_bytes())
    (state / "central.key").chmod(0o600)
    init_state(config, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    repo = TinyRepository(state)
    bundle = build_bundle(ECHO_DIR, key).to_bytes()
    central = TempCentral(root, config, key, repo, bundle)
    admin.add_customer(repo, customer, "ACME Corp", now=now, actor="test")
    admin.publish_service(repo, bundle, [key.public], now=now, actor="test")
    for i in range(1, gateways + 1):
        central.add_gateway(f"gw{i}", customer, now=now)
    admin.issue_licence(
        repo,
        customer_id=customer,
        service="echo",
        valid_from=now - LICENCE_BEFORE,
        valid_until=now + LICENCE_AFTER,
        gateway_id=None,
        now=now,
        actor="test",
    )
    issued = admin.issue_client_key(repo, customer, "test", now=now, actor="test")
    central.api_keys[issued.record.key_id] = issued.secret
    return central


def write_config(central: TempCentral, *, port: int = 0) -> Path:
    """Write a central.toml for ``central`` listening on 127.0.0.1:``port``; return its path."""
    path = central.root / "central.toml"
    path.write_text(
        "[central]\n"
        f"state_dir = {json.dumps(str(central.config.state_dir))}\n"
        'sync_expiry = "7d"\n'
        "\n[[listen]]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
    )
    return path
