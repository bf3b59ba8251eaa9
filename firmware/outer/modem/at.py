"""AT result-line parser (sans-I/O).

Theory of operation
-------------------
A Hayes modem in command state answers each command line with zero or more
*information* lines (``ATI3``, ``ATS7?``...) and exactly one *final result*
(``OK``, ``ERROR``, ``CONNECT ...``, ``BUSY``, ``NO CARRIER``, ``NO DIALTONE``,
``NO ANSWER``).  Between commands it may emit *unsolicited* lines (``RING``).
With echo on (``E1``) it first repeats the command line we typed.

:class:`ResultParser` turns the byte stream from the modem into those four
kinds of events.  It is pure: bytes in, events out, no clock.

* Lines end at CR or LF.  ``CR LF`` therefore reads as a line followed by an
  empty one, and empty lines are skipped, so verbose (``\\r\\nOK\\r\\n``),
  numeric (``0\\r``) and LF-only modems all parse the same way.
* Verbose results are matched by text.  ``CONNECT`` carries an optional
  speed and a free-form suffix (``CONNECT 33600/ARQ/V34/LAPM/V42BIS`` gives
  speed 33600, protocol ``ARQ/V34/LAPM/V42BIS``).
* Numeric results (``V0``) are lines of one or two digits.  Register queries
  print three digits (``ATS7?`` -> ``050``, the Hayes convention), so they are
  information lines.  Only the codes every Hayes-compatible modem shares are
  decoded (:data:`NUMERIC_RESULTS`); the numeric codes for higher CONNECT
  speeds differ between chipset vendors and are reported as information.
* Echo: the caller announces each command with :meth:`command_sent`; the next
  line equal to it (ignoring case and spaces) is an :class:`EchoLine`.
* After a ``CONNECT`` the stream belongs to the data session: the parser halts
  and keeps every later byte untouched, for :meth:`detach` to hand over.
* Lines are bounded by :data:`MAX_LINE`.  A longer run without a terminator is
  line noise: it is discarded up to the next terminator and counted, never
  buffered.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

from firmware.common.errors import LocalProtocolError

#: Longest line kept.  Hayes command buffers hold 40-60 characters and no
#: result or ``ATI`` line of a real modem exceeds 80; 256 leaves room for
#: verbose caller-id and diagnostic lines while bounding memory.
MAX_LINE: Final = 256

CR: Final = 0x0D
LF: Final = 0x0A


class ResultCode(enum.Enum):
    """Result codes the dialler acts on (the verbose text is the value)."""

    OK = "OK"
    CONNECT = "CONNECT"
    RING = "RING"
    NO_CARRIER = "NO CARRIER"
    ERROR = "ERROR"
    NO_DIALTONE = "NO DIALTONE"
    BUSY = "BUSY"
    NO_ANSWER = "NO ANSWER"


#: Numeric (V0) result codes shared by every Hayes-compatible modem.  5 and 10
#: are the original Smartmodem's CONNECT 1200 / CONNECT 2400; higher speeds
#: have vendor-specific numbers and are not decoded.
NUMERIC_RESULTS: Final[dict[int, tuple[ResultCode, int | None]]] = {
    0: (ResultCode.OK, None),
    1: (ResultCode.CONNECT, None),
    2: (ResultCode.RING, None),
    3: (ResultCode.NO_CARRIER, None),
    4: (ResultCode.ERROR, None),
    5: (ResultCode.CONNECT, 1200),
    6: (ResultCode.NO_DIALTONE, None),
    7: (ResultCode.BUSY, None),
    8: (ResultCode.NO_ANSWER, None),
    10: (ResultCode.CONNECT, 2400),
}

#: Verbose spellings, upper-cased.  "NO DIAL TONE" is how several Rockwell
#: and Conexant firmwares spell NO DIALTONE.
_VERBOSE: Final[dict[str, ResultCode]] = {
    "OK": ResultCode.OK,
    "RING": ResultCode.RING,
    "NO CARRIER": ResultCode.NO_CARRIER,
    "ERROR": ResultCode.ERROR,
    "NO DIALTONE": ResultCode.NO_DIALTONE,
    "NO DIAL TONE": ResultCode.NO_DIALTONE,
    "BUSY": ResultCode.BUSY,
    "NO ANSWER": ResultCode.NO_ANSWER,
}

#: CONNECT, then nothing, a space or a slash: "CONNECTED TO ..." is not a result.
_CONNECT_RE: Final = re.compile(r"^CONNECT(?=$|[\s/])(?:\s*(\d+))?\s*(.*)$")
_CME_RE: Final = re.compile(r"^\+CM[ES] ERROR\b")
_NUMERIC_RE: Final = re.compile(r"^\d{1,2}$")


@dataclass(frozen=True)
class FinalResult:
    """A final result code: the command it answers is finished.

    ``speed`` is the CONNECT speed in bit/s when the modem reported one;
    ``protocol`` is the CONNECT suffix without its leading slash (error
    correction / compression, e.g. ``ARQ/V34/LAPM/V42BIS``), else ``""``.
    """

    code: ResultCode
    text: str
    speed: int | None = None
    protocol: str = ""


@dataclass(frozen=True)
class UnsolicitedResult:
    """A result the modem sends on its own (``RING``)."""

    code: ResultCode
    text: str


@dataclass(frozen=True)
class InformationLine:
    """Any other non-empty line: ``ATI`` text, register values, caller id."""

    text: str


@dataclass(frozen=True)
class EchoLine:
    """The modem's echo of the command line we sent."""

    text: str


