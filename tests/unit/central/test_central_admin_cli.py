"""``optogate central`` admin commands end to end on a temporary central, every error case."""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from central_stub import admin
from central_stub.cli import main
from central_stub.errors import InvalidInput
from central_stub.repository import TinyRepository
from firmware.common.crypto.apikeys import hash_api_key
from firmware.common.crypto.keys import SigningKey
from provisioning.bundle import build_bundle
from provisioning.keys_cli import init_central, make_gateway

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

ECHO = Path(__file__).resolve().parents[3] / "provisioning" / "reference" / "echo"

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    init_central(tmp_path / "state")
    return tmp_path / "state"


@pytest.fixture
def run(state: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    def _run(*args: str) -> tuple[int, str, str]:
        rc = main([*args, "--state", str(state)], "optogate central")
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


def _db(state: Path) -> bytes:
    return (state / "central.json").read_bytes()


def _refused(run: Run, state: Path, *args: str, says: str) -> None:
    """The command fails with exit 1, says why, and writes nothing."""
    before = _db(state)
    stamp = (state / "central.json").stat().st_mtime_ns
    rc, out, err = run(*args)
    assert rc == 1, (out, err)
    assert says in err
    assert _db(state) == before
    assert (state / "central.json").stat().st_mtime_ns == stamp


@pytest.fixture
def ready(run: Run, state: Path, tmp_path: Path) -> dict[str, Path]:
    """A central with customer acme, gateway gw1, the echo bundle published."""
    assert run("init")[0] == 0
    assert run("customer", "add", "acme", "--name", "ACME Corp")[0] == 0
    make_gateway("gw1", tmp_path / "gw1", state / "central.pub", dns_names=[], ip_addresses=[])
    rc, _, err = run("gateway", "register", str(tmp_path / "gw1" / "gateway.json"),
                     "--customer", "acme")  # fmt: skip
    assert rc == 0, err
    bundle = tmp_path / "echo.ogb"
    bundle.write_bytes(build_bundle(ECHO, SigningKey.load(state / "central.key")).to_bytes())
    assert run("service", "publish", str(bundle))[0] == 0
    return {"bundle": bundle, "gw1": tmp_path / "gw1" / "gateway.json"}


def test_init_makes_state_tls_and_refuses_twice(run: Run, state: Path) -> None:
    rc, out, _ = run("init")
    assert rc == 0
    assert "central_key_id" in out
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert (state / "tls" / name).exists()
    assert (state / "tls" / "server.key").stat().st_mode & 0o077 == 0
    assert state.stat().st_mode & 0o077 == 0
    rc, _, err = run("init")
    assert rc == 1
    assert "already initialised" in err


def test_init_without_signing_key_and_commands_before_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    assert main(["init", "--state", str(empty)], "c") == 1
    assert "keys init-central" in capsys.readouterr().err
    assert main(["customer", "list", "--state", str(empty)], "c") == 1
    assert "not initialised" in capsys.readouterr().err
    assert main(["customer", "list"], "c") == 1
    assert "--state" in capsys.readouterr().err


def test_customers(run: Run, state: Path, ready: dict[str, Path]) -> None:
    _refused(run, state, "customer", "add", "acme", "--name", "Again", says="already exists")
    _refused(run, state, "customer", "add", "Bad_Id", "--name", "x", says="must be")
    _refused(run, state, "customer", "add", "beta", "--name", "", says="name must be")
    rc, out, _ = run("customer", "list")
    assert rc == 0
    assert "ACME Corp" in out


def test_gateway_register_errors_and_idempotence(
    run: Run, state: Path, ready: dict[str, Path], tmp_path: Path
) -> None:
    rc, out, _ = run("gateway", "register", str(ready["gw1"]), "--customer", "acme")
    assert rc == 0  # the same keys again: a no-op
    make_gateway("gw2", tmp_path / "gw2", state / "central.pub", dns_names=[], ip_addresses=[])
    gw2 = str(tmp_path / "gw2" / "gateway.json")
    _refused(
        run, state, "gateway", "register", gw2, "--customer", "nobody", says="unknown customer"
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    _refused(run, state, "gateway", "register", str(garbage), "--customer", "acme",
             says="not a gateway.json")  # fmt: skip
    _refused(run, state, "gateway", "register", str(tmp_path / "missing.json"),
             "--customer", "acme", says="cannot read")  # fmt: skip
    # provisioned for another central
    other = tmp_path / "other"
    init_central(other)
    make_gateway("gw3", tmp_path / "gw3", other / "central.pub", dns_names=[], ip_addresses=[])
    _refused(run, state, "gateway", "register", str(tmp_path / "gw3" / "gateway.json"),
             "--customer", "acme", says="provisioned for central key")  # fmt: skip
    # a key that does not match its id
    doc = json.loads((tmp_path / "gw2" / "gateway.json").read_text())
    doc["outer"]["signing"]["key_id"] = "0" * 32
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    _refused(run, state, "gateway", "register", str(tampered), "--customer", "acme",
             says="does not match its key id")  # fmt: skip
    # the same name with other keys
    make_gateway("gw1", tmp_path / "gw1b", state / "central.pub", dns_names=[], ip_addresses=[])
    _refused(run, state, "gateway", "register", str(tmp_path / "gw1b" / "gateway.json"),
             "--customer", "acme", says="already registered")  # fmt: skip
    _refused(run, state, "gateway", "revoke", "gw9", says="unknown gateway")
    assert run("gateway", "revoke", "gw1")[0] == 0
    _refused(run, state, "gateway", "revoke", "gw1", says="already revoked")
    rc, out, _ = run("gateway", "list")
    assert "gw1" in out
    assert "acme" in out


def test_publish_refuses_tampered_unsigned_and_untrusted_bundles(
    run: Run, state: Path, ready: dict[str, Path], tmp_path: Path
) -> None:
    rc, out, _ = run("service", "publish", str(ready["bundle"]))
    assert rc == 0
    assert "already published" in out
    audit_before = len(TinyRepository(state).snapshot().list_audit())

    def refused_and_audited(path: Path, says: str) -> None:
        rc, _, err = run("service", "publish", str(path))
        assert rc == 1
        assert says in err
        repo = TinyRepository(state)
        assert [b.version for b in repo.snapshot().list_bundles()] == [1]
        last = repo.snapshot().list_audit()[-1]
        assert (last.action, last.ok) == ("service.publish", False)

    data = bytearray(ready["bundle"].read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "tampered.ogb"
    tampered.write_bytes(bytes(data))
    refused_and_audited(tampered, "bundle refused")
    unsigned = tmp_path / "unsigned.ogb"
    unsigned.write_bytes(build_bundle(ECHO).to_bytes())
    refused_and_audited(unsigned, "not signed")
    vendor = SigningKey.generate()
    foreign = tmp_path / "foreign.ogb"
    foreign.write_bytes(build_bundle(ECHO, vendor).to_bytes())
    refused_and_audited(foreign, "not a trusted publisher key")
    assert len(TinyRepository(state).snapshot().list_audit()) == audit_before + 3

    # the same version with other content: a conflict, nothing written
    src = tmp_path / "echo2"
    shutil.copytree(ECHO, src)
    (src / "echo.py").write_text((src / "echo.py").read_text() + "\n# changed\n")
    changed = tmp_path / "changed.ogb"
    changed.write_bytes(build_bundle(src, SigningKey.load(state / "central.key")).to_bytes())
    _refused(run, state, "service", "publish", str(changed), says="already published with other")
    # a vendor key named on the command line is trusted; a newer version publishes
    manifest = (src / "manifest.toml").read_text()
    (src / "manifest.toml").write_text(manifest.replace("version = 1", "version = 2", 1))
    vendor.public.save(tmp_path / "vendor.pub")
    newer = tmp_path / "newer.ogb"
    newer.write_bytes(build_bundle(src, vendor).to_bytes())
    rc, out, err = run(
        "service", "publish", str(newer), "--verify-key", str(tmp_path / "vendor.pub")
    )
    assert rc == 0, err
    assert "version 2 published" in out
    _refused(run, state, "service", "publish", str(ready["bundle"]).replace("echo", "nothere"),
             says="cannot read")  # fmt: skip
    rc, out, _ = run("service", "list")
    assert "echo" in out


def test_licences_payments_and_revocation(run: Run, state: Path, ready: dict[str, Path]) -> None:
    issue = ("licence", "issue", "--customer", "acme", "--service", "echo")
    rc, out, err = run(*issue, "--from", "2026-01-01", "--until", "2026-06-30")
    assert rc == 0, err
    assert "lic-000001" in out
    _refused(run, state, *issue, "--from", "2026-06-01", "--until", "2026-12-31",
             says="overlaps licence lic-000001")  # fmt: skip
    _refused(run, state, *issue, "--from", "2026-02-30", "--until", "2026-12-31", says="bad date")
    _refused(run, state, *issue, "--from", "2026-01-01T00:00", "--until", "2027-01-01",
             says="needs a zone")  # fmt: skip
    _refused(run, state, *issue, "--from", "2027-12-01", "--until", "2027-01-01",
             says="after --until")  # fmt: skip
    _refused(run, state, "licence", "issue", "--customer", "zed", "--service", "echo",
             "--from", "2027-01-01", "--until", "2027-02-01", says="unknown customer")  # fmt: skip
    _refused(run, state, "licence", "issue", "--customer", "acme", "--service", "nope",
             "--from", "2027-01-01", "--until", "2027-02-01", says="unknown service")  # fmt: skip
    _refused(run, state, *issue, "--gateway", "gw9", "--from", "2027-01-01",
             "--until", "2027-02-01", says="unknown gateway")  # fmt: skip
    rc, out, _ = run(*issue, "--from", "2026-07-01", "--until", "2026-07-31", "--gateway", "gw1")
    assert rc == 0
    assert "lic-000002" in out

    # payment: extends from the later of the end and now, bumps the version
    pay = ("payment", "record", "--licence", "lic-000001", "--amount", "120.50")
    _refused(run, state, *pay, "--extend", "30d", says="overlap licence lic-000002")
    _refused(run, state, "payment", "record", "--licence", "lic-9", "--amount", "1",
             "--extend", "1d", says="unknown licence")  # fmt: skip
    _refused(run, state, *pay[:-1], "-3", "--extend", "1d", says="positive")
    _refused(run, state, *pay[:-1], "1.001", "--extend", "1d", says="two decimals")
    _refused(run, state, *pay[:-1], "abc", "--extend", "1d", says="bad amount")
    _refused(run, state, *pay, "--extend", "30x", says="bad duration")
    _refused(run, state, *pay, "--extend", "1d", "--currency", "eur", says="currency")
    unpaid = TinyRepository(state).snapshot().get_licence("lic-000002")
    assert unpaid is not None
    rc, out, err = run("payment", "record", "--licence", "lic-000002", "--amount", "99",
                       "--extend", "30d")  # fmt: skip
    assert rc == 0, err
    lic = TinyRepository(state).snapshot().get_licence("lic-000002")
    assert lic is not None
    base = max(admin.parse_time("2026-07-31", end_of_day=True), int(time.time()))
    assert abs(lic.valid_until - (base + 30 * 86400)) <= 5
    assert lic.version > unpaid.version
    payments = TinyRepository(state).snapshot().list_payments("lic-000002")
    assert [(p.amount_minor, p.currency) for p in payments] == [(9900, "EUR")]

    assert run("licence", "revoke", "lic-000002")[0] == 0
    _refused(run, state, "licence", "revoke", "lic-000002", says="already revoked")
    _refused(run, state, "licence", "revoke", "lic-404", says="unknown licence")
    _refused(run, state, "payment", "record", "--licence", "lic-000002", "--amount", "1",
             "--extend", "1d", says="revoked")  # fmt: skip
    rc, out, _ = run("licence", "list", "--customer", "acme")
    assert "lic-000001" in out
    assert "lic-000002" in out


def test_client_key_is_printed_once_and_stored_as_hash(
    run: Run, state: Path, ready: dict[str, Path]
) -> None:
    rc, out, _ = run("client-key", "issue", "--customer", "acme", "--label", "CAD workstation")
    assert rc == 0
    secret = out.split("(shown once): ")[1].split()[0]
    assert secret.startswith("og_live_")
    assert secret.encode() not in _db(state)
    keys = TinyRepository(state).snapshot().list_client_keys("acme")
    assert keys[0].key_hash == hash_api_key(secret)
    _refused(run, state, "client-key", "issue", "--customer", "zed", says="unknown customer")
    rc, out, _ = run("client-key", "list")
    assert "key-000001" in out
    assert secret not in out
    assert run("client-key", "revoke", "key-000001")[0] == 0
    _refused(run, state, "client-key", "revoke", "key-000001", says="already revoked")
    _refused(run, state, "client-key", "revoke", "key-404", says="unknown client key")


def test_usage_report_table_csv_and_errors(run: Run, state: Path, ready: dict[str, Path]) -> None:
    rc, out, _ = run("usage", "report", "--customer", "acme", "--month", "2026-11")
    assert rc == 0
    head = ["service", "licence", "gateway", "calls", "units", "failed", "seconds", "bytes_in",
            "bytes_out"]  # fmt: skip
    assert out.split() == head
    rc, out, _ = run("usage", "report", "--customer", "acme", "--month", "2026-11", "--csv")
    assert next(csv.reader(io.StringIO(out))) == head
    _refused(run, state, "usage", "report", "--customer", "acme", "--month", "2026-13",
             says="bad month")  # fmt: skip
    _refused(run, state, "usage", "report", "--customer", "zed", "--month", "2026-11",
             says="unknown customer")  # fmt: skip


def test_audit_lists_every_change(run: Run, state: Path, ready: dict[str, Path]) -> None:
    rc, out, _ = run("audit", "--csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["action"] for r in rows] == ["customer.add", "gateway.register", "service.publish"]
    assert all(r["result"] == "ok" for r in rows)
    rc, out, _ = run("audit", "--limit", "1")
    assert "service.publish" in out
    assert "customer.add" not in out
    _refused(run, state, "audit", "--limit", "0", says="at least 1")


def test_config_file_finds_state_and_key(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "central.toml"
    conf.write_text('[central]\nstate_dir = "state"\nsync_expiry = "3d"\n')
    assert main(["init", "--config", str(conf)], "c") == 0
    assert main(["customer", "add", "acme", "--name", "A", "--config", str(conf)], "c") == 0
    capsys.readouterr()
    conf.write_text('[central]\nstate_dir = "state"\nsync_expiry = "soon"\n')
    assert main(["customer", "list", "--config", str(conf)], "c") == 1
    assert "sync_expiry" in capsys.readouterr().err
    conf.write_text("[central\n")
    assert main(["customer", "list", "--config", str(conf)], "c") == 1
    assert "not valid TOML" in capsys.readouterr().err


@given(st.text(max_size=40))
def test_parsers_raise_only_invalid_input(text: str) -> None:
    for parse in (admin.parse_time, admin.parse_duration, admin.parse_amount, admin.parse_month):
        with contextlib.suppress(InvalidInput):
            parse(text)


@given(st.dates(min_value=datetime.date(1970, 1, 2)))
def test_dates_cover_whole_days(day: datetime.date) -> None:
    text = str(day)
    start, end = admin.parse_time(text), admin.parse_time(text, end_of_day=True)
    assert end - start == 86399
    assert admin.format_time(start).startswith(text)


def test_versions_keep_growing_after_a_restore_from_backup(tmp_path: Path) -> None:
    from central_stub.testing import make_central

    now = 1_780_000_000
    central = make_central(tmp_path, now=now)
    repo = central.repo
    backup = repo.path.read_bytes()
    lic = admin.record_payment(repo, licence_id="lic-000001", amount_minor=100, currency="EUR",
                               extend_seconds=86400, now=now + 60, actor="t")[1]  # fmt: skip
    revision = repo.snapshot().get_counter("licence_revision")
    repo.path.write_bytes(backup)  # the operator restores yesterday's copy
    again = admin.revoke_licence(repo, "lic-000001", now=now + 120, actor="t")
    assert again.version > lic.version
    assert repo.snapshot().get_counter("licence_revision") > revision
