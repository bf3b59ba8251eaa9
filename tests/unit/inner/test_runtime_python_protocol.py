"""The Python runtime's pure parts: the worker wire codec, one call, reply interpretation."""

from __future__ import annotations

import json
import struct
from typing import Any, NoReturn

import pytest

from firmware.inner.runtimes.base import (
    MAX_ERROR_MESSAGE_CHARS,
    AlgorithmCrashed,
    AlgorithmError,
    Limits,
    MemoryLimitExceeded,
    Outcome,
    ResultTooLarge,
    truncate_message,
)
from firmware.inner.runtimes.python import interpret_reply
from firmware.inner.runtimes.pyworker import (
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    Message,
    encode_message,
    run_call,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

LIMITS = Limits(timeout_s=1.0, memory_mb=64, max_result_bytes=1000)


def _frame(header: dict[str, Any], data: bytes = b"") -> bytes:
    head, body = encode_message(header, data)
    return head + body


def _drain(decoder: FrameDecoder) -> list[Message]:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


# ----------------------------------------------------------------------- codec


def test_frames_decode_whole_byte_by_byte_and_back_to_back() -> None:
    stream = _frame({"t": "a", "n": 1}, b"\x00\xff" * 10) + _frame({"t": "b"}) + _frame({"t": "c"})
    whole = FrameDecoder(1 << 20)
    whole.receive_bytes(stream)
    expected = [({"t": "a", "n": 1}, b"\x00\xff" * 10), ({"t": "b"}, b""), ({"t": "c"}, b"")]
    assert _drain(whole) == expected
    assert whole.buffered == 0

    trickle = FrameDecoder(1 << 20)
    got: list[Message] = []
    for i in range(len(stream)):
        trickle.receive_bytes(stream[i : i + 1])
        got += _drain(trickle)
    assert got == expected


def test_trailing_partial_frame_stays_buffered() -> None:
    frame = _frame({"t": "x"}, b"data")
    decoder = FrameDecoder(1 << 20)
    decoder.receive_bytes(frame + frame[:5])
    assert _drain(decoder) == [({"t": "x"}, b"data")]
    assert decoder.buffered == 5
    decoder.receive_bytes(frame[5:])
    assert _drain(decoder) == [({"t": "x"}, b"data")]


def test_oversized_frame_is_refused_from_its_prefix_alone() -> None:
    decoder = FrameDecoder(100)
    with pytest.raises(FrameTooLarge):
        decoder.receive_bytes(struct.pack(">II", 50, 51))
    ok = FrameDecoder(100)
    ok.receive_bytes(struct.pack(">II", 50, 50))
    assert ok.next_message() is None


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1, 2]",
        b'{"no_type": 1}',
        b'{"t": 5}',
        b'{"t": "ok", "v": NaN}',
        b"[" * 100_000,
    ],
)
def test_header_must_be_a_json_object_with_a_type(header: bytes) -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.receive_bytes(struct.pack(">II", len(header), 0) + header)
    with pytest.raises(FrameError):
        decoder.next_message()


def test_encoding_refuses_what_json_cannot_say() -> None:
    for bad in ({"t": "x", "v": {1, 2}}, {"t": "x", "v": float("nan")}, {"t": "x", "v": b"raw"}):
        with pytest.raises((TypeError, ValueError)):
            encode_message(bad)


# -------------------------------------------------------------------- one call


def _reply(frame: tuple[bytes, bytes]) -> Message:
    decoder = FrameDecoder(1 << 24)
    decoder.receive_bytes(frame[0] + frame[1])
    message = decoder.next_message()
    assert message is not None
    return message


def _call(function: Any, data: bytes = b"", max_result: int = 1000) -> Message:
    """Run one call; return its reply without ``run_us`` (checked here, it varies)."""
    header, out = _reply(run_call(function, 7, {"p": 1}, data, max_result, MAX_ERROR_MESSAGE_CHARS))
    if header["t"] != "crash":
        run_us = header.pop("run_us")
        assert type(run_us) is int
        assert run_us >= 0
    return header, out


def test_call_returning_a_dict_or_a_pair() -> None:
    assert _call(lambda p, d: {"got": p}) == (
        {"t": "ok", "id": 7, "result": {"got": {"p": 1}}},
        b"",
    )
    header, data = _call(lambda p, d: ({"n": len(d)}, bytearray(d[::-1])), b"abc")
    assert header == {"t": "ok", "id": 7, "result": {"n": 3}}
    assert data == b"cba"


