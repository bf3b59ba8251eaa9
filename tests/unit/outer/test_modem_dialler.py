"""The dialler core under a fake clock: every result code, timeout, retry and hang-up path."""

from __future__ import annotations

import itertools
from typing import cast

import pytest
from cobs import cobs
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import ConfigError, LocalProtocolError, ModemError
from firmware.outer.modem.dialler import (
    GUARD_MARGIN,
    HOUR,
    NO_CARRIER_BYTES,
    CallAttemptFailed,
    CallFailed,
    CarrierLost,
    Connected,
    DataReceived,
    Dialler,
    DiallerConfig,
    DiallerEvent,
    HungUp,
    PrepareFailed,
    Ready,
    Ringing,
    SetDTR,
    State,
)
from firmware.outer.modem.errors import (
    Busy,
    CallLimitReached,
    ModemCommandError,
    ModemTimeout,
    NoAnswer,
    NoCarrier,
    NoDialtone,
)
from host_tools.sim.hayes import HayesConfig, HayesModem, OpenLine

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

INIT = "ATQ0 V1 E1 S0=0 &C1 &D2"


class Rig:
    """A dialler plus a fake clock; the test plays the modem."""

    def __init__(self, **overrides: object) -> None:
        fields = {"number": "5551234", "seed": 7, **overrides}
        self.d = Dialler(DiallerConfig(**fields))  # type: ignore[arg-type]
        self.now = 1000.0

    def sent(self) -> bytes:
        return self.d.bytes_to_send()

    def modem(self, data: bytes) -> None:
        self.d.receive_bytes(data, self.now)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every deadline on the way like an adapter would."""
        target = self.now + seconds
        while (deadline := self.d.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.d.handle_deadline(self.now)
        self.now = target

    def events(self) -> list[DiallerEvent]:
        out = []
        while (event := self.d.next_event()) is not None:
            out.append(event)
        return out

    def reply(self, expect: bytes, answer: bytes) -> None:
        """Check the dialler sent ``expect``, then echo it and answer."""
        assert self.sent() == expect
        self.modem(expect + answer)

    def through_init(self) -> None:
        self.reply(b"ATZ\r", b"\r\nOK\r\n")
        assert self.d.state is State.RESET_PAUSE
        self.advance(1.0)
        self.reply(INIT.encode() + b"\r", b"\r\nOK\r\n")

    def connect(self, line: bytes = b"CONNECT 33600/ARQ/V34/LAPM/V42BIS") -> None:
        self.d.dial(self.now)
        self.through_init()
        self.reply(b"ATDT5551234\r", b"\r\n" + line + b"\r\n")
        assert self.d.state is State.ONLINE


def test_happy_path_reports_speed_and_protocol_and_hands_over_data() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600/ARQ/V34/LAPM/V42BIS\r\n\x00abc")
    assert rig.events() == [
        Connected(33600, "ARQ/V34/LAPM/V42BIS", "CONNECT 33600/ARQ/V34/LAPM/V42BIS"),
        DataReceived(b"\x00abc"),
    ]
    rig.d.send_data(b"xyz", rig.now)
    assert rig.sent() == b"xyz"


def test_lf_of_connect_split_across_reads_is_not_data() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 9600\r")
    rig.modem(b"\nhello")
    assert rig.events()[1:] == [DataReceived(b"hello")]


def test_error_to_first_command_after_power_up_is_retried() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.reply(b"ATZ\r", b"\r\nERROR\r\n")
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    assert rig.d.state is State.RESET_PAUSE
    assert rig.events() == []


def test_silent_modem_fails_after_three_resets() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    assert rig.sent() == b"ATZ\r"
    for _ in range(2):
        rig.advance(5.0)
        assert rig.sent() == b"+++"  # the ATZ was sent long enough ago to be the guard
        rig.advance(1.2 + 5.0)
        assert rig.sent() == b"ATZ\r"
    rig.advance(5.0)
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, ModemTimeout)
    assert event.attempts == 0
    assert rig.d.state is State.IDLE
    assert rig.d.next_deadline() is None


def test_modem_left_online_is_escaped_before_the_next_reset() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    assert rig.sent() == b"ATZ\r"
    rig.modem(b"\x00far end data, and our ATZ went to the far end\r\n")
    rig.advance(5.0)
    rig.modem(b"more data while we keep silent")
    assert rig.sent() == b"+++"
    rig.advance(1.0)
    rig.modem(b"\r\nOK\r\n")
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")  # Z in online-command state ends that call
    assert rig.d.state is State.RESET_PAUSE
    assert rig.events() == []


def test_rejected_init_string_fails_without_dialling() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nERROR\r\n")
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, ModemCommandError)
    assert rig.sent() == b""
    assert rig.d.state is State.IDLE


def test_numeric_mode_modem_is_understood_before_init() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.reply(b"ATZ\r", b"0\r")
    assert rig.d.state is State.RESET_PAUSE


@pytest.mark.parametrize(
    ("result", "error_type"),
    [
        (b"\r\nBUSY\r\n", Busy),
        (b"\r\nNO ANSWER\r\n", NoAnswer),
        (b"\r\nNO DIALTONE\r\n", NoDialtone),
        (b"\r\nNO CARRIER\r\n", NoCarrier),
        (b"7\r", Busy),
        (b"8\r", NoAnswer),
        (b"6\r", NoDialtone),
        (b"3\r", NoCarrier),
    ],
)
def test_failed_attempts_are_retried_after_backoff(result: bytes, error_type: type) -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", result)
    [event] = rig.events()
    assert isinstance(event, CallAttemptFailed)
    assert isinstance(event.error, error_type)
    assert event.attempt == 1
    assert rig.d.state is State.BACKOFF
    assert 7.5 <= event.retry_at - rig.now <= 12.5  # 10 s +/- 25 %
    rig.advance(event.retry_at - rig.now - 0.01)
    assert rig.sent() == b""
    rig.advance(0.01)
    assert rig.sent() == b"ATDT5551234\r"
    assert cast(State, rig.d.state) is State.DIALLING  # mypy keeps the narrowing above


@pytest.mark.parametrize("result", [b"\r\nERROR\r\n", b"\r\nOK\r\n"])
def test_error_to_dial_is_not_retried(result: bytes) -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", result)
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, ModemCommandError)
    assert event.attempts == 1


def test_carrier_wait_timeout_aborts_the_dial() -> None:
    rig = Rig(carrier_timeout=45.0)
    rig.d.dial(rig.now)
    rig.through_init()
    assert rig.sent() == b"ATDT5551234\r"
    rig.advance(44.9)
    assert rig.sent() == b""
    rig.advance(0.1)
    assert rig.sent() == b"\r"  # any character aborts
    assert rig.d.state is State.ABORTING
    rig.modem(b"\r\nNO CARRIER\r\n")
    [event] = rig.events()
    assert isinstance(event, CallAttemptFailed)
    assert isinstance(event.error, ModemTimeout)


def test_abort_that_gets_no_answer_still_ends_the_attempt() -> None:
    rig = Rig(carrier_timeout=10.0, max_attempts=1)
    rig.d.dial(rig.now)
    rig.through_init()
    rig.sent()
    rig.advance(10.0 + 5.0)
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, ModemTimeout)


def busy_schedule(seed: int, attempts: int = 5) -> list[CallAttemptFailed | CallFailed]:
    rig = Rig(seed=seed, max_attempts=attempts, max_calls_per_hour=100)
    rig.d.dial(rig.now)
    rig.through_init()
    out: list[CallAttemptFailed | CallFailed] = []
    while True:
        rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
        [event] = rig.events()
        assert isinstance(event, CallAttemptFailed | CallFailed)
        out.append(event)
        if isinstance(event, CallFailed):
            return out
        rig.advance(event.retry_at - rig.now)


def test_backoff_is_exponential_capped_and_replays_with_the_seed() -> None:
    first = busy_schedule(seed=42)
    assert [type(e) for e in first] == [CallAttemptFailed] * 4 + [CallFailed]
    assert isinstance(first[-1], CallFailed)
    assert first[-1].attempts == 5
    retries = [e.retry_at for e in first if isinstance(e, CallAttemptFailed)]
    # each attempt fails the moment it starts, so the gaps between retry times
    # are the backoff delays of attempts 2, 3, ...
    gaps = [b - a for a, b in itertools.pairwise(retries)]
    for n, gap in enumerate(gaps, start=2):
        nominal = 10.0 * 2 ** (n - 1)
        assert nominal * 0.75 <= gap <= nominal * 1.25

    def key(events: list[CallAttemptFailed | CallFailed]) -> list[tuple[object, ...]]:
        return [
            (type(e.error), e.retry_at if isinstance(e, CallAttemptFailed) else e.attempts)
            for e in events
        ]

    assert key(busy_schedule(seed=42)) == key(first)
    assert key(busy_schedule(seed=43)) != key(first)


def test_backoff_never_exceeds_its_cap() -> None:
    rig = Rig(backoff_initial=100.0, backoff_max=150.0, jitter=0.0, max_calls_per_hour=100)
    rig.d.dial(rig.now)
    rig.through_init()
    for attempt in range(1, 4):
        rig.reply(b"ATDT5551234\r", b"\r\nNO ANSWER\r\n")
        [event] = rig.events()
        assert isinstance(event, CallAttemptFailed)
        assert event.retry_at - rig.now == min(150.0, 100.0 * 2 ** (attempt - 1))
        rig.advance(event.retry_at - rig.now)


def test_calls_per_hour_cap_stops_retries_and_new_calls() -> None:
    rig = Rig(max_calls_per_hour=2, jitter=0.0)
    rig.d.dial(rig.now)
    rig.through_init()
    first_call = rig.now
    rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
    rig.advance(rig.events()[0].retry_at - rig.now)  # type: ignore[union-attr]
    rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
    rig.events()
    rig.advance(20.0)
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, CallLimitReached)
    assert event.error.retry_at == first_call + HOUR
    assert rig.sent() == b""
    # a new request inside the hour fails at once, without touching the modem
    rig.d.dial(rig.now)
    [event] = rig.events()
    assert isinstance(event.error, CallLimitReached)  # type: ignore[union-attr]
    assert rig.sent() == b""
    assert rig.d.state is State.IDLE
    # an hour after the first call one call is allowed again
    rig.now = first_call + HOUR
    rig.d.dial(rig.now)
    assert rig.sent() == b"ATZ\r"


def test_requests_in_the_wrong_state_raise_and_change_nothing() -> None:
    rig = Rig()
    with pytest.raises(LocalProtocolError):
        rig.d.send_data(b"x", rig.now)
    rig.d.dial(rig.now)
    rig.sent()
    with pytest.raises(LocalProtocolError):
        rig.d.dial(rig.now)
    with pytest.raises(LocalProtocolError):
        rig.d.answer(rig.now)
    assert rig.d.state is State.RESETTING
    assert rig.sent() == b""
    with pytest.raises(ConfigError):
        Dialler(DiallerConfig()).dial(0.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"number": "555;1234"},
        {"init_string": "Q0 V1"},
        {"init_string": "ATZ\rATDT1"},
        {"command_timeout": 0},
        {"max_attempts": 0},
        {"jitter": 1.5},
        {"auto_answer_rings": 300},
        {"backoff_factor": 0.5},
    ],
)
def test_bad_configuration_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DiallerConfig(**overrides)  # type: ignore[arg-type]


# ------------------------------------------------------------------ data mode


def test_no_carrier_text_inside_data_is_data() -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.modem(b"abc" + NO_CARRIER_BYTES)
    assert rig.events() == [DataReceived(b"abc")]
    rig.advance(0.2)
    rig.modem(b"def")
    assert rig.events() == [DataReceived(NO_CARRIER_BYTES + b"def")]
    assert rig.d.state is State.ONLINE
    assert rig.d.statistics()["false_no_carrier"] == 1


def test_no_carrier_followed_by_silence_is_carrier_loss() -> None:
    rig = Rig(carrier_confirm=0.5)
    rig.connect()
    rig.events()
    rig.modem(b"tail" + NO_CARRIER_BYTES[:5])
    rig.modem(NO_CARRIER_BYTES[5:])
    assert rig.events() == [DataReceived(b"tail")]
    rig.advance(0.49)
    assert rig.events() == []
    rig.advance(0.01)
    assert rig.events() == [CarrierLost()]
    assert rig.d.state is State.IDLE
    with pytest.raises(LocalProtocolError):
        rig.d.send_data(b"x", rig.now)


def test_partial_match_is_released_after_the_confirm_window() -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.modem(b"data\r\nNO")
    assert rig.events() == [DataReceived(b"data")]
    rig.advance(0.5)
    assert rig.events() == [DataReceived(b"\r\nNO")]
    assert rig.d.state is State.ONLINE


def test_dcd_drop_is_authoritative() -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.modem(b"x\r")
    rig.d.set_carrier_detect(False, rig.now)
    assert rig.events() == [DataReceived(b"x"), DataReceived(b"\r"), CarrierLost()]


def frame(payload: bytes) -> bytes:
    """A frame as the link puts it on the wire: 0x00 COBS(payload) 0x00."""
    return b"\x00" + cast(bytes, cobs.encode(payload)) + b"\x00"


#: Frames whose payload carries the text, so their encoding does too.
TEXT_FRAME = frame(b"hdr" + NO_CARRIER_BYTES + b"tail")
#: One that ends with it: only its closing delimiter follows the text.
TEXT_LAST_FRAME = frame(b"hdr" + NO_CARRIER_BYTES)


def online(**overrides: object) -> Rig:
    rig = Rig(**overrides)
    rig.connect()
    rig.events()
    return rig


def test_the_text_inside_a_frame_is_data_at_once() -> None:
    rig = online()
    assert NO_CARRIER_BYTES in TEXT_FRAME
    rig.modem(TEXT_FRAME)
    assert rig.events() == [DataReceived(TEXT_FRAME)]
    assert not rig.d.confirming
    assert rig.d.statistics()["false_no_carrier"] == 0


def test_our_writes_wait_while_a_no_carrier_is_confirmed_then_go_out() -> None:
    rig = online()
    cut = TEXT_FRAME.index(NO_CARRIER_BYTES) + len(NO_CARRIER_BYTES)
    rig.modem(TEXT_FRAME[:cut])  # the read ends right after the text
    assert rig.d.confirming
    rig.d.send_data(frame(b"ack"), rig.now)
    assert rig.sent() == b""  # held: a modem in command state would echo it
    rig.advance(0.1)
    rig.modem(TEXT_FRAME[cut:])  # the rest of the frame: it was data
    assert b"".join(e.data for e in rig.events() if isinstance(e, DataReceived)) == TEXT_FRAME
    assert rig.sent() == frame(b"ack")
    assert rig.d.state is State.ONLINE
    assert rig.d.statistics()["false_no_carrier"] == 1


def test_a_frame_ending_with_the_text_then_a_pause_is_data() -> None:
    rig = online()
    rig.d.send_data(frame(b"ours"), rig.now)  # a 0x00 of ours could be echoed
    rig.sent()
    rig.modem(TEXT_LAST_FRAME)  # the text, then the closing delimiter alone
    assert rig.d.confirming
    rig.advance(5.0)  # and the peer has nothing more to say
    assert b"".join(e.data for e in rig.events() if isinstance(e, DataReceived)) == (
        TEXT_LAST_FRAME
    )
    assert rig.d.state is State.ONLINE
    assert rig.d.statistics()["false_no_carrier"] == 1


def test_a_real_drop_is_confirmed_within_the_window() -> None:
    rig = online()
    rig.modem(frame(b"last") + b"\x00par" + NO_CARRIER_BYTES)  # cut mid-frame
    assert rig.events() == [DataReceived(frame(b"last") + b"\x00par")]
    rig.advance(0.24)
    assert rig.events() == []
    rig.advance(0.01)
    assert rig.events() == [CarrierLost()]
    assert rig.d.state is State.IDLE
    assert rig.d.statistics()["carrier_losses"] == 1


def test_a_drop_while_we_keep_sending_is_confirmed() -> None:
    rig = online()
    ours = [frame(b"ack-%d" % n) for n in range(3)]
    rig.d.send_data(ours[0], rig.now)
    rig.d.send_data(ours[1], rig.now)
    rig.sent()
    # the modem dropped while our second frame was on its way: it comes back
    # as command-state echo, in the same read as the NO CARRIER and after it
    rig.modem(b"data" + NO_CARRIER_BYTES + ours[1][:5])
    assert rig.events() == [DataReceived(b"data")]
    rig.advance(0.2)
    rig.modem(ours[1][5:])
    for _ in range(3):  # the link's keepalives and acks go on meanwhile
        rig.d.send_data(ours[2], rig.now)
        assert rig.sent() == b""
        rig.advance(0.08)
    assert rig.events() == []
    rig.advance(0.01)  # the window after the last echoed byte
    assert rig.events() == [CarrierLost()]
    stats = rig.d.statistics()
    assert stats["echoed_bytes"] == len(ours[1])
    assert stats["held_bytes_dropped"] == 3 * len(ours[2])
    assert stats["false_no_carrier"] == 0


def test_data_that_resembles_our_output_but_not_from_a_frame_start_is_data() -> None:
    rig = online()
    rig.d.send_data(frame(b"ours"), rig.now)
    rig.sent()
    rig.modem(NO_CARRIER_BYTES + frame(b"ours")[1:])  # no leading delimiter
    assert rig.events()[0] == DataReceived(NO_CARRIER_BYTES + frame(b"ours")[1:])
    assert rig.d.state is State.ONLINE


def test_a_second_text_after_a_false_one_is_judged_again() -> None:
    rig = online()
    rig.modem(b"x" + NO_CARRIER_BYTES)
    rig.modem(b"y\x00" + NO_CARRIER_BYTES)  # data, then the real drop
    assert rig.events() == [DataReceived(b"x"), DataReceived(NO_CARRIER_BYTES + b"y\x00")]
    rig.advance(0.25)
    assert rig.events() == [CarrierLost()]


def test_confirm_window_follows_a_slow_line() -> None:
    rig = Rig()
    rig.connect(b"CONNECT 2400/ARQ")
    rig.events()
    rig.modem(NO_CARRIER_BYTES)
    rig.advance(2.0)  # two error-corrected blocks at 2400 bit/s take 2.1 s
    assert rig.events() == []
    rig.advance(0.2)
    assert rig.events() == [CarrierLost()]


def test_hangup_while_confirming_waits_for_the_verdict() -> None:
    rig = online()
    rig.modem(NO_CARRIER_BYTES)
    rig.d.hangup(rig.now)
    rig.advance(0.25)
    assert rig.events() == [CarrierLost(), HungUp(clean=True)]
    assert rig.sent() == b""  # no escape: the modem was on hook already
    # the text was data after all: the hang-up goes ahead by escape
    rig = online()
    rig.modem(NO_CARRIER_BYTES)
    rig.d.hangup(rig.now)
    rig.modem(b"more\x00")
    assert rig.d.state is State.ESCAPE_GUARD
    rig.advance(1.2)
    assert rig.sent() == b"+++"


@given(
    st.lists(
        st.tuples(
            st.binary(max_size=40),
            st.integers(0, 40),
            st.booleans(),
            st.lists(st.integers(1, 30), max_size=4),
            st.floats(0.0, 5.0),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_framed_data_is_never_taken_for_a_drop(
    frames: list[tuple[bytes, int, bool, list[int], float, bool]],
) -> None:
    """Frames carrying the text anywhere, cut into reads anywhere, with pauses of
    any length between frames and our own frames going out at any time: all of
    it is delivered as data, in order, and every byte we send goes out."""
    rig = online()
    got = bytearray()
    wire = bytearray()
    for body, at, with_text, cuts, pause, we_send in frames:
        payload = body[:at] + (NO_CARRIER_BYTES if with_text else b"") + body[at:]
        data = frame(payload)
        wire += data
        pieces = []
        start = 0
        for cut in cuts:
            pieces.append(data[start : start + cut])
            start += cut
        pieces.append(data[start:])
        for piece in pieces:
            rig.modem(piece)
            if we_send:
                rig.d.send_data(frame(b"ours"), rig.now)
            rig.advance(0.01)  # inside a frame the bytes follow each other closely
        rig.advance(pause)
        for event in rig.events():
            assert isinstance(event, DataReceived)
            got += event.data
        rig.sent()
    rig.advance(1.0)
    for event in rig.events():
        assert isinstance(event, DataReceived)
        got += event.data
    assert bytes(got) == bytes(wire)
    assert rig.d.state is State.ONLINE
    assert not rig.d.confirming


# ------------------------------------------------------------------- hang-up


def test_hangup_by_escape_waits_for_the_guard_then_ath0() -> None:
    rig = Rig()
    rig.connect()
    rig.d.send_data(b"last", rig.now)
    rig.sent()
    sent_at = rig.now
    rig.d.hangup(rig.now)
    rig.modem(b"late data")  # the far end keeps talking: discarded
    rig.advance(1.0 + GUARD_MARGIN - 0.01)
    assert rig.sent() == b""
    rig.advance(0.01)
    assert rig.sent() == b"+++"
    assert rig.now - sent_at >= 1.0 + GUARD_MARGIN
    rig.advance(1.2)
    rig.modem(b"\r\nOK\r\n")
    rig.reply(b"ATH0\r", b"\r\nOK\r\n")
    assert rig.events()[-1] == HungUp(clean=True)
    assert rig.d.state is State.IDLE


def test_escape_without_reply_is_retried_then_reported_unclean() -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(30.0)
    assert rig.sent() == b"++++++"
    assert rig.events() == [HungUp(clean=False)]


def test_escape_echoed_by_a_modem_in_command_state_is_settled_by_ath0() -> None:
    # The modem dropped carrier without a NO CARRIER we could recognise (a
    # numeric result, say): it is in command state and echoes what we type.
    rig = Rig()
    rig.connect()
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(1.2)
    assert rig.sent() == b"+++"
    rig.modem(b"++")
    rig.modem(b"+")  # the echo, split across reads
    rig.advance(1.0 + GUARD_MARGIN - 0.01)
    assert rig.sent() == b""  # an online modem's OK would have come by now
    rig.advance(0.01)
    rig.reply(b"ATH0\r", b"\r\nOK\r\n")
    assert rig.events() == [HungUp(clean=True)]
    assert rig.d.state is State.IDLE


def test_escape_echoed_by_the_far_end_falls_back_to_another_escape() -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(1.2)
    assert rig.sent() == b"+++"
    rig.modem(b"+++")  # the far end's echo; the modem's OK gets lost
    rig.advance(1.2)
    assert rig.sent() == b"ATH0\r"  # goes down the line as data: no answer
    rig.advance(5.0)
    rig.advance(1.2)
    assert rig.sent() == b"+++"
    rig.modem(b"\r\nOK\r\n")
    rig.reply(b"ATH0\r", b"\r\nOK\r\n")
    assert rig.events() == [HungUp(clean=True)]


def test_remote_hangup_during_escape_counts_as_clean() -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(1.3)
    rig.modem(b"\r\nNO CARRIER\r\n")
    assert rig.events() == [HungUp(clean=True)]


def test_hangup_by_dtr_drop() -> None:
    rig = Rig(use_dtr=True)
    rig.connect()
    rig.events()
    rig.d.hangup(rig.now)
    rig.d.hangup(rig.now)  # idempotent while running
    assert rig.events() == [SetDTR(False)]
    rig.advance(0.5)
    assert rig.events() == [SetDTR(True)]
    rig.reply(b"AT\r", b"\r\nNO CARRIER\r\n\r\nOK\r\n")
    assert rig.events() == [HungUp(clean=True)]


def test_dtr_ignored_falls_back_to_escape() -> None:
    rig = Rig(use_dtr=True)
    rig.connect()
    rig.d.hangup(rig.now)
    rig.advance(0.5)
    assert rig.sent() == b"AT\r"
    rig.advance(5.0 + 1.2)
    assert rig.sent() == b"+++"


def test_hangup_while_dialling_aborts_the_call() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.through_init()
    rig.sent()
    rig.d.hangup(rig.now)
    assert rig.sent() == b"\r"
    rig.modem(b"\r\nNO CARRIER\r\n")
    assert rig.events() == [HungUp(clean=True)]
    assert rig.d.state is State.IDLE


def test_hangup_when_idle_or_in_backoff_is_immediate() -> None:
    rig = Rig()
    rig.d.hangup(rig.now)
    assert rig.events() == [HungUp(clean=True)]
    rig.d.dial(rig.now)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
    rig.events()
    rig.d.hangup(rig.now)
    assert rig.events() == [HungUp(clean=True)]
    assert rig.d.next_deadline() is None


# -------------------------------------------------------------------- answer


def test_answer_on_ring_with_ata() -> None:
    rig = Rig()
    rig.d.answer(rig.now)
    rig.through_init()
    assert rig.d.state is State.WAITING_FOR_RING
    rig.modem(b"\r\nRING\r\n")
    assert rig.events() == [Ringing(1)]
    rig.reply(b"ATA\r", b"\r\nCONNECT 33600\r\n")
    assert rig.events() == [Connected(33600, "", "CONNECT 33600")]


def test_auto_answer_sets_s0_and_waits_for_the_modem() -> None:
    rig = Rig(auto_answer_rings=2)
    rig.d.answer(rig.now)
    rig.through_init()
    rig.reply(b"ATS0=2\r", b"\r\nOK\r\n")
    rig.modem(b"\r\nRING\r\n\r\nRING\r\n\r\nCONNECT 28800/ARQ\r\n")
    assert rig.events() == [Ringing(1), Ringing(2), Connected(28800, "ARQ", "CONNECT 28800/ARQ")]
    assert rig.sent() == b""


def test_failed_answer_goes_back_to_waiting() -> None:
    rig = Rig(answer_timeout=30.0)
    rig.d.answer(rig.now)
    rig.through_init()
    rig.modem(b"\r\nRING\r\n")
    rig.reply(b"ATA\r", b"\r\nNO CARRIER\r\n")
    events = rig.events()
    assert isinstance(events[-1], CallAttemptFailed)
    assert isinstance(events[-1].error, NoCarrier)
    assert rig.d.state is State.WAITING_FOR_RING
    rig.modem(b"\r\nRING\r\n")
    assert rig.events() == [Ringing(1)]
    assert rig.sent() == b"ATA\r"
    rig.advance(30.0)
    assert rig.sent() == b"\r"


def test_statistics_count_calls_and_bytes() -> None:
    rig = Rig()
    rig.connect()
    rig.d.send_data(b"12345", rig.now)
    stats = rig.d.statistics()
    assert stats["calls"] == 1
    assert stats["connects"] == 1
    assert stats["bytes_out"] == 5


# ------------------------------------------------------------- properties

_MODEM_SAYS = st.sampled_from(
    [
        b"\r\nOK\r\n",
        b"\r\nERROR\r\n",
        b"\r\nBUSY\r\n",
        b"\r\nRING\r\n",
        b"\r\nNO CARRIER\r\n",
        b"\r\nCONNECT 33600/ARQ\r\n",
        b"0\r",
        b"3\r",
        b"ATZ\r",
        NO_CARRIER_BYTES,
    ]
)

_OPERATION = st.one_of(
    st.tuples(st.just("bytes"), st.one_of(_MODEM_SAYS, st.binary(max_size=64))),
    st.tuples(st.just("wait"), st.floats(0.0, 120.0)),
    st.tuples(st.sampled_from(["dial", "answer", "hangup", "send", "dcd"]), st.none()),
)


@given(st.lists(_OPERATION, max_size=60), st.booleans())
def test_any_modem_behaviour_keeps_the_core_consistent(
    operations: list[tuple[str, object]], use_dtr: bool
) -> None:
    rig = Rig(use_dtr=use_dtr, max_attempts=3)
    for op, argument in operations:
        _apply(rig, op, argument)
        _settle(rig)
    if rig.d.state is State.IDLE:
        assert rig.d.next_deadline() is None


def _apply(rig: Rig, op: str, argument: object) -> None:
    """Do one operation of a generated scenario; a refused request changes nothing."""
    if op == "bytes":
        assert isinstance(argument, bytes)
        rig.modem(argument)
    elif op == "wait":
        assert isinstance(argument, float)
        rig.advance(argument)
    elif op == "dcd":
        rig.d.set_carrier_detect(False, rig.now)
    else:
        before = rig.d.state
        try:
            if op == "send":
                rig.d.send_data(b"x", rig.now)
            else:
                getattr(rig.d, op)(rig.now)
        except LocalProtocolError:
            assert rig.d.state is before


def _settle(rig: Rig) -> None:
    """Handle the deadlines due now: none is left in the past, and every failure is typed."""
    for _ in range(3):
        deadline = rig.d.next_deadline()
        if deadline is None or deadline > rig.now:
            break
        rig.d.handle_deadline(rig.now)
    deadline = rig.d.next_deadline()
    assert deadline is None or deadline > rig.now
    for event in rig.events():
        if isinstance(event, CallFailed | CallAttemptFailed | PrepareFailed):
            assert isinstance(event.error, ModemError)
    rig.sent()


def test_silent_init_string_is_a_timeout() -> None:
    rig = Rig()
    rig.d.dial(rig.now)
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.advance(1.0)
    assert rig.sent() == INIT.encode() + b"\r"
    rig.advance(4.99)
    assert rig.events() == []
    rig.advance(0.01)
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, ModemTimeout)


@pytest.mark.parametrize("answer", [b"", b"\r\nERROR\r\n"])
def test_ath0_not_confirmed_is_an_unclean_hangup(answer: bytes) -> None:
    rig = Rig()
    rig.connect()
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(1.2)
    assert rig.sent() == b"+++"
    rig.modem(b"\r\nOK\r\n")
    rig.reply(b"ATH0\r", answer)
    rig.advance(5.0)
    assert rig.events() == [HungUp(clean=False)]
    assert rig.d.state is State.IDLE


# ------------------------------------------------------- ready between calls


def ready_rig(**overrides: object) -> Rig:
    """A rig whose modem has been prepared: READY, events and output consumed."""
    rig = Rig(keep_ready=True, **overrides)
    rig.d.prepare(rig.now)
    rig.through_init()
    assert rig.events() == [Ready()]
    assert rig.d.state is State.READY
    return rig


def test_prepare_resets_initialises_and_rests_ready() -> None:
    rig = Rig()
    rig.d.prepare(rig.now)
    assert rig.d.preparing
    assert not rig.d.in_call
    rig.through_init()
    assert rig.events() == [Ready()]
    assert rig.d.state is State.READY
    assert rig.d.next_deadline() is None
    assert rig.sent() == b""
    rig.modem(b"\r\nRING\r\n")  # chatter while resting is not acted on
    assert rig.events() == []
    assert rig.sent() == b""
    assert rig.d.statistics()["prepares"] == 1


def test_dial_from_ready_probes_then_dials_without_reset_or_pause() -> None:
    rig = ready_rig()
    rig.d.dial(rig.now)
    assert rig.d.state is State.PROBING
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    # no ATZ, no reset pause: the dial command goes out in the same instant
    assert cast(State, rig.d.state) is State.DIALLING
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    assert rig.events() == [Connected(33600, "", "CONNECT 33600")]
    stats = rig.d.statistics()
    assert (stats["ready_dials"], stats["probe_failures"], stats["calls"]) == (1, 0, 1)


def test_unanswered_probe_falls_back_to_the_full_reset() -> None:
    rig = ready_rig()
    rig.d.dial(rig.now)
    assert rig.sent() == b"AT\r"  # the modem was unplugged meanwhile: silence
    rig.advance(4.99)
    assert rig.sent() == b""
    rig.advance(0.01)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    assert [type(e) for e in rig.events()] == [Connected]
    assert rig.d.statistics()["probe_failures"] == 1


def test_power_cycled_modem_answering_error_to_the_probe_is_reset_in_full() -> None:
    # The USR5637 answers ERROR to the first command after power-up: here
    # that command is our probe, and the ATZ that follows gets OK.
    rig = ready_rig()
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nERROR\r\n")
    rig.through_init()
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    assert [type(e) for e in rig.events()] == [Connected]
    assert rig.d.statistics()["probe_failures"] == 1


def test_prepare_handles_error_to_the_first_command_after_power_up() -> None:
    rig = Rig(keep_ready=True)
    rig.d.prepare(rig.now)
    rig.reply(b"ATZ\r", b"\r\nERROR\r\n")
    rig.through_init()
    assert rig.events() == [Ready()]


def test_dial_while_preparing_follows_the_init_without_a_probe() -> None:
    rig = Rig(keep_ready=True)
    rig.d.prepare(rig.now)
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.d.dial(rig.now)  # during the reset pause
    assert not rig.d.preparing
    assert rig.d.in_call
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nOK\r\n")
    assert rig.sent() == b"ATDT5551234\r"
    assert rig.events() == []  # no Ready: the dial took the prepared modem


def test_failed_preparation_rests_idle_and_the_next_dial_resets_in_full() -> None:
    rig = Rig(keep_ready=True)
    rig.d.prepare(rig.now)
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nERROR\r\n")
    [event] = rig.events()
    assert isinstance(event, PrepareFailed)
    assert isinstance(event.error, ModemCommandError)
    # not retried on its own: nothing to send, nothing scheduled
    assert rig.d.state is State.IDLE
    assert rig.d.next_deadline() is None
    rig.advance(3600.0)
    assert rig.sent() == b""
    assert rig.d.statistics()["prepare_failures"] == 1
    rig.d.dial(rig.now)
    rig.through_init()
    assert rig.sent() == b"ATDT5551234\r"


def test_silent_modem_fails_the_preparation_after_three_resets() -> None:
    rig = Rig(keep_ready=True)
    rig.d.prepare(rig.now)
    rig.advance(60.0)
    assert rig.sent() == b"ATZ\r+++ATZ\r+++ATZ\r"
    [event] = rig.events()
    assert isinstance(event, PrepareFailed)
    assert isinstance(event.error, ModemTimeout)
    assert rig.d.next_deadline() is None


def test_modem_is_prepared_again_after_a_hangup() -> None:
    rig = ready_rig()
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(1.2)
    assert rig.sent() == b"+++"
    rig.advance(1.2)
    rig.modem(b"\r\nOK\r\n")
    rig.reply(b"ATH0\r", b"\r\nOK\r\n")
    assert rig.events() == [HungUp(clean=True)]
    rig.through_init()  # ATZ at once, the pause, the init string
    assert rig.events() == [Ready()]
    assert rig.d.state is State.READY
    # and the next call goes from ready
    rig.d.dial(rig.now)
    assert rig.sent() == b"AT\r"


def test_modem_is_prepared_again_after_a_dtr_hangup() -> None:
    rig = ready_rig(use_dtr=True)
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    rig.events()
    rig.d.hangup(rig.now)
    rig.advance(0.5)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    assert rig.events() == [SetDTR(False), SetDTR(True), HungUp(clean=True)]
    rig.through_init()
    assert rig.events() == [Ready()]


def test_modem_is_prepared_again_after_an_in_band_drop() -> None:
    rig = ready_rig()
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    rig.events()
    rig.modem(NO_CARRIER_BYTES)
    rig.advance(0.25)
    assert rig.events() == [CarrierLost()]
    rig.d.hangup(rig.now)  # what the link does next: nothing to hang up
    assert rig.events() == [HungUp(clean=True)]
    rig.through_init()
    assert rig.events() == [Ready()]


def test_modem_is_prepared_again_after_a_call_that_failed() -> None:
    rig = ready_rig(max_attempts=2, jitter=0.0)
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
    [event] = rig.events()
    assert isinstance(event, CallAttemptFailed)
    rig.advance(event.retry_at - rig.now)
    # the modem answered BUSY in command state, set up: the retry dials at once
    rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
    [failed] = rig.events()
    assert isinstance(failed, CallFailed)
    assert isinstance(failed.error, Busy)
    rig.through_init()
    assert rig.events() == [Ready()]


def test_retry_after_an_unanswered_abort_resets_first() -> None:
    rig = ready_rig(carrier_timeout=10.0, jitter=0.0)
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    assert rig.sent() == b"ATDT5551234\r"
    rig.advance(10.0)
    assert rig.sent() == b"\r"
    rig.advance(5.0)  # the modem says nothing: its state is unknown
    [event] = rig.events()
    assert isinstance(event, CallAttemptFailed)
    rig.advance(event.retry_at - rig.now)
    rig.through_init()
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    assert [type(e) for e in rig.events()] == [Connected]
    assert rig.d.statistics()["retry_resets"] == 1


def test_hangup_while_ready_or_preparing_leaves_the_modem_prepared() -> None:
    rig = ready_rig()
    rig.d.hangup(rig.now)
    assert rig.events() == [HungUp(clean=True)]
    assert rig.d.state is State.READY
    assert rig.sent() == b""
    rig.d.prepare(rig.now)
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.d.hangup(rig.now)
    assert rig.events() == [HungUp(clean=True)]
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nOK\r\n")
    assert rig.events() == [Ready()]


def test_hangup_abandons_a_dial_waiting_for_the_preparation() -> None:
    rig = Rig(keep_ready=True)
    rig.d.dial(rig.now)  # from IDLE: the full path
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.d.hangup(rig.now)
    assert rig.events() == [HungUp(clean=True)]
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nOK\r\n")
    assert rig.events() == [Ready()]
    assert rig.sent() == b""  # no dial command
    # the same during the probe
    rig.d.dial(rig.now)
    assert rig.sent() == b"AT\r"
    rig.d.hangup(rig.now)
    assert rig.events() == [HungUp(clean=True)]
    rig.modem(b"AT\r\r\nOK\r\n")
    assert rig.events() == [Ready()]
    assert rig.sent() == b""
    assert rig.d.statistics()["calls"] == 0


def test_hourly_cap_from_ready_fails_at_once_and_stays_ready() -> None:
    rig = ready_rig(max_calls_per_hour=1)
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    rig.reply(b"ATDT5551234\r", b"\r\nCONNECT 33600\r\n")
    rig.modem(NO_CARRIER_BYTES)
    rig.advance(0.25)
    rig.through_init()
    rig.events()
    rig.d.dial(rig.now)
    [event] = rig.events()
    assert isinstance(event, CallFailed)
    assert isinstance(event.error, CallLimitReached)
    assert rig.sent() == b""
    assert rig.d.state is State.READY


def test_cap_reached_while_preparing_leaves_the_preparation_running() -> None:
    rig = ready_rig(max_calls_per_hour=1, max_attempts=1)
    rig.d.dial(rig.now)
    rig.reply(b"AT\r", b"\r\nOK\r\n")
    rig.reply(b"ATDT5551234\r", b"\r\nBUSY\r\n")
    rig.events()
    assert rig.sent() == b"ATZ\r"  # preparing again
    rig.d.dial(rig.now)
    [event] = rig.events()
    assert isinstance(event.error, CallLimitReached)  # type: ignore[union-attr]
    assert rig.d.preparing
    rig.modem(b"\r\nOK\r\n")
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nOK\r\n")
    assert rig.events() == [Ready()]


def test_answer_mode_is_unchanged_by_keep_ready() -> None:
    rig = Rig(keep_ready=True)
    rig.d.answer(rig.now)
    rig.through_init()
    assert rig.d.state is State.WAITING_FOR_RING
    rig.modem(b"\r\nRING\r\n")
    rig.reply(b"ATA\r", b"\r\nCONNECT 33600\r\n")
    rig.events()
    rig.modem(NO_CARRIER_BYTES)
    rig.advance(0.25)
    assert rig.events() == [CarrierLost()]
    # central's side answers again (with its own reset): nothing prepared meanwhile
    assert cast(State, rig.d.state) is State.IDLE
    assert rig.sent() == b""
    assert rig.d.next_deadline() is None


def test_answer_takes_over_a_preparation_under_way() -> None:
    rig = Rig(auto_answer_rings=2)
    rig.d.prepare(rig.now)
    rig.reply(b"ATZ\r", b"\r\nOK\r\n")
    rig.d.answer(rig.now)
    rig.advance(1.0)
    rig.reply(INIT.encode() + b"\r", b"\r\nOK\r\n")
    rig.reply(b"ATS0=2\r", b"\r\nOK\r\n")
    assert rig.d.state is State.WAITING_FOR_RING
    assert rig.events() == []


def test_answer_from_ready_resets_as_from_idle() -> None:
    rig = ready_rig()
    rig.d.answer(rig.now)
    rig.through_init()
    assert rig.d.state is State.WAITING_FOR_RING


def test_prepare_refused_during_a_call() -> None:
    rig = ready_rig()
    rig.d.dial(rig.now)
    with pytest.raises(LocalProtocolError):
        rig.d.prepare(rig.now)
    with pytest.raises(LocalProtocolError):
        rig.d.dial(rig.now)
    assert rig.d.state is State.PROBING


@given(st.lists(_OPERATION, max_size=60), st.booleans())
def test_any_modem_behaviour_keeps_a_ready_core_consistent(
    operations: list[tuple[str, object]], use_dtr: bool
) -> None:
    rig = Rig(use_dtr=use_dtr, max_attempts=3, keep_ready=True)
    rig.d.prepare(rig.now)
    for op, argument in [*operations, ("prepare", None), ("wait", 120.0)]:
        _apply(rig, op, argument)
        _settle(rig)
        if rig.d.state in (State.IDLE, State.READY):
            assert rig.d.next_deadline() is None
            assert not rig.d.in_call


# ------------------------------------------- against the emulator's core


class Pair:
    """The dialler core wired to the modem emulator's core, under one fake clock."""

    def __init__(self, **hayes: object) -> None:
        fields: dict[str, object] = {"phonebook": {"5551234": "127.0.0.1:7000"}, **hayes}
        self.modem = HayesModem(HayesConfig(**fields))  # type: ignore[arg-type]
        self.d = Dialler(DiallerConfig(number="5551234", seed=3, keep_ready=True))
        self.now = 0.0
        self.events: list[DiallerEvent] = []

    def pump(self) -> None:
        for _ in range(50):
            to_modem = self.d.bytes_to_send()
            if to_modem:
                self.modem.receive_from_dte(to_modem, self.now)
            to_dialler = self.modem.bytes_to_dte(self.now)
            if to_dialler:
                self.d.receive_bytes(to_dialler, self.now)
            while (action := self.modem.next_event()) is not None:
                if isinstance(action, OpenLine):
                    self.modem.line_connected(self.now)
            while (event := self.d.next_event()) is not None:
                self.events.append(event)
            if not to_modem and not to_dialler:
                return

    def run_until(self, *states: State) -> None:
        for _ in range(2000):
            self.pump()
            if self.d.state in states:
                return
            times = [t for t in (self.d.next_deadline(), self.modem.next_deadline()) if t]
            self.now = max(self.now + 0.01, min(times)) if times else self.now + 1.0
            self.d.handle_deadline(self.now)
            self.modem.handle_deadline(self.now)
        raise AssertionError(f"stuck in {self.d.state}")

    def take_commands(self, since: int) -> list[str]:
        return self.modem.commands()[since:]


