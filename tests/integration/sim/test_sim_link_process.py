"""``optogate sim link`` as a real process: ptys opened with pyserial, control socket."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import serial

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

STARTUP_TIMEOUT = 10.0


@dataclass
class Sim:
    proc: subprocess.Popen[bytes]
    a: str
    b: str
    control: str


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "host_tools.cli", "sim", "link", *args]


def read_line(stream: Any, timeout: float) -> bytes:
    """One line from a pipe, or b"" if none arrives in time."""
    fd = stream.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        chunk = os.read(fd, 1)
        if not chunk:
            return bytes(buf)
        buf += chunk
    return bytes(buf)


def start(*args: str) -> Sim:
    proc = subprocess.Popen(
        command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    line = read_line(proc.stdout, STARTUP_TIMEOUT)
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        pytest.fail(f"simulator printed no JSON line; stderr: {err.decode()[-2000:]}")
    info = json.loads(line)
    return Sim(proc, info["a"], info["b"], info["control"])


def stop(sim: Sim) -> tuple[int, bytes, bytes]:
    sim.proc.send_signal(signal.SIGTERM)
    try:
        out, err = sim.proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        sim.proc.kill()
        sim.proc.communicate(timeout=5)
        pytest.fail("simulator did not exit on SIGTERM")
    return sim.proc.returncode, out, err


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def make(*args: str) -> Sim:
        sim = start(*args)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        if sim.proc.poll() is None:
            code, _, err = stop(sim)
            assert code == 0, err.decode()[-2000:]


class Control:
    """A JSON-lines client of the control socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def send(self, obj: object) -> dict[str, Any]:
        self.file.write(json.dumps(obj).encode() + b"\n")
        self.file.flush()
        return self.line()

    def line(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "control socket closed"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stats(self) -> dict[str, Any]:
        reply = self.send({"cmd": "stats"})
        assert reply["ok"], reply
        stats: dict[str, Any] = reply["stats"]
        return stats

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return
            assert time.monotonic() < deadline, f"condition not reached; stats: {stats}"
            time.sleep(0.02)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def control_factory() -> Iterator[Callable[[str], Control]]:
    opened: list[Control] = []

    def make(path: str) -> Control:
        ctl = Control(path)
        opened.append(ctl)
        return ctl

    yield make
    for ctl in opened:
        ctl.close()


@pytest.fixture
def port_factory() -> Iterator[Callable[[str], serial.Serial]]:
    opened: list[serial.Serial] = []

    def make(path: str) -> serial.Serial:
        port = serial.Serial(path, 115200, timeout=0.05, exclusive=True)
        opened.append(port)
        return port

    yield make
    for port in opened:
        port.close()


def read_exactly(port: serial.Serial, n: int, timeout: float = 10.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n and time.monotonic() < deadline:
        buf += port.read(n - len(buf))
    return bytes(buf)


def settled(direction: str, sent: int) -> Callable[[dict[str, Any]], bool]:
    """All ``sent`` bytes have been taken from the sender and none is in flight."""
    return lambda s: s[direction]["bytes_in"] == sent and s[direction]["in_flight"] == 0


LOSSES = ("bytes_dropped", "lost_cut", "lost_power", "lost_unheard", "overrun")


def balanced(c: dict[str, int]) -> bool:
    return c["bytes_in"] == c["bytes_delivered"] + c["in_flight"] + sum(c[k] for k in LOSSES)


# -- the contract -------------------------------------------------------------------


def test_prints_exactly_one_json_line_and_exits_zero_on_sigterm(
    sim_factory: Callable[..., Sim],
) -> None:
    sim = sim_factory("--seed", "3")
    for path in (sim.a, sim.b):
        assert os.path.exists(path)
        assert path.startswith("/dev/pts/")
    assert os.path.exists(sim.control)
    code, out, err = stop(sim)
    assert code == 0
    assert out == b""  # nothing after the one line
    events = [json.loads(line)["event"] for line in err.decode().splitlines()]
    assert events[0] == "started"
    assert "stopped" in events
    assert not os.path.exists(sim.control)  # the temporary socket is removed


def test_sigint_also_exits_cleanly_and_an_explicit_control_path_is_used(
    sim_factory: Callable[..., Sim], tmp_path: Any
) -> None:
    path = str(tmp_path / "ctl.sock")
    sim = sim_factory("--control", path)
    assert sim.control == path
    sim.proc.send_signal(signal.SIGINT)
    assert sim.proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ber", "2"], b"ber"),
        (["--baud", "0"], b"baud"),
        (["--latency", "-1"], b"latency"),
        (["--bogus"], b"unrecognized"),
    ],
)
def test_bad_arguments_exit_2_without_printing_a_line(args: list[str], message: bytes) -> None:
    proc = subprocess.run(command(*args), capture_output=True, timeout=20, check=False)
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert message in proc.stderr


