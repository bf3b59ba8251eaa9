"""gateway.json as central reads it: the CLI's output parses; every inconsistency is refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.keys import RecipientKey, SigningKey
from provisioning.gateway_file import (
    GatewayFileError,
    parse_gateway_description,
    read_gateway_description,
)
from provisioning.keys_cli import init_central, make_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("gw")
    init_central(root / "central")
    desc = make_gateway(
        "gw-3",
        root / "out",
        root / "central" / "central.pub",
        dns_names=["gw-3.lan"],
        ip_addresses=["192.0.2.3"],
        pq=True,
    )
    return root, desc


def test_cli_output_parses(made: tuple[Path, dict[str, object]]) -> None:
    root, _ = made
    d = read_gateway_description(root / "out" / "gateway.json")
    assert d.gateway == "gw-3"
    assert d.inner_hpke == RecipientKey.load(root / "out" / "inner" / "hpke.key").public
    assert d.inner_signing == SigningKey.load(root / "out" / "inner" / "signing.key").public
    assert d.outer_signing == SigningKey.load(root / "out" / "outer" / "signing.key").public
    assert d.central_key_id == SigningKey.load(root / "central" / "central.key").key_id
    assert d.tls_dns == ("gw-3.lan",)
    assert d.tls_ip == ("192.0.2.3",)
    assert d.tls_ca_cert_pem == (root / "out" / "ca" / "ca.crt").read_bytes()


def _set(path: list[str], value: object) -> Callable[[dict[str, object]], None]:
    def mutate(doc: dict[str, object]) -> None:
        node: dict[str, object] = doc
        for key in path[:-1]:
            child = node[key]
            assert isinstance(child, dict)
            node = child
        node[path[-1]] = value

    return mutate


OTHER_ED = base64.b64encode(SigningKey.generate().public.raw).decode()
OTHER_X = base64.b64encode(RecipientKey.generate().public.raw).decode()


@pytest.mark.parametrize(
    "mutate",
    [
        _set(["format"], 2),
        _set(["gateway"], "Not A Label"),
        _set(["provisioned_at"], -1),
        _set(["provisioned_at"], "2026"),
        _set(["central_key_id"], "xyz"),
        _set(["inner", "hpke", "public"], OTHER_X),
        _set(["inner", "hpke", "public"], "%%%"),
        _set(["inner", "hpke", "suite"], "X25519_HKDF_SHA256_CHACHA20POLY1305"),
        _set(["inner", "hpke", "key_id"], "0" * 32),
        _set(["inner", "signing", "public"], OTHER_ED),
        _set(["inner", "signing", "public"], base64.b64encode(b"short").decode()),
        _set(["outer", "signing", "public"], OTHER_ED),
        _set(["outer"], "nope"),
        _set(["inner", "tls", "ca_cert_pem"], "not a certificate"),
        _set(["inner", "tls", "ca_fingerprint_sha256"], "0" * 64),
        _set(["inner", "tls", "dns"], "gw-3.lan"),
        _set(["inner", "tls", "ip"], [3]),
    ],
)
def test_inconsistent_descriptions_refused(
    made: tuple[Path, dict[str, object]], mutate: Callable[[dict[str, object]], None]
) -> None:
    root, _ = made
    doc = json.loads((root / "out" / "gateway.json").read_text())
    mutate(doc)
    with pytest.raises(GatewayFileError):
        parse_gateway_description(json.dumps(doc).encode())


def test_same_key_twice_refused(made: tuple[Path, dict[str, object]]) -> None:
    root, _ = made
    doc = json.loads((root / "out" / "gateway.json").read_text())
    doc["outer"]["signing"] = doc["inner"]["signing"]
    with pytest.raises(GatewayFileError, match="twice"):
        parse_gateway_description(json.dumps(doc).encode())


def test_missing_or_huge_file(tmp_path: Path) -> None:
    with pytest.raises(GatewayFileError):
        read_gateway_description(tmp_path / "absent.json")
    (tmp_path / "big.json").write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(GatewayFileError, match="too large"):
        read_gateway_description(tmp_path / "big.json")


@given(st.binary(max_size=300) | st.just(b"[" * 100_000))
def test_garbage_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(GatewayFileError):
        parse_gateway_description(data)
