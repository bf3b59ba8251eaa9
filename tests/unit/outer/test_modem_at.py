"""The AT result parser: classification, line endings, echo, bounds, hand-over to data."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import LocalProtocolError
from firmware.outer.modem.at import (
    MAX_LINE,
    EchoLine,
    FinalResult,
    InformationLine,
    ResultCode,
    ResultParser,
    UnsolicitedResult,
    classify_line,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def events_of(data: bytes, parser: ResultParser | None = None) -> list[object]:
    parser = parser or ResultParser()
    parser.receive_bytes(data)
    out = []
    while (event := parser.next_event()) is not None:
        out.append(event)
    return out


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("OK", ResultCode.OK),
        ("ERROR", ResultCode.ERROR),
        ("BUSY", ResultCode.BUSY),
        ("NO CARRIER", ResultCode.NO_CARRIER),
        ("NO DIALTONE", ResultCode.NO_DIALTONE),
        ("NO DIAL TONE", ResultCode.NO_DIALTONE),
        ("NO ANSWER", ResultCode.NO_ANSWER),
        ("ok", ResultCode.OK),
        ("+CME ERROR: 30", ResultCode.ERROR),
    ],
)
def test_verbose_final_results(text: str, code: ResultCode) -> None:
    assert events_of(f"\r\n{text}\r\n".encode()) == [FinalResult(code, text)]


@pytest.mark.parametrize(
    ("line", "speed", "protocol"),
    [
        ("CONNECT", None, ""),
        ("CONNECT 33600", 33600, ""),
        ("CONNECT 33600/ARQ/V34/LAPM/V42BIS", 33600, "ARQ/V34/LAPM/V42BIS"),
        ("CONNECT 115200", 115200, ""),
        ("CONNECT 26400/ARQ", 26400, "ARQ"),
        ("CONNECT 31200 / V.34 / LAPM", 31200, "V.34 / LAPM"),
        ("CONNECT 1200/REL", 1200, "REL"),
        ("CONNECT/ARQ", None, "ARQ"),
    ],
)
def test_connect_speed_and_suffix(line: str, speed: int | None, protocol: str) -> None:
    assert classify_line(line) == FinalResult(ResultCode.CONNECT, line, speed, protocol)


@pytest.mark.parametrize(
    ("digits", "code", "speed"),
    [
        ("0", ResultCode.OK, None),
        ("1", ResultCode.CONNECT, None),
        ("3", ResultCode.NO_CARRIER, None),
        ("4", ResultCode.ERROR, None),
        ("5", ResultCode.CONNECT, 1200),
        ("6", ResultCode.NO_DIALTONE, None),
        ("7", ResultCode.BUSY, None),
        ("8", ResultCode.NO_ANSWER, None),
        ("10", ResultCode.CONNECT, 2400),
    ],
)
def test_numeric_results_end_in_bare_cr(digits: str, code: ResultCode, speed: int | None) -> None:
    assert events_of(f"{digits}\r".encode()) == [FinalResult(code, digits, speed)]


def test_ring_is_unsolicited_in_both_forms() -> None:
    assert events_of(b"\r\nRING\r\n2\r") == [
        UnsolicitedResult(ResultCode.RING, "RING"),
        UnsolicitedResult(ResultCode.RING, "2"),
    ]


def test_register_values_and_unknown_numbers_are_information() -> None:
    assert events_of(b"\r\n050\r\n\r\n99\r\n\r\nU.S. Robotics 56K\r\n\r\nCONNECTED\r\n") == [
        InformationLine("050"),
        InformationLine("99"),
        InformationLine("U.S. Robotics 56K"),
        InformationLine("CONNECTED"),
    ]


@pytest.mark.parametrize("ending", [b"\r\n", b"\r", b"\n", b"\n\r", b"\r\r\n"])
def test_line_endings_and_blank_lines(ending: bytes) -> None:
    data = ending + b"ATI3" + ending + ending + b"info" + ending + b"OK" + ending
    parser = ResultParser()
    parser.command_sent("ATI3")
    assert events_of(data, parser) == [
        EchoLine("ATI3"),
        InformationLine("info"),
        FinalResult(ResultCode.OK, "OK"),
    ]


def test_echo_matches_ignoring_case_and_spaces_once() -> None:
    parser = ResultParser()
    parser.command_sent("ATQ0 V1 E1")
    got = events_of(b"atq0v1e1\r\r\nOK\r\n", parser)
    assert got == [EchoLine("atq0v1e1"), FinalResult(ResultCode.OK, "OK")]
    assert parser.statistics()["echoes"] == 1
    # without a pending command the same text is just information
    assert events_of(b"atq0v1e1\r\n", parser) == [InformationLine("atq0v1e1")]


def test_echo_off_still_parses() -> None:
    parser = ResultParser()
    parser.command_sent("ATZ")
    assert events_of(b"\r\nOK\r\n", parser) == [FinalResult(ResultCode.OK, "OK")]


def test_byte_at_a_time_equals_whole() -> None:
    data = b"ATZ\r\r\nOK\r\n\r\nRING\r\nATDT123\r\r\nBUSY\r\n0\r"
    whole = ResultParser()
    whole.command_sent("ATZ")
    single = ResultParser()
    single.command_sent("ATZ")
    got = []
    for i in range(len(data)):
        single.receive_bytes(data[i : i + 1])
        while (event := single.next_event()) is not None:
            got.append(event)
    assert got == events_of(data, whole)


def test_overlong_line_is_discarded_and_counted() -> None:
    parser = ResultParser()
    noise = bytes(range(32, 127)) * 10  # 950 bytes, no terminator
    parser.receive_bytes(noise)
    assert parser.pending_line_length() <= MAX_LINE
    assert events_of(b"\r\nOK\r\n", parser) == [FinalResult(ResultCode.OK, "OK")]
    stats = parser.statistics()
    assert stats["overlong_lines"] == 1
    assert stats["discarded_bytes"] == len(noise)


def test_connect_halts_and_hands_over_following_bytes() -> None:
    parser = ResultParser()
    got = events_of(b"\r\nCONNECT 33600\r\n\x00data\r\nOK\r\n", parser)
    assert got == [FinalResult(ResultCode.CONNECT, "CONNECT 33600", 33600, "")]
    assert parser.halted
    parser.receive_bytes(b"more")
    assert parser.next_event() is None
    assert parser.detach() == b"\x00data\r\nOK\r\nmore"
    assert not parser.halted
    assert not parser.pending_lf


def test_connect_split_before_its_lf_sets_pending_lf() -> None:
    parser = ResultParser()
    events_of(b"\r\nCONNECT 2400\r", parser)
    assert parser.detach() == b""
    assert parser.pending_lf


def test_detach_without_connect_is_a_usage_error() -> None:
    parser = ResultParser()
    parser.receive_bytes(b"OK\r\nhalf a li")
    with pytest.raises(LocalProtocolError):
        parser.detach()
    # state unchanged: the partial line is still there
    assert parser.pending_line_length() == len("half a li")


@given(st.binary(max_size=2000))
def test_random_bytes_never_crash_and_stay_bounded(data: bytes) -> None:
    parser = ResultParser()
    parser.command_sent("ATZ")
    parser.receive_bytes(data)
    assert parser.pending_line_length() <= MAX_LINE
    while (event := parser.next_event()) is not None:
        assert isinstance(event, FinalResult | UnsolicitedResult | InformationLine | EchoLine)
    if parser.halted:
        parser.detach()


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_chunking_never_changes_the_events(data: bytes, cuts: list[int]) -> None:
    whole = ResultParser()
    expected = events_of(data, whole)
    chunked = ResultParser()
    got = []
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for start, end in itertools.pairwise(points):
        chunked.receive_bytes(data[start:end])
        while (event := chunked.next_event()) is not None:
            got.append(event)
    assert got == expected
    if whole.halted:
        assert chunked.detach() == whole.detach()


@given(
    st.lists(
        st.sampled_from(["OK", "ERROR", "BUSY", "RING", "NO CARRIER", "info", "0", "4", "050"]),
        max_size=20,
    ),
    st.sampled_from(["\r\n", "\r", "\n"]),
    st.binary(max_size=300),
)
def test_results_survive_preceding_noise(lines: list[str], ending: str, noise: bytes) -> None:
    parser = ResultParser()
    parser.receive_bytes(noise.replace(b"CONNECT", b"") + b"\r")
    while parser.next_event() is not None:
        pass
    if parser.halted:
        return
    body = "".join(f"{ending}{line}{ending}" for line in lines).encode()
    got = [
        e.text
        for e in events_of(body, parser)
        if isinstance(e, FinalResult | UnsolicitedResult | InformationLine)
    ]
    assert got == lines