def test_isolator_flag_uses_the_isolator_or_says_clearly_why_not(
    sim_factory: Callable[..., Sim],
) -> None:
    try:
        import firmware.isolator.simbox  # noqa: F401
    except ImportError:
        proc = subprocess.run(command("--isolator"), capture_output=True, timeout=20, check=False)
        assert proc.returncode == 2
        assert proc.stdout == b""
        assert b"firmware.isolator.simbox" in proc.stderr
    else:
        sim = sim_factory("--isolator")
        code, _, err = stop(sim)
        assert code == 0
        assert b'"middlebox":"IsolatorMiddlebox"' in err


# -- bytes ----------------------------------------------------------------------------


def test_bytes_cross_both_ways_and_the_counters_add_up(
    sim_factory: Callable[..., Sim],
    port_factory: Callable[[str], serial.Serial],
    control_factory: Callable[[str], Control],
) -> None:
    sim = sim_factory("--baud", "230400")
    a, b = port_factory(sim.a), port_factory(sim.b)
    ctl = control_factory(sim.control)
    ctl.wait(lambda s: s["listening"] == {"a": True, "b": True})
    to_b = bytes(range(256)) * 12
    to_a = bytes(reversed(range(256))) * 8
    a.write(to_b)
    b.write(to_a)
    assert read_exactly(b, len(to_b)) == to_b
    assert read_exactly(a, len(to_a)) == to_a
    stats = ctl.stats()
    for direction, n in (("a->b", len(to_b)), ("b->a", len(to_a))):
        c = stats[direction]
        assert c["bytes_in"] == c["bytes_delivered"] == n
        assert balanced(c)


def test_the_line_never_runs_faster_than_baud_over_ten_and_buffers_little(
    sim_factory: Callable[..., Sim],
    port_factory: Callable[[str], serial.Serial],
    control_factory: Callable[[str], Control],
) -> None:
    baud = 19200  # 1920 bytes/s: 3840 bytes are two seconds of line time
    sim = sim_factory("--baud", str(baud))
    a, b = port_factory(sim.a), port_factory(sim.b)
    ctl = control_factory(sim.control)
    ctl.wait(lambda s: s["listening"] == {"a": True, "b": True})
    data = os.urandom(3840)
    started = time.monotonic()
    a.write(data)
    time.sleep(0.5)
    stats = ctl.stats()
    elapsed = time.monotonic() - started
    c = stats["a->b"]
    # Upper bounds only: a slow machine delivers less, never more.
    assert c["bytes_delivered"] <= baud / 10 * elapsed + 1
    assert c["in_flight"] <= 16  # UART-sized FIFO, not the pty's kilobytes
    assert read_exactly(b, len(data)) == data
    assert balanced(ctl.stats()["a->b"])


def test_bytes_for_a_side_nobody_has_open_are_lost(
    sim_factory: Callable[..., Sim],
    port_factory: Callable[[str], serial.Serial],
    control_factory: Callable[[str], Control],
) -> None:
    sim = sim_factory("--baud", "230400")
    ctl = control_factory(sim.control)
    a = port_factory(sim.a)
    ctl.wait(lambda s: s["listening"] == {"a": True, "b": False})
    a.write(b"x" * 300)
    ctl.wait(settled("a->b", 300))
    assert ctl.stats()["a->b"]["lost_unheard"] == 300
    b = port_factory(sim.b)
    ctl.wait(lambda s: s["listening"]["b"])
    assert b.read(300) == b""  # nothing was kept for a later reader
    a.write(b"heard")
    assert read_exactly(b, 5) == b"heard"


def test_bytes_sent_during_a_cut_are_lost_and_restore_resumes(
    sim_factory: Callable[..., Sim],
    port_factory: Callable[[str], serial.Serial],
    control_factory: Callable[[str], Control],
) -> None:
    sim = sim_factory("--baud", "230400")
    a, b = port_factory(sim.a), port_factory(sim.b)
    ctl = control_factory(sim.control)
    ctl.wait(lambda s: s["listening"] == {"a": True, "b": True})
    assert ctl.send({"cmd": "cut"}) == {"ok": True}
    a.write(b"c" * 500)
    b.write(b"d" * 200)
    ctl.wait(lambda s: settled("a->b", 500)(s) and settled("b->a", 200)(s))
    assert ctl.send({"cmd": "restore"}) == {"ok": True}
    a.write(b"after")
    assert read_exactly(b, 5) == b"after"
    assert a.read(10) == b""
    stats = ctl.stats()
    assert stats["a->b"]["lost_cut"] == 500
    assert stats["b->a"]["lost_cut"] == 200
    assert stats["cut"] is False


