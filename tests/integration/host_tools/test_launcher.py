"""The demo's process supervisor on small real processes: readiness, deaths, power, stopping."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from host_tools.launcher import (
    LaunchError,
    Managed,
    ProcessSpec,
    Supervisor,
    first_json_line,
    log_event,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SIM = python(
    "import json, sys, time\n"
    "print(json.dumps({'port': '/dev/pts/99'}), flush=True)\n"
    "print(json.dumps({'event': 'dial', 'number': '5550100'}), file=sys.stderr, flush=True)\n"
    "time.sleep(60)\n"
)
DAEMON = python(
    "import json, os, signal, sys, time\n"
    "print(json.dumps({'event': 'opening'}), flush=True)\n"
    "print(json.dumps({'event': 'ready', 'pid': os.getpid()}), flush=True)\n"
    "code = int(sys.argv[1]) if len(sys.argv) > 1 else 0\n"
    "if code:\n"
    "    time.sleep(0.2); sys.exit(code)\n"
    "time.sleep(60)\n"
)


def test_starts_in_order_reads_ready_lines_and_stops_in_reverse(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    sup = Supervisor(tmp_path, on_change=lambda m: seen.append((m.spec.name, m.state)))
    try:
        sim = sup.start(ProcessSpec("sim", SIM, first_json_line("port")))
        daemon = sup.start(ProcessSpec("daemon", DAEMON, log_event("ready")))
        assert sim.info == {"port": "/dev/pts/99"}
        assert daemon.info["pid"] == daemon.pid
        assert os.getpgid(daemon.pid) == daemon.pid  # its own process group
        deadline = time.monotonic() + 5
        while not sim.last_event.startswith("dial"):  # the simulator's stderr events count
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        sup.stop_all()
    assert [m.state for m in sup.processes.values()] == ["stopped", "stopped"]
    assert not any(m.killed for m in sup.processes.values())
    assert sup.deaths == []
    stops = [name for name, state in seen if state == "stopped"]
    assert stops == ["daemon", "sim"]
    assert '"event": "ready"' in (tmp_path / "logs" / "daemon.log").read_text()
    assert "dial" in (tmp_path / "logs" / "sim.err").read_text()


def test_a_death_is_recorded_with_its_stderr(tmp_path: Path) -> None:
    code = "import sys\nprint('{\"event\": \"ready\"}', flush=True)\nsys.exit('boom: disk on fire')"
    sup = Supervisor(tmp_path)
    try:
        managed = sup.start(ProcessSpec("doomed", python(code), log_event("ready")))
        assert sup.wait_exit("doomed", 10) == 1
    finally:
        sup.stop_all()
    assert managed.state == "died"
    (death,) = sup.deaths
    assert death.name == "doomed" and death.exit_code == 1
    assert "boom: disk on fire" in death.stderr_tail


def test_the_power_exit_status_is_powered_off_not_a_death(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    spec = ProcessSpec("outer", [*DAEMON, "3"], log_event("ready"), power_exit=3)
    try:
        first = sup.start(spec)
        assert sup.wait_exit("outer", 10) == 3
        assert first.state == "powered off"
        again: Managed = sup.restart("outer")
        assert again.restarts == 1 and again.pid != first.pid
    finally:
        sup.stop_all()
    assert sup.deaths == []


def test_a_power_cut_without_warning_kills_the_group_and_is_powered_off(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    try:
        first = sup.start(ProcessSpec("inner", DAEMON, log_event("ready"), power_exit=75))
        sup.power_off("inner")
        assert sup.wait_exit("inner", 10) == -signal.SIGKILL
        assert first.state == "powered off"
        assert sup.deaths == []
        again = sup.restart("inner")
        assert again.state == "running" and not again.unpowered
        sup.kill("inner")  # a kill is still a death
        sup.wait_exit("inner", 10)
        assert again.state == "died"
        sup.start(ProcessSpec("link", SIM, first_json_line("port")))
        with pytest.raises(LaunchError, match="no power supply"):
            sup.power_off("link")
    finally:
        sup.stop_all()
    assert [d.name for d in sup.deaths] == ["inner"]


def test_exit_before_ready_and_silence_are_launch_errors(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    try:
        with pytest.raises(LaunchError, match=r"exited with status 2 before it was ready"):
            sup.start(ProcessSpec("bad", python("import sys; sys.exit(2)"), log_event("ready")))
        silent = ProcessSpec("mute", python("import time; time.sleep(60)"), log_event("ready"), 1.0)
        with pytest.raises(LaunchError, match="did not become ready within 1 s"):
            sup.start(silent)
    finally:
        sup.stop_all()
    assert sup.processes["mute"].state == "stopped"


def test_a_process_ignoring_sigterm_is_killed_with_its_group(tmp_path: Path) -> None:
    stubborn = python(
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        'print(\'{"event": "ready", "child": %d}\' % child.pid, flush=True)\n'
        "time.sleep(60)\n"
    )
    sup = Supervisor(tmp_path)
    try:
        managed = sup.start(ProcessSpec("stubborn", stubborn, log_event("ready"), stop_grace=0.5))
        child = int(managed.info["child"])
    finally:
        sup.stop_all()
    assert managed.proc.returncode == -signal.SIGKILL
    assert managed.killed  # so a test can tell it did not stop on its own
    deadline = time.monotonic() + 5
    while True:  # the grandchild went with the group (reaped by init)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the group's other process survived"
        time.sleep(0.05)
