"""The emulator's Hayes core under a fake clock, and the dialler core driving it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.outer.modem.dialler import (
    CallAttemptFailed,
    Connected,
    DataReceived,
    Dialler,
    DiallerConfig,
    HungUp,
    State,
)
from firmware.outer.modem.errors import Busy
from host_tools.sim.hayes import (
    MAX_COMMAND,
    MAX_RINGS,
    CloseLine,
    HayesConfig,
    HayesModem,
    LineAction,
    ModemState,
    OpenLine,
    normalise_number,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

BOOK = {"555-1234": "127.0.0.1:7000"}


class Rig:
    def __init__(self, **overrides: object) -> None:
        self.m = HayesModem(HayesConfig(phonebook=dict(BOOK), **overrides))  # type: ignore[arg-type]
        self.now = 0.0
        self.line = bytearray()  # what went down the line, like the adapter's TCP writes

    def type(self, text: str | bytes) -> bytes:
        data = text.encode() if isinstance(text, str) else text
        self.m.receive_from_dte(data, self.now)
        return self.m.bytes_to_dte(self.now)

    def advance(self, seconds: float) -> bytes:
        target = self.now + seconds
        out = bytearray()
        while (deadline := self.m.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.m.handle_deadline(self.now)
            out += self.m.bytes_to_dte(self.now)
            self.line += self.m.bytes_to_line(self.now)
        self.now = target
        self.m.handle_deadline(self.now)
        out += self.m.bytes_to_dte(self.now)
        self.line += self.m.bytes_to_line(self.now)
        return bytes(out)

    def actions(self) -> list[LineAction]:
        out = []
        while (event := self.m.next_event()) is not None:
            out.append(event)
        return out

    def online(self) -> None:
        self.type("ATE0\r")
        self.type("ATDT5551234\r")
        self.advance(2.0)
        assert self.actions() == [OpenLine("127.0.0.1:7000")]
        self.m.line_connected(self.now)
        speed = self.m.config.speed
        assert self.m.bytes_to_dte(self.now) == f"\r\nCONNECT {speed}\r\n".encode()
        assert self.m.state is ModemState.ONLINE


def test_register_defaults_and_query() -> None:
    rig = Rig()
    assert [rig.m.register(n) for n in (0, 2, 3, 4, 5, 7, 12)] == [0, 43, 13, 10, 8, 50, 50]
    assert rig.type("ATS7?\r") == b"ATS7?\r\r\n050\r\n\r\nOK\r\n"
    assert rig.type("ATS7=30S12=25\r").endswith(b"\r\nOK\r\n")
    assert rig.m.register(7) == 30
    assert rig.m.register(12) == 25
    assert rig.type("ATS12?\r").endswith(b"\r\n025\r\n\r\nOK\r\n")
    rig.type("ATZ\r")
    assert rig.m.register(7) == 50


@pytest.mark.parametrize("command", ["ATS99=1", "ATS7=256", "ATS7", "ATJ", "AT&Q", "ATE2", "ATX9"])
def test_bad_commands_answer_error_and_change_nothing(command: str) -> None:
    rig = Rig()
    assert rig.type(command + "\r") == command.encode() + b"\r\r\nERROR\r\n"
    assert rig.m.register(7) == 50
    assert rig.type("AT\r") == b"AT\r\r\nOK\r\n"


def test_chained_commands_apply_in_order() -> None:
    rig = Rig()
    assert rig.type("ATE0V1Q0S0=2&C1&D2\r") == b"ATE0V1Q0S0=2&C1&D2\r\r\nOK\r\n"
    assert rig.m.register(0) == 2
    assert rig.type("AT\r") == b"\r\nOK\r\n"  # echo now off
    assert rig.type("at v0\r") == b"0\r"  # lower case, spaces, numeric results
    assert rig.type("ATQ1\r") == b""
    assert rig.type("ATQ0V1 S7? S0?\r") == b"\r\n050\r\n\r\n002\r\n\r\nOK\r\n"


def test_garbage_before_at_and_backspace_editing() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    assert rig.type("xx\x00ATS7=4\x0839\r") == b"\r\nOK\r\n"
    assert rig.m.register(7) == 39


def test_overlong_command_line_is_an_error() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    assert rig.type("AT" + "E0" * 200 + "\r") == b"\r\nERROR\r\n"


def test_error_to_first_command_after_power_up() -> None:
    rig = Rig(error_first=True)
    assert rig.type("ATZ\r").endswith(b"\r\nERROR\r\n")
    assert rig.type("ATZ\r").endswith(b"\r\nOK\r\n")


def test_dial_connects_through_the_phonebook_after_the_dial_delay() -> None:
    rig = Rig(dial_delay=3.0, protocol="ARQ/V34/LAPM/V42BIS")
    rig.type("ATE0\r")
    assert rig.type("ATDT(555) 12-34\r") == b""
    assert rig.advance(2.9) == b""
    assert rig.actions() == []
    rig.advance(0.1)
    assert rig.actions() == [OpenLine("127.0.0.1:7000")]
    rig.m.line_connected(rig.now)
    assert rig.m.bytes_to_dte(rig.now) == b"\r\nCONNECT 33600/ARQ/V34/LAPM/V42BIS\r\n"


@pytest.mark.parametrize(
    ("faults", "results"),
    [
        ({"busy": 2}, ["BUSY", "BUSY"]),
        ({"no_answer": 1}, ["NO ANSWER"]),
        ({"no_dialtone": 1, "busy": 1}, ["NO DIALTONE", "BUSY"]),
    ],
)
def test_injected_dial_faults_then_success(faults: dict[str, int], results: list[str]) -> None:
    rig = Rig(**faults)
    rig.type("ATE0\r")
    for result in results:
        rig.type("ATD5551234\r")
        assert rig.advance(2.0) == f"\r\n{result}\r\n".encode()
        assert rig.actions() == []
    rig.type("ATD5551234\r")
    rig.advance(2.0)
    assert rig.actions() == [OpenLine("127.0.0.1:7000")]
    assert rig.m.statistics()["dials"] == len(results) + 1


def test_x0_reports_basic_codes_only() -> None:
    rig = Rig(busy=1, no_dialtone=1)
    rig.type("ATE0X0\r")
    rig.type("ATD5551234\r")
    assert rig.advance(2.0) == b"\r\nNO CARRIER\r\n"
    rig.type("ATD5551234\r")
    assert rig.advance(2.0) == b"\r\nNO CARRIER\r\n"
    rig.type("ATD5551234\r")
    rig.advance(2.0)
    rig.m.line_connected(rig.now)
    assert rig.m.bytes_to_dte(rig.now) == b"\r\nCONNECT\r\n"


def test_numeric_connect_codes() -> None:
    rig = Rig(speed=2400)
    rig.type("ATE0V0\r")
    rig.type("ATD5551234\r")
    rig.advance(2.0)
    rig.m.line_connected(rig.now)
    assert rig.m.bytes_to_dte(rig.now) == b"10\r"


def test_unknown_number_and_refused_line_give_no_answer() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    rig.type("ATD999\r")
    assert rig.advance(2.0) == b"\r\nNO ANSWER\r\n"
    rig.type("ATD5551234\r")
    rig.advance(2.0)
    rig.actions()
    rig.m.line_failed(rig.now)
    assert rig.m.bytes_to_dte(rig.now) == b"\r\nNO ANSWER\r\n"


def test_dial_slower_than_s7_gives_no_carrier() -> None:
    rig = Rig(dial_delay=10.0)
    rig.type("ATE0S7=4\r")
    rig.type("ATD5551234\r")
    assert rig.advance(4.0) == b"\r\nNO CARRIER\r\n"
    assert rig.actions() == []


def test_keypress_aborts_a_dial_and_a_late_line_is_closed() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    rig.type("ATD5551234\r")
    rig.advance(2.0)
    rig.actions()
    assert rig.type("\r") == b"\r\nNO CARRIER\r\n"
    rig.m.line_connected(rig.now)
    assert rig.actions() == [CloseLine()]
    assert rig.m.state is ModemState.COMMAND


def test_data_is_paced_at_the_connect_speed() -> None:
    rig = Rig(speed=9600)  # 960 bytes per second
    rig.online()
    rig.m.line_data(bytes(3000), rig.now)
    got = len(rig.advance(1.0))
    assert 960 - 20 <= got <= 960 + 20
    rig.m.receive_from_dte(bytes(2000), rig.now)
    sent = 0
    for _ in range(50):
        rig.now += 0.02
        sent += len(rig.m.bytes_to_line(rig.now))
    assert 960 - 20 <= sent <= 960 + 20


def test_escape_needs_guard_time_on_both_sides() -> None:
    rig = Rig()
    rig.online()
    rig.type(b"data")
    rig.now += 0.5
    rig.type(b"+++")  # too soon after data: no escape
    assert rig.advance(2.0) == b""
    assert rig.m.state is ModemState.ONLINE
    rig.type(b"+++")
    assert rig.advance(0.99) == b""
    rig.type(b"x")  # a character inside the trailing guard cancels it
    assert rig.advance(2.0) == b""
    assert rig.m.state is ModemState.ONLINE
    rig.type(b"+")
    rig.now += 0.3
    rig.type(b"+")
    rig.now += 0.3
    rig.type(b"+")
    assert rig.advance(0.99) == b""
    assert rig.advance(0.01) == b"\r\nOK\r\n"
    assert rig.m.state is ModemState.ONLINE_COMMAND
    rig.advance(1.0)
    assert bytes(rig.line).endswith(b"+++x+++")  # the escape characters went down the line too


def test_guard_time_follows_s12() -> None:
    rig = Rig()
    rig.type("ATS12=10\r")  # 0.2 s
    rig.online()
    rig.now += 0.2
    rig.type(b"+++")
    assert rig.advance(0.2) == b"\r\nOK\r\n"


def test_online_command_state_ato_and_ath() -> None:
    rig = Rig()
    rig.online()
    rig.now += 1.0
    rig.type(b"+++")
    rig.advance(1.0)
    rig.m.line_data(b"held", rig.now)
    assert rig.advance(1.0) == b""  # the far end's data waits while we are in command state
    assert rig.type("ATO\r") == b"\r\nCONNECT 33600\r\nheld"
    rig.now += 1.0
    rig.type(b"+++")
    rig.advance(1.0)
    assert rig.type("ATH0\r") == b"\r\nOK\r\n"
    assert rig.actions() == [CloseLine()]
    assert rig.type("ATO\r") == b"\r\nNO CARRIER\r\n"


def test_far_end_hangup_gives_no_carrier() -> None:
    rig = Rig()
    rig.online()
    rig.m.line_closed(rig.now)
    assert rig.m.bytes_to_dte(rig.now) == b"\r\nNO CARRIER\r\n"
    assert rig.m.state is ModemState.COMMAND


def test_carrier_drops_after_n_bytes() -> None:
    rig = Rig(no_carrier_after=100)
    rig.online()
    rig.m.line_data(bytes(range(256)), rig.now)
    out = rig.advance(1.0)
    assert out == bytes(range(100)) + b"\r\nNO CARRIER\r\n"
    assert rig.actions() == [CloseLine()]


def test_line_noise_is_seeded() -> None:
    def run(seed: int) -> bytes:
        rig = Rig(ber=0.01, seed=seed)
        rig.online()
        rig.m.line_data(bytes(1000), rig.now)
        return rig.advance(1.0)

    noisy = run(1)
    assert len(noisy) == 1000
    assert noisy != bytes(1000)
    assert run(1) == noisy
    assert run(2) != noisy


def test_answer_by_ata_and_by_s0() -> None:
    rig = Rig(answer_delay=1.0, ring_interval=6.0)
    rig.type("ATE0\r")
    assert rig.m.incoming_call(rig.now)
    assert rig.m.bytes_to_dte(rig.now) == b"\r\nRING\r\n"
    assert not rig.m.incoming_call(rig.now)  # a second caller finds the line engaged
    rig.m.line_data(b"early", rig.now)
    assert rig.advance(6.0) == b"\r\nRING\r\n"
    assert rig.m.register(1) == 2
    assert rig.type("ATA\r") == b""
    assert rig.advance(1.01) == b"\r\nCONNECT 33600\r\nearly"

    auto = Rig(answer_delay=1.0)
    auto.type("ATE0S0=2\r")
    auto.m.incoming_call(auto.now)
    assert auto.advance(7.0) == b"\r\nRING\r\n\r\nRING\r\n\r\nCONNECT 33600\r\n"


def test_unanswered_call_is_dropped_and_ata_without_ring_fails() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    assert rig.type("ATA\r") == b"\r\nNO CARRIER\r\n"
    rig.m.incoming_call(rig.now)
    out = rig.advance(6.0 * MAX_RINGS + 1)
    assert out.count(b"RING") == MAX_RINGS
    assert rig.actions() == [CloseLine()]
    assert rig.m.state is ModemState.COMMAND


def test_phonebook_numbers_are_normalised() -> None:
    assert normalise_number("T(555) 123-4,") == "5551234"
    with pytest.raises(ValueError, match="ber"):
        HayesConfig(ber=2.0)


# ------------------------------------------- the dialler core against the emulator core


def pump(dialler: Dialler, modem: HayesModem, now: float) -> None:
    for _ in range(10):
        to_modem = dialler.bytes_to_send()
        if to_modem:
            modem.receive_from_dte(to_modem, now)
        to_dialler = modem.bytes_to_dte(now)
        if to_dialler:
            dialler.receive_bytes(to_dialler, now)
        if not to_modem and not to_dialler:
            return


def test_dialler_core_drives_the_emulator_core() -> None:
    modem = HayesModem(HayesConfig(phonebook=dict(BOOK), busy=1, error_first=True))
    dialler = Dialler(DiallerConfig(number="555-1234", seed=3))
    now = 0.0
    dialler.dial(now)
    events: list[object] = []
    for _ in range(5000):
        while (action := modem.next_event()) is not None:
            assert action == OpenLine("127.0.0.1:7000")
            modem.line_connected(now)
        pump(dialler, modem, now)
        while (event := dialler.next_event()) is not None:
            events.append(event)
        if dialler.state is State.ONLINE:
            break
        times = [t for t in (dialler.next_deadline(), modem.next_deadline()) if t is not None]
        now = max(now, min(times))
        dialler.handle_deadline(now)
        modem.handle_deadline(now)
    assert isinstance(events[0], CallAttemptFailed)
    assert isinstance(events[0].error, Busy)
    assert events[1] == Connected(33600, "", "CONNECT 33600")
    modem.line_data(b"\x00frame\x00", now)
    now += 0.1
    pump(dialler, modem, now)
    assert dialler.next_event() == DataReceived(b"\x00frame\x00")
    dialler.send_data(b"reply", now)
    pump(dialler, modem, now)
    assert modem.bytes_to_line(now + 0.1) == b"reply"
    dialler.hangup(now)
    for _ in range(200):
        pump(dialler, modem, now)
        if dialler.state is State.IDLE:
            break
        times = [t for t in (dialler.next_deadline(), modem.next_deadline()) if t is not None]
        now = max(now + 0.01, min(times))
        dialler.handle_deadline(now)
        modem.handle_deadline(now)
    assert dialler.next_event() == HungUp(clean=True)
    assert modem.next_event() == CloseLine()
    assert modem.state is ModemState.COMMAND


def test_atz_while_ringing_keeps_the_call_ringing_but_ends_a_connected_one() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    rig.m.incoming_call(rig.now)
    rig.m.bytes_to_dte(rig.now)
    assert rig.type("ATZ\r") == b"\r\nOK\r\n"  # typed with echo off
    assert rig.actions() == []
    assert rig.m.state is ModemState.RINGING
    rig.type("ATA\r")
    rig.advance(1.0)
    rig.now += 1.0
    rig.type(b"+++")
    rig.advance(1.0)
    assert rig.type("ATZ\r").endswith(b"\r\nOK\r\n")
    assert rig.actions() == [CloseLine()]
    assert rig.m.state is ModemState.COMMAND


_TYPED = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [b"AT", b"\r", b"+++", b"ATD5551234\r", b"ATA\r", b"ATO\r", b"ATH\r", b"S7?", b"=9"]
        ),
    ),
    max_size=40,
)


@given(_TYPED, st.lists(st.floats(0.0, 3.0), min_size=40, max_size=40))
def test_any_typing_keeps_the_emulator_consistent(chunks: list[bytes], gaps: list[float]) -> None:
    rig = Rig(dial_delay=0.5)
    for chunk, gap in zip(chunks, gaps, strict=False):
        rig.type(chunk)
        rig.advance(gap)
        for action in rig.actions():
            if isinstance(action, OpenLine):
                rig.m.line_connected(rig.now)
        assert rig.m.pending_command_length() <= MAX_COMMAND + 1
        assert rig.m.state in ModemState
        assert 0 <= rig.m.register(7) <= 255


def test_non_ascii_digits_are_not_numbers() -> None:
    rig = Rig()
    rig.type("ATE0\r")
    assert rig.type(b"ATS7=\xb2\r") == b"\r\nERROR\r\n"
    assert rig.type(b"AT\xb2\r") == b"\r\nERROR\r\n"
    assert normalise_number("55\u00b212") == "5512"