ParserEvent = FinalResult | UnsolicitedResult | InformationLine | EchoLine


def _normalise(text: str) -> str:
    return "".join(text.split()).upper()


def classify_line(text: str) -> FinalResult | UnsolicitedResult | InformationLine:
    """Return what a complete, non-empty line (without its terminator) means."""
    stripped = text.strip()
    upper = stripped.upper()
    code = _VERBOSE.get(upper)
    if code is ResultCode.RING:
        return UnsolicitedResult(code, stripped)
    if code is not None:
        return FinalResult(code, stripped)
    match = _CONNECT_RE.match(upper)
    if match is not None:
        speed = int(match.group(1)) if match.group(1) else None
        protocol = stripped[match.start(2) :].strip(" /") if match.group(2) else ""
        return FinalResult(ResultCode.CONNECT, stripped, speed, protocol)
    if _CME_RE.match(upper):
        return FinalResult(ResultCode.ERROR, stripped)
    if _NUMERIC_RE.match(stripped):
        known = NUMERIC_RESULTS.get(int(stripped))
        if known is not None:
            numeric_code, speed = known
            if numeric_code is ResultCode.RING:
                return UnsolicitedResult(numeric_code, stripped)
            return FinalResult(numeric_code, stripped, speed)
    return InformationLine(stripped)


class ResultParser:
    """Split the modem's command-state output into events.

    Feed bytes with :meth:`receive_bytes`, take events with
    :meth:`next_event`.  Never raises on modem output.
    """

    def __init__(self) -> None:
        self._line = bytearray()
        self._discarding = False
        self._events: deque[ParserEvent] = deque()
        self._expected_echo: str | None = None
        self._halted = False
        self._tail = bytearray()
        self._last_terminator_cr = False
        #: set by :meth:`detach`: the LF of the CONNECT line's CR LF may follow
        self.pending_lf = False
        self._stats = {"lines": 0, "overlong_lines": 0, "discarded_bytes": 0, "echoes": 0}

    @property
    def halted(self) -> bool:
        """True after a CONNECT: later bytes are data, kept for :meth:`detach`."""
        return self._halted

    def command_sent(self, command: str) -> None:
        """Note that ``command`` (without CR) was sent, so its echo is recognised."""
        self._expected_echo = _normalise(command)

    def receive_bytes(self, data: bytes) -> None:
        """Consume bytes from the modem; complete lines become events."""
        if self._halted:
            self._tail += data
            return
        for index, byte in enumerate(data):
            if byte in (CR, LF):
                if byte == LF and self._last_terminator_cr and not self._line:
                    # the LF of a CR LF pair: no empty line to report
                    self._last_terminator_cr = False
                    continue
                self._last_terminator_cr = byte == CR
                self._end_line()
                if self._halted:
                    rest = data[index + 1 :]
                    if self._last_terminator_cr and rest[:1] == b"\n":
                        rest = rest[1:]
                        self._last_terminator_cr = False
                    self._tail += rest
                    return
                continue
            self._last_terminator_cr = False
            if self._discarding:
                self._stats["discarded_bytes"] += 1
            elif len(self._line) >= MAX_LINE:
                self._stats["discarded_bytes"] += len(self._line) + 1
                self._stats["overlong_lines"] += 1
                self._line.clear()
                self._discarding = True
            else:
                self._line.append(byte)

    def _end_line(self) -> None:
        if self._discarding:
            self._discarding = False
            return
        if not self._line:
            return
        text = self._line.decode("latin-1")
        self._line.clear()
        if not text.strip():
            return
        self._stats["lines"] += 1
        if self._expected_echo is not None and _normalise(text) == self._expected_echo:
            self._expected_echo = None
            self._stats["echoes"] += 1
            self._events.append(EchoLine(text.strip()))
            return
        event = classify_line(text)
        if isinstance(event, FinalResult):
            self._expected_echo = None
            if event.code is ResultCode.CONNECT:
                self._halted = True
        self._events.append(event)

    def next_event(self) -> ParserEvent | None:
        """Return the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    def pending_line_length(self) -> int:
        """Bytes of the current incomplete line (never more than MAX_LINE)."""
        return len(self._line)

    def detach(self) -> bytes:
        """After CONNECT: return the bytes that followed it and reset to command state.

        If the CONNECT line's CR was the last byte received, its LF may still
        be on the way; :attr:`pending_lf` is then True and the caller should
        drop one leading LF from the data that follows.

        Raises LocalProtocolError when the parser is not halted on a CONNECT.
        """
        if not self._halted:
            raise LocalProtocolError("detach() is only valid after a CONNECT result")
        tail = bytes(self._tail)
        pending_lf = self._last_terminator_cr and not tail
        self.reset()
        self.pending_lf = pending_lf
        return tail

    def reset(self) -> None:
        """Forget any partial line, pending echo and events (back to command state)."""
        self._line.clear()
        self._discarding = False
        self._events.clear()
        self._expected_echo = None
        self._halted = False
        self._tail.clear()
        self._last_terminator_cr = False
        self.pending_lf = False

    def statistics(self) -> dict[str, int]:
        """Return counters: lines seen, echoes, overlong lines and bytes discarded."""
        return dict(self._stats)
