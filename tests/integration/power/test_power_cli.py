"""``optogate power``: loud configuration failures, and the whole chain as processes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.common.power.cli import load_config, main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

PROG = "optogate power"


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.skipif(importlib.util.find_spec("RPi") is not None, reason="RPi.GPIO is here")
def test_missing_rpi_gpio_is_exit_2_naming_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--backend", "rpigpio", "--seconds", "0.1"], PROG) == 2
    err = capsys.readouterr().err
    assert "RPi.GPIO" in err
    assert "rpi-lgpio" in err


def test_bad_config_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "inner.toml"
    bad.write_text("[gpio]\nbackend = 'sim'\ndebounce_ms = 500\n")
    assert main(["watch", "--config", str(bad), "--seconds", "0.1"], PROG) == 2
    assert "within 100 ms" in capsys.readouterr().err
    bad.write_text("[gpio\n")
    assert main(["leds", "idle", "--config", str(bad)], PROG) == 2


def test_config_file_gpio_table_and_backend_override(tmp_path: Path) -> None:
    path = tmp_path / "outer.toml"
    path.write_text("[gpio]\nbackend = 'rpigpio'\n[gpio.peer_power]\nbcm = 5\nactive = 'low'\n")
    config = load_config(path, "sim")
    assert config.backend == "sim"
    assert config.peer_power.bcm == 5


def test_watch_on_none_backend_says_nothing_is_sensed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--backend", "none", "--seconds", "0.05"], PROG) == 0
    out = lines(capsys.readouterr().out)
    assert out[0] == {
        "event": "started",
        "backend": "none",
        "peer_powered": True,
        "own_power_good": True,
        "sensing": {"peer_power": False, "own_power": False},
    }
    assert out[-1]["event"] == "stopped"


def test_leds_runs_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leds", "error", "--backend", "sim", "--seconds", "0.05"], PROG) == 0
    assert lines(capsys.readouterr().out) == [{"event": "leds", "state": "error", "backend": "sim"}]


def test_sim_link_without_side_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--backend", "sim", "--sim-link", "x.sock"], PROG) == 2
    assert "--side" in capsys.readouterr().err


def test_unreachable_simulator_is_exit_1(tmp_path: Path) -> None:
    argv = ["watch", "--backend", "sim", "--side", "a", "--sim-link", str(tmp_path / "no.sock")]
    assert main(argv, PROG) == 1


@contextlib.contextmanager
def process(*args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def control(path: Path, command: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(json.dumps(command).encode() + b"\n")
        reply: dict[str, object] = json.loads(sock.makefile().readline())
        return reply


def next_record(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by the test's timeout
    assert line, "the watcher exited early"
    record: dict[str, object] = json.loads(line)
    return record


@pytest.mark.slow
def test_power_cut_in_the_link_simulator_reaches_the_watcher(tmp_path: Path) -> None:
    ctl = tmp_path / "ctl.sock"
    with process("sim", "link", "--control", str(ctl)) as sim:
        assert sim.stdout is not None
        assert json.loads(sim.stdout.readline())["control"] == str(ctl)
        with process(
            "power", "watch", "--backend", "sim", "--sim-link", str(ctl), "--side", "b"
        ) as watch:
            started = next_record(watch)
            assert started["event"] == "started"
            assert started["peer_powered"] is True
            assert control(ctl, {"cmd": "power", "side": "a", "on": False}) == {"ok": True}
            lost = next_record(watch)
            assert lost["event"] == "PeerPowerLost"
            assert isinstance(lost["decided_after_ms"], float)
            assert lost["decided_after_ms"] >= 20.0
            assert control(ctl, {"cmd": "power", "side": "a", "on": True}) == {"ok": True}
            assert next_record(watch)["event"] == "PeerPowerRestored"
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=10) == 0
            assert next_record(watch)["event"] == "stopped"
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=10) == 0
