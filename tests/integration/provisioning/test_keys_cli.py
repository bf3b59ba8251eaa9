"""``optogate keys`` end to end in a temporary directory."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from firmware.common.crypto.keys import RecipientKey, RecipientPublicKey, SigningKey, VerifyKey
from firmware.common.crypto.sealed import Kind, open_sealed, seal
from host_tools.cli import main as optogate
from provisioning.keys_cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).parents[3]
PROG = "optogate keys"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def central_dir(tmp_path: Path) -> Path:
    assert main(["init-central", str(tmp_path / "central")], PROG) == 0
    return tmp_path / "central"


def test_init_central(central_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.load(central_dir / "central.key")
    assert VerifyKey.load(central_dir / "central.pub") == key.public
    assert mode(central_dir / "central.key") == 0o600
    assert mode(central_dir / "central.pub") == 0o644
    assert mode(central_dir) == 0o700


def test_init_central_refuses_to_overwrite(
    central_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (central_dir / "central.key").read_bytes()
    assert main(["init-central", str(central_dir)], PROG) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (central_dir / "central.key").read_bytes() == before
    assert main(["init-central", str(central_dir), "--force"], PROG) == 0
    assert (central_dir / "central.key").read_bytes() != before


@pytest.mark.parametrize("pq", [False, True])
def test_gateway_end_to_end(central_dir: Path, tmp_path: Path, pq: bool) -> None:
    out = tmp_path / "gw"
    argv = [
        "gateway", "gw-7", "--out", str(out), "--central-pub", str(central_dir / "central.pub"),
        "--dns", "gw-7.acme.lan", "--dns", "optogate.local", "--ip", "192.0.2.10",
    ]  # fmt: skip
    assert main([*argv, "--pq"] if pq else argv, PROG) == 0

    inner, outer, ca = out / "inner", out / "outer", out / "ca"
    for d in (out, inner, outer, ca):
        assert mode(d) == 0o700
    private = [
        inner / "hpke.key",
        inner / "signing.key",
        inner / "tls.key",
        outer / "signing.key",
        ca / "ca.key",
    ]
    for p in private:
        assert mode(p) == 0o600, p
    assert sorted(p.name for p in outer.iterdir()) == [
        "central.pub",
        "identity.json",
        "signing.key",
        "signing.pub",
    ]

    # Nothing secret of the inner module (or the CA) is under outer/.
    inner_secrets = [p.read_bytes() for p in (*private[:3], ca / "ca.key")]
    for f in outer.iterdir():
        assert f.read_bytes() not in inner_secrets

    desc = json.loads((out / "gateway.json").read_text())
    central = VerifyKey.load(central_dir / "central.pub")
    hpke = RecipientKey.load(inner / "hpke.key")
    assert desc["gateway"] == "gw-7"
    assert desc["central_key_id"] == central.key_id
    assert VerifyKey.load(inner / "central.pub") == central
    assert VerifyKey.load(outer / "central.pub") == central
    assert desc["inner"]["hpke"]["key_id"] == hpke.key_id
    assert desc["inner"]["hpke"]["suite"] == hpke.suite.name
    assert ("MLKEM" in hpke.suite.name) == pq
    assert desc["inner"]["signing"]["key_id"] == SigningKey.load(inner / "signing.key").key_id
    assert desc["outer"]["signing"]["key_id"] == SigningKey.load(outer / "signing.key").key_id
    assert RecipientPublicKey.load(inner / "hpke.pub") == hpke.public
    identity = json.loads((inner / "identity.json").read_text())
    assert identity["gateway"] == "gw-7"
    assert identity["hpke_key_id"] == hpke.key_id
    assert identity["provisioned_at"] == desc["provisioned_at"]
    assert abs(identity["provisioned_at"] - time.time()) < 600
    outer_identity = json.loads((outer / "identity.json").read_text())
    assert outer_identity["signing_key_id"] == desc["outer"]["signing"]["key_id"]
    assert "hpke_key_id" not in outer_identity

    # Central, reading only gateway.json, can seal to the inner module.
    pub = RecipientPublicKey.from_raw(base64.b64decode(desc["inner"]["hpke"]["public"]))
    central_key = SigningKey.load(central_dir / "central.key")
    obj = seal(
        b"bundle", kind=Kind.BUNDLE, subject="s", version=1, created=0, expires=10,
        issuer=central_key, recipient=pub,
    )  # fmt: skip
    opened = open_sealed(obj, hpke, central, now=1, expected_kind=Kind.BUNDLE)
    assert opened.payload == b"bundle"

    # The TLS chain: server cert (then CA) in tls.crt, for the names asked.
    chain = x509.load_pem_x509_certificates((inner / "tls.crt").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    assert (inner / "tls-ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    chain[0].verify_directly_issued_by(ca_cert)
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw-7.acme.lan", "optogate.local"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert desc["inner"]["tls"]["ca_cert_pem"] == (ca / "ca.crt").read_text()


def test_gateway_refuses_to_overwrite_any_existing_file(
    central_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gw"
    out.mkdir()
    (out / "gateway.json").write_text("{}")
    argv = ["gateway", "gw-1", "--out", str(out), "--central-pub", str(central_dir / "central.pub")]
    assert main(argv, PROG) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert not (out / "inner").exists()  # nothing half-written
    assert main([*argv, "--force"], PROG) == 0
    first = (out / "inner" / "hpke.key").read_bytes()
    assert main(argv, PROG) == 1
    assert (out / "inner" / "hpke.key").read_bytes() == first
    desc = json.loads((out / "gateway.json").read_text())
    assert desc["inner"]["tls"]["dns"] == ["gw-1", "gw-1.local"]  # the default names


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ip", "not-an-ip"], "not an IP address"),
        (["--central-pub", "/nonexistent/central.pub"], "no key file"),
    ],
)
def test_gateway_bad_input(
    central_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["gateway", "gw-1", "--out", str(tmp_path / "g"), "--central-pub"]
    argv += [str(central_dir / "central.pub"), *extra]
    assert main(argv, PROG) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_gateway_name_must_be_a_dns_label(
    central_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("Bad_Name", "x-", "a" * 64, "a.b", ""):
        argv = ["gateway", name, "--out", str(tmp_path / "g"), "--central-pub"]
        assert main([*argv, str(central_dir / "central.pub")], PROG) == 1
    assert not (tmp_path / "g").exists()


def test_central_private_key_as_central_pub_is_refused(
    central_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["gateway", "gw-1", "--out", str(tmp_path / "g"), "--central-pub"]
    assert main([*argv, str(central_dir / "central.key")], PROG) == 1
    assert not (tmp_path / "g").exists()


def test_id_and_api_key(central_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.load(central_dir / "central.key")
    assert main(["id", str(central_dir / "central.pub")], PROG) == 0
    assert main(["id", str(central_dir / "central.key")], PROG) == 0
    assert capsys.readouterr().out.split() == [key.key_id, key.key_id]
    os.chmod(central_dir / "central.key", 0o644)
    assert main(["id", str(central_dir / "central.key")], PROG) == 1
    assert "chmod 600" in capsys.readouterr().err
    assert main(["api-key"], PROG) == 0
    out = capsys.readouterr().out
    assert "og_live_" in out
    assert "stored hash" in out


def test_registered_in_the_optogate_command(tmp_path: Path) -> None:
    assert optogate(["keys", "init-central", str(tmp_path / "c")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "keys", "id", str(tmp_path / "c" / "central.pub")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SigningKey.load(tmp_path / "c" / "central.key").key_id


def test_existing_output_directory_keeps_its_mode(central_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    argv = ["gateway", "gw-1", "--out", str(out), "--central-pub", str(central_dir / "central.pub")]
    assert main(argv, PROG) == 0
    assert mode(out) == 0o755
    assert mode(out / "inner") == 0o700
