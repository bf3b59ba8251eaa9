"""outer.toml parsing: defaults, relative paths, strict refusal of anything unknown."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from firmware.common.link.kinds import Kind
from firmware.outer.config import load_config, parse_config
from firmware.outer.errors import OuterConfigError
from firmware.outer.relay import allowed, status_fields

pytestmark = [pytest.mark.unit, pytest.mark.timeout(5)]

GOOD = """
[gateway]
keys_dir = "keys/outer"
state_dir = "state"

[optical]
transport = "tcp"
listen = "127.0.0.1:7300"

[uplink]
order = ["internet", "dialup"]
idle_hangup_s = 20
sync_interval_s = 1800.0

[internet]
host = "central.example.com"
port = 7443
ca = "central-ca.crt"
pin_sha256 = "AB:CD"

[dialup]
device = "/dev/ttyACM0"
number = "5551234"
"""


def parse(text: str, base: Path = Path("/etc/optogate")) -> object:
    return parse_config(tomllib.loads(text), base)


def test_good_config(tmp_path: Path) -> None:
    text = GOOD.replace('pin_sha256 = "AB:CD"', f'pin_sha256 = "{"AB:" * 31}AB"')
    (tmp_path / "outer.toml").write_text(text)
    cfg = load_config(tmp_path / "outer.toml")
    assert cfg.keys_dir == tmp_path / "keys/outer"
    assert cfg.cache_dir == tmp_path / "state" / "cache"
    assert cfg.optical_transport == "tcp" and cfg.optical_listen == ("127.0.0.1", 7300)
    assert cfg.policy.order == ("internet", "dialup")
    assert cfg.policy.idle_hangup == 20.0 and cfg.policy.sync_interval == 1800.0
    assert cfg.internet is not None and cfg.internet.ca == tmp_path / "central-ca.crt"
    assert cfg.internet.pin_sha256 == "ab" * 32
    assert cfg.dialup is not None and cfg.dialup.dialler.number == "5551234"
    assert cfg.dialup.dialler.max_attempts == 2


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("[gateway]", "[gatewya]"),
        ('state_dir = "state"', 'state_dir = "state"\ncolour = "blue"'),
        ('transport = "tcp"', 'transport = "carrier-pigeon"'),
        ('listen = "127.0.0.1:7300"', 'listen = "nowhere"'),
        ('order = ["internet", "dialup"]', 'order = ["internet", "smoke"]'),
        ('order = ["internet", "dialup"]', "order = [1]"),
        ("idle_hangup_s = 20", "idle_hangup_s = -1"),
        ("idle_hangup_s = 20", 'idle_hangup_s = "soon"'),
        ("idle_hangup_s = 20", "idle_hangup_s = true"),
        ("port = 7443", "port = 70000"),
        ('host = "central.example.com"', ""),
        ('pin_sha256 = "AB:CD"', 'pin_sha256 = "xyz"'),
        ('number = "5551234"', 'number = "555;ATH"'),
        ('number = "5551234"', ""),
    ],
)
def test_bad_config_names_the_problem(old: str, new: str) -> None:
    assert old in GOOD
    with pytest.raises(OuterConfigError):
        parse(GOOD.replace(old, new))


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(OuterConfigError):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_bytes(b"[gateway\n")
    with pytest.raises(OuterConfigError):
        load_config(tmp_path / "bad.toml")


def test_sim_gpio_needs_the_control_socket() -> None:
    with pytest.raises(OuterConfigError):
        parse(GOOD + '\n[gpio]\nbackend = "sim"\n')


def test_allowlist_is_exactly_the_inner_modules_requests() -> None:
    served = {k for k in Kind if allowed(k)}
    assert served == {Kind.FETCH_SERVICE, Kind.SYNC, Kind.USAGE_REPORT, Kind.STATUS}


def test_status_fields_fit_the_wire() -> None:
    fields: dict[str, str | int | float | bool] = {
        "ok": 1,
        "Bad-Key": 2,
        "long.text": "x" * 5000,
        "nan": float("nan"),
        **{f"k{i:03}": i for i in range(300)},
    }
    out = status_fields(fields)
    assert "Bad-Key" not in out and "nan" not in out
    assert len(str(out["long.text"])) == 1024
    assert len(out) == 256
