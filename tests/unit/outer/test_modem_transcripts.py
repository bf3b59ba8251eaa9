"""Transcripts of real modems (tests/vectors/modem) replayed through the parser and dialler."""

from __future__ import annotations

import codecs
import dataclasses
import re
from pathlib import Path

import pytest

from firmware.outer.modem.at import FinalResult, ResultCode, ResultParser, classify_line
from firmware.outer.modem.dialler import Dialler, DiallerConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "modem"
TRANSCRIPTS = sorted(VECTORS.glob("*.txt"))


def unescape(text: str) -> bytes:
    return codecs.decode(text, "unicode_escape").encode("latin-1")


def config_from(lines: list[str]) -> DiallerConfig:
    defaults = DiallerConfig()
    fields: dict[str, object] = {}
    for line in lines:
        name, _, value = line[1:].strip().partition("=")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            fields[name] = value == "True"
        elif isinstance(default, float):
            fields[name] = float(value)
        elif isinstance(default, int) or default is None:
            fields[name] = int(value)
        else:
            fields[name] = value
    return dataclasses.replace(defaults, **fields)  # type: ignore[arg-type]


def describe(event: object, field: str) -> str:
    value = getattr(event, field)
    if isinstance(value, Exception):
        return type(value).__name__
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def replay(path: Path) -> Dialler:
    lines = [line.rstrip("\n") for line in path.read_text().splitlines()]
    dialler = Dialler(config_from([line for line in lines if line.startswith("%")]))
    now = 0.0
    for number, line in enumerate(lines, start=1):
        where = f"{path.name}:{number}: {line!r}"
        kind, rest = line[:1], line[2:]
        if kind == "=":
            verb, _, argument = rest.partition(" ")
            if verb == "send":
                dialler.send_data(unescape(argument), now)
            else:
                getattr(dialler, verb)(now)
        elif kind == ">":
            assert dialler.bytes_to_send() == unescape(rest), where
        elif kind == "<":
            dialler.receive_bytes(unescape(rest), now)
        elif kind == "@":
            target = now + float(rest.lstrip("+"))
            while (deadline := dialler.next_deadline()) is not None and deadline <= target:
                now = max(now, deadline)
                dialler.handle_deadline(now)
            now = target
        elif kind == "!":
            name, _, fields = rest.partition(" ")
            event = dialler.next_event()
            assert type(event).__name__ == name, f"{where}: got {event!r}"
            for item in re.split(r" (?=\w+=)", fields) if fields else []:
                field, _, value = item.partition("=")
                expected = unescape(value).decode("latin-1")
                assert describe(event, field) == expected, f"{where}: got {event!r}"
        else:
            assert kind in ("#", "%", ""), where
    assert dialler.next_event() is None, f"{path.name}: unchecked events left"
    assert dialler.bytes_to_send() == b"", f"{path.name}: unchecked bytes sent"
    return dialler


def test_there_are_transcripts_of_several_modems() -> None:
    assert len(TRANSCRIPTS) >= 5


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_dialler_replays_transcript(path: Path) -> None:
    replay(path)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.stem)
def test_streaming_parser_matches_line_splitting(path: Path) -> None:
    """The modem's side of a dialogue, up to its CONNECT, gives the same final
    results from the streaming parser, whatever the chunking, as from
    splitting the text into lines and classifying each."""
    modem_side = b"".join(
        unescape(line[2:]) for line in path.read_text().splitlines() if line.startswith("<")
    )
    expected = []
    for raw in re.split(rb"[\r\n]+", modem_side):
        event = classify_line(raw.decode("latin-1")) if raw.strip() else None
        if isinstance(event, FinalResult):
            expected.append(event)
            if event.code is ResultCode.CONNECT:
                break
    assert expected
    for chunk in (len(modem_side), 1, 7):
        parser = ResultParser()
        got = []
        for start in range(0, len(modem_side), chunk):
            parser.receive_bytes(modem_side[start : start + chunk])
            while (event := parser.next_event()) is not None:
                if isinstance(event, FinalResult):
                    got.append(event)
        assert got == expected, f"chunk size {chunk}"