def test_emulated_modem_prepared_then_dialled_from_ready() -> None:
    pair = Pair()
    pair.d.prepare(pair.now)
    pair.run_until(State.READY)
    assert pair.modem.commands() == ["ATZ", "ATQ0 V1 E1 S0=0 &C1 &D2"]
    pair.d.dial(pair.now)
    pair.run_until(State.ONLINE)
    assert pair.take_commands(2) == ["AT", "ATDT5551234"]
    assert pair.events[-1] == Connected(33600, "", "CONNECT 33600")
    pair.d.hangup(pair.now)
    pair.run_until(State.READY)
    assert HungUp(clean=True) in pair.events
    # escape, ATH0, then the next call's preparation at once
    assert pair.take_commands(4) == ["ATH0", "ATZ", "ATQ0 V1 E1 S0=0 &C1 &D2"]


def test_emulated_modem_power_cycled_while_ready_is_reset_before_the_dial() -> None:
    pair = Pair(error_first=True)
    pair.d.prepare(pair.now)
    pair.run_until(State.READY)
    # ERROR to the first ATZ after power-up, then the reset and init
    assert pair.modem.commands() == ["ATZ", "ATZ", "ATQ0 V1 E1 S0=0 &C1 &D2"]
    pair.modem.power_off(pair.now)
    pair.modem.power_on(pair.now)
    pair.d.dial(pair.now)
    pair.run_until(State.ONLINE)
    assert pair.take_commands(3) == ["AT", "ATZ", "ATQ0 V1 E1 S0=0 &C1 &D2", "ATDT5551234"]
    assert pair.d.statistics()["probe_failures"] == 1


def test_emulated_modem_without_power_fails_the_dial_then_comes_back() -> None:
    pair = Pair()
    pair.d.prepare(pair.now)
    pair.run_until(State.READY)
    pair.modem.power_off(pair.now)
    pair.d.dial(pair.now)
    pair.run_until(State.IDLE)
    [failed] = [e for e in pair.events if isinstance(e, CallFailed)]
    assert isinstance(failed.error, ModemTimeout)
    assert pair.d.statistics()["probe_failures"] == 1
    assert pair.d.next_deadline() is None  # no preparation loop on a dead modem
    assert pair.modem.commands() == ["ATZ", "ATQ0 V1 E1 S0=0 &C1 &D2"]  # it heard nothing
    pair.modem.power_on(pair.now)
    pair.d.dial(pair.now)
    pair.run_until(State.ONLINE)
    assert pair.take_commands(2) == ["ATZ", "ATQ0 V1 E1 S0=0 &C1 &D2", "ATDT5551234"]