def test_value_error_becomes_a_capped_message() -> None:
    def refuse(p: Any, d: bytes) -> NoReturn:
        raise json.JSONDecodeError("Expecting value", "x" * 10, 3)

    header, _ = _call(refuse)
    assert header["t"] == "error"
    assert header["message"].startswith("Expecting value: line 1 column 4")

    def verbose(p: Any, d: bytes) -> NoReturn:
        raise ValueError("y" * 5000)

    assert len(_call(verbose)[0]["message"]) == MAX_ERROR_MESSAGE_CHARS

    def silent(p: Any, d: bytes) -> NoReturn:
        raise ValueError

    assert _call(silent)[0]["message"] == "ValueError"


def test_other_exceptions_memory_and_bad_results_are_crashes() -> None:
    def boom(p: Any, d: bytes) -> NoReturn:
        raise KeyError("internal")

    def starve(p: Any, d: bytes) -> NoReturn:
        raise MemoryError

    def leave(p: Any, d: bytes) -> NoReturn:
        raise SystemExit(1)

    header, _ = _call(boom)
    assert (header["t"], header["kind"]) == ("crash", "exception")
    assert "KeyError" in header["detail"]
    assert _call(starve)[0]["kind"] == "memory"
    assert _call(leave)[0]["kind"] == "exception"
    bad_results: list[Any] = [[1], ({}, "text"), ({}, b"", b""), {"v": {1}}, {"v": float("inf")}]
    for bad in [*bad_results, None]:
        header, _ = _call(lambda p, d, bad=bad: bad)
        assert (header["t"], header["kind"]) == ("crash", "bad_result"), bad


def test_result_size_counts_result_json_plus_data() -> None:
    # {"a":""} is 8 bytes of JSON.
    assert _call(lambda p, d: ({"a": ""}, b"x" * 992))[0]["t"] == "ok"
    header, data = _call(lambda p, d: ({"a": ""}, b"x" * 993))
    assert header == {"t": "too_large", "id": 7, "size": 1001}
    assert data == b""


# ------------------------------------------------------------ reply meanings


def test_ok_reply_is_an_outcome_and_keeps_the_worker() -> None:
    verdict = interpret_reply({"t": "ok", "id": 3, "result": {"a": 1}}, b"out", 3, LIMITS)
    assert verdict.outcome == Outcome({"a": 1}, b"out")
    assert verdict.failure is None
    assert verdict.keep_worker


def test_error_and_too_large_replies_keep_the_worker() -> None:
    error = interpret_reply({"t": "error", "id": 3, "message": "bad line 4"}, b"", 3, LIMITS)
    assert isinstance(error.failure, AlgorithmError)
    assert error.failure.message == "bad line 4"
    assert error.keep_worker
    big = interpret_reply({"t": "too_large", "id": 3, "size": 5000}, b"", 3, LIMITS)
    assert isinstance(big.failure, ResultTooLarge)
    assert big.keep_worker


def test_crash_replies_replace_the_worker_and_hide_the_detail() -> None:
    crash = {"t": "crash", "id": 3, "kind": "exception", "detail": "Traceback: secret"}
    verdict = interpret_reply(crash, b"", 3, LIMITS)
    assert type(verdict.failure) is AlgorithmCrashed
    assert "secret" not in str(verdict.failure)
    assert verdict.log_detail == "Traceback: secret"
    assert not verdict.keep_worker
    memory = interpret_reply({**crash, "kind": "memory"}, b"", 3, LIMITS)
    assert isinstance(memory.failure, MemoryLimitExceeded)
    assert "64 MB" in str(memory.failure)


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({"t": "ok", "id": 2, "result": {}}, b""),  # answer to another call
        ({"t": "ok", "id": 3, "result": [1]}, b""),  # result not an object
        ({"t": "ok", "id": 3, "result": {}}, b"x" * 999),  # lied about the size
        ({"t": "error", "id": 3}, b""),
        ({"t": "too_large", "id": 3, "size": "big"}, b""),
        ({"t": "ready", "id": 3}, b""),
        ({"t": "ok", "result": {}}, b""),
    ],
)
def test_protocol_violations_replace_the_worker(header: dict[str, Any], data: bytes) -> None:
    verdict = interpret_reply(header, data, 3, LIMITS)
    assert verdict.outcome is None
    assert isinstance(verdict.failure, AlgorithmCrashed | ResultTooLarge)
    assert not verdict.keep_worker


# ---------------------------------------------------------------- base types


def test_limits_and_messages_are_validated() -> None:
    for bad in ((0, 1, 1), (1, 0, 1), (1, 1, 0), (float("nan"), 1, 1)):
        with pytest.raises(ValueError):
            Limits(*bad)
    assert truncate_message("abc", 10) == "abc"
    assert truncate_message("abcdefghijkl", 5) == "abcd\u2026"
    assert AlgorithmError("z" * 5000).message == "z" * (MAX_ERROR_MESSAGE_CHARS - 1) + "\u2026"