def test_powering_side_a_off_silences_it_and_watchers_see_it(
    sim_factory: Callable[..., Sim],
    port_factory: Callable[[str], serial.Serial],
    control_factory: Callable[[str], Control],
) -> None:
    sim = sim_factory("--baud", "230400")
    a, b = port_factory(sim.a), port_factory(sim.b)
    watcher = control_factory(sim.control)
    ctl = control_factory(sim.control)
    watcher.file.write(b'{"cmd": "watch"}\n')
    watcher.file.flush()
    initial = [watcher.line(), watcher.line()]
    assert initial == [
        {"event": "power", "side": "a", "on": True},
        {"event": "power", "side": "b", "on": True},
    ]
    ctl.wait(lambda s: s["listening"] == {"a": True, "b": True})
    assert ctl.send({"cmd": "power", "side": "a", "on": False}) == {"ok": True}
    assert watcher.line() == {"event": "power", "side": "a", "on": False}
    a.write(b"p" * 400)
    ctl.wait(settled("a->b", 400))
    assert b.read(400) == b""
    assert ctl.stats()["a->b"]["lost_power"] == 400
    # Powering off again changes nothing and tells nobody.
    assert ctl.send({"cmd": "power", "side": "a", "on": False}) == {"ok": True}
    assert ctl.send({"cmd": "power", "side": "a", "on": True}) == {"ok": True}
    assert watcher.line() == {"event": "power", "side": "a", "on": True}
    a.write(b"alive")
    assert read_exactly(b, 5) == b"alive"
    assert ctl.stats()["power"] == {"a": True, "b": True}


def test_a_watcher_that_hangs_up_is_forgotten(
    sim_factory: Callable[..., Sim], control_factory: Callable[[str], Control]
) -> None:
    sim = sim_factory()
    watcher = Control(sim.control)
    watcher.file.write(b'{"cmd": "watch"}\n')
    watcher.file.flush()
    watcher.line()
    watcher.line()
    watcher.close()
    ctl = control_factory(sim.control)
    for on in (False, True, False, True):
        assert ctl.send({"cmd": "power", "side": "b", "on": on}) == {"ok": True}
    code, _, err = stop(sim)
    assert code == 0, err.decode()[-2000:]


# -- the control socket ------------------------------------------------------------------


def test_set_changes_impairments_and_bit_errors_show_in_the_counters(
    sim_factory: Callable[..., Sim],
    port_factory: Callable[[str], serial.Serial],
    control_factory: Callable[[str], Control],
) -> None:
    sim = sim_factory("--baud", "460800", "--seed", "7")
    a, b = port_factory(sim.a), port_factory(sim.b)
    ctl = control_factory(sim.control)
    ctl.wait(lambda s: s["listening"] == {"a": True, "b": True})
    reply = ctl.send({"cmd": "set", "ber": 0.01})
    assert reply == {"ok": True, "ber": 0.01, "drop": 0.0, "latency": 0.0}
    data = bytes(4000)
    a.write(data)
    got = read_exactly(b, len(data))
    flips = sum(bin(x).count("1") for x in got)
    c = ctl.stats()["a->b"]
    assert len(got) == len(data)
    assert c["bits_flipped"] == flips > 0


@pytest.mark.parametrize(
    "bad",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"cmd": "explode"}\n',
        b'{"cmd": "set", "ber": 2}\n',
        b'{"cmd": "set", "ber": "high"}\n',
        b'{"cmd": "set", "speed": 1}\n',
        b'{"cmd": "power", "side": "c", "on": false}\n',
        b'{"cmd": "power", "side": "a", "on": "no"}\n',
        b'{"cmd": "power", "side": "a"}\n',
        b'{"cmd": "cut", "now": true}\n',
    ],
)
def test_bad_commands_are_refused_and_change_nothing(
    bad: bytes, sim_factory: Callable[..., Sim], control_factory: Callable[[str], Control]
) -> None:
    sim = sim_factory("--ber", "0.001")
    ctl = control_factory(sim.control)
    before = ctl.stats()
    ctl.file.write(bad)
    ctl.file.flush()
    reply = ctl.line()
    assert reply["ok"] is False
    assert reply["error"]
    after = ctl.stats()  # the connection is still usable
    for key in ("impairments", "power", "cut"):
        assert after[key] == before[key]


def test_sim_dispatches_link_and_rejects_unknown_simulators(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from host_tools import sim_cli

    with pytest.raises(SystemExit) as info:
        sim_cli.main(["link", "--help"], "optogate sim")
    assert info.value.code == 0
    assert "optogate sim link" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        sim_cli.main(["warp-drive"], "optogate sim")
    assert info.value.code == 2
