"""A Hayes-compatible modem's command interpreter and call model (sans-I/O).

Theory of operation
-------------------
:class:`HayesModem` is the core of the modem emulator (``optogate sim
modem``).  It sits between a DTE (the serial port the driver under test
opens) and a *line* (a raw TCP connection that stands in for the telephone
call).  It is pure: every input carries ``now``; the adapter collects the
bytes for each side with :meth:`bytes_to_dte` / :meth:`bytes_to_line`,
line actions (:class:`OpenLine`, :class:`CloseLine`) with :meth:`next_event`,
and wakes it at :meth:`next_deadline`.

States (the three of a real modem, plus the transitions between them)::

    COMMAND --ATD--> DIALLING --(dial delay, line up)--> ONLINE
    COMMAND --call--> RINGING --ATA or S0 rings--> ANSWERING --> ONLINE
    ONLINE --guarded +++--> ONLINE_COMMAND --ATO--> ONLINE
    ONLINE_COMMAND --ATH/ATZ--> COMMAND;  line closed --> NO CARRIER, COMMAND

Command state: characters are echoed as typed (E1); a command line starts at
``AT`` (case-insensitive, anything before is ignored), ends at S3 (CR),
S5 (backspace) edits it.  Commands chain on one line
(``ATE0V1Q0S0=0&C1&D2``).  Supported: ``A D(T/P) E H I L M O Q S V X Z
&C &D &F &K &W`` and ``Sn=v`` / ``Sn?`` for registers S0-S38.  Results are
verbose (V1, ``\\r\\nOK\\r\\n``) or numeric (V0, ``0\\r``), suppressed by Q1,
filtered by the X level as on a Hayes (X0: no speed, no BUSY/NO DIALTONE;
X3: BUSY; X4: everything).

Online: the escape is S2 (``+``) three times, each within the S12 guard time
(1/50 s units) of the previous one, with a full guard of silence before the
first and after the last; the ``+`` characters are also sent on, as a real
modem does.  Data is paced at ``speed / 10`` bytes per second each way.
Faults: the first ``no_dialtone``, then ``busy``, then ``no_answer`` dials fail
with that result; ``no_carrier_after`` drops the call after that many data
bytes (both directions together); ``ber`` flips bits of data in both
directions with a seeded generator, so a run replays.  ``error_first``
answers ERROR to the first command after power-up (the USR5637 quirk).
:meth:`HayesModem.power_off` and :meth:`HayesModem.power_on` model a modem
losing power and coming back (factory settings, ``error_first`` again), and
:meth:`HayesModem.commands` lists the last :data:`COMMAND_HISTORY` command
lines, so tests can check what a driver sent.

What it does not model: modem-control lines (DTR, DCD, RTS/CTS: a pty has
none, so carrier loss is signalled in-band with NO CARRIER and DTR hang-up
is impossible); call progress between two emulators (the originating side
reports CONNECT once the TCP connection is accepted, while the answering
side still rings -- data sent meanwhile waits in the answerer's buffer);
modulation training, retrains and speed shifts (the CONNECT speed is a
setting); error correction and compression (``protocol`` is only the text
after the speed); flow control (DTE data beyond :data:`MAX_BACKLOG` is
dropped and counted, as an overrun would); pulse/tone timing, dial
modifiers other than digits, ``&W`` storage (accepted, not kept), ``A/``.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from firmware.common.errors import ConfigError

#: Registers S0..S38 exist; higher numbers answer ERROR.
REGISTER_COUNT: Final = 39

#: Command lines remembered for :meth:`HayesModem.commands`: a few calls'
#: worth (each is five or six lines), bounded so a long run stays small.
COMMAND_HISTORY: Final = 256

#: Hayes factory defaults (S3 CR, S4 LF, S5 BS, S7 carrier wait 50 s, S12
#: guard 50/50 s...); unlisted registers read 0.
DEFAULT_REGISTERS: Final[dict[int, int]] = {
    0: 0,
    1: 0,
    2: 43,
    3: 13,
    4: 10,
    5: 8,
    6: 2,
    7: 50,
    8: 2,
    9: 6,
    10: 14,
    11: 95,
    12: 50,
    25: 5,
}

#: Longest command line kept; a Hayes command buffer holds 40 characters
#: after AT, real firmwares 60-255.  Longer lines answer ERROR.
MAX_COMMAND: Final = 128

#: Bytes each direction may queue behind the paced line: 64 KiB is a few
#: seconds at any dial-up speed.  The line side is held back by the adapter
#: (it stops reading TCP), so only the DTE side can overflow.
MAX_BACKLOG: Final = 65536

#: Paced data is released in slices of this many seconds, so the adapter is
#: woken ~50 times a second instead of once per byte.
PACING_SLICE: Final = 0.02

#: Rings come every 6 s (the North American cadence: 2 s on, 4 s off).
RING_INTERVAL: Final = 6.0

#: An unanswered call is dropped after this many rings.
MAX_RINGS: Final = 10

#: Numeric CONNECT codes the original Hayes Smartmodem defined; other speeds
#: have vendor-specific numbers, for which we send plain 1 (CONNECT).
NUMERIC_CONNECT: Final[dict[int, int]] = {1200: 5, 2400: 10}

_NUMERIC: Final[dict[str, int]] = {
    "OK": 0,
    "CONNECT": 1,
    "RING": 2,
    "NO CARRIER": 3,
    "ERROR": 4,
    "NO DIALTONE": 6,
    "BUSY": 7,
    "NO ANSWER": 8,
}


_ASCII_DIGITS: Final = frozenset("0123456789")
_DIAL_DIGITS: Final = frozenset("0123456789*#")


class ModemState(enum.Enum):
    """The emulated modem's state."""

    COMMAND = "command"
    DIALLING = "dialling"
    RINGING = "ringing"
    ANSWERING = "answering"
    ONLINE = "online"
    ONLINE_COMMAND = "online command"


@dataclass(frozen=True)
class OpenLine:
    """Action: connect the line to ``address`` (``host:port``)."""

    address: str


@dataclass(frozen=True)
class CloseLine:
    """Action: close the line (hang up)."""


LineAction = OpenLine | CloseLine


def normalise_number(number: str) -> str:
    """Return the digits (and * #) of a dial string: what the exchange sees."""
    return "".join(ch for ch in number if ch in _DIAL_DIGITS)


@dataclass
class HayesConfig:
    """What the emulated line and modem do; durations in seconds.

    Raises ConfigError (a ValueError) from construction for values that cannot work.
    """

    speed: int = 33600
    protocol: str = ""
    phonebook: dict[str, str] = field(default_factory=dict)
    dial_delay: float = 2.0
    answer_delay: float = 1.0
    busy: int = 0
    no_answer: int = 0
    no_dialtone: int = 0
    no_carrier_after: int | None = None
    ber: float = 0.0
    seed: int = 0
    error_first: bool = False
    ring_interval: float = RING_INTERVAL

    def __post_init__(self) -> None:
        if self.speed < 300:
            raise ConfigError("speed must be at least 300 bit/s")
        if min(self.busy, self.no_answer, self.no_dialtone) < 0:
            raise ConfigError("fault counts must not be negative")
        if not 0.0 <= self.ber < 1.0:
            raise ConfigError("ber must be in [0, 1)")
        if self.dial_delay < 0 or self.answer_delay < 0 or self.ring_interval <= 0:
            raise ConfigError("delays must not be negative")
        self.phonebook = {normalise_number(k): v for k, v in self.phonebook.items()}


class _Pacer:
    """A queue drained at ``rate`` bytes per second (a line's bit clock)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.queue = bytearray()
        self.clock = 0.0  # time up to which the line has been busy

    def take(self, now: float) -> bytes:
        start = max(self.clock, now - PACING_SLICE)
        count = min(len(self.queue), int((now - start) * self.rate + 1e-9))
        if count <= 0:
            return b""
        out = bytes(self.queue[:count])
        del self.queue[:count]
        self.clock = start + count / self.rate
        return out

    def deadline(self, now: float) -> float | None:
        if not self.queue:
            return None
        slice_bytes = max(1, min(len(self.queue), int(self.rate * PACING_SLICE)))
        return max(now, self.clock) + slice_bytes / self.rate


class HayesModem:
    """The emulated modem; see the module docstring."""

    def __init__(self, config: HayesConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._registers = dict(DEFAULT_REGISTERS)
        self._echo = True
        self._verbose = True
        self._quiet = False
        self._x_level = 4
        self._state = ModemState.COMMAND
        self._dte_out = bytearray()
        self._events: deque[LineAction] = deque()
        self._line_open = False
        self._to_line = _Pacer(config.speed / 10)
        self._to_dte = _Pacer(config.speed / 10)
        self._command = bytearray()
        self._seen_a = False
        self._in_command = False
        self._first_command = config.error_first
        self._powered = True
        self._history: deque[str] = deque(maxlen=COMMAND_HISTORY)
        self._deadline: float | None = None
        self._last_dte = float("-inf")
        self._plus_count = 0
        self._plus_at = 0.0
        self._faults = {
            "no_dialtone": config.no_dialtone,
            "busy": config.busy,
            "no_answer": config.no_answer,
        }
        self._data_bytes = 0
        self._dial_number = ""
        self._dial_timeout_only = False
        self._stats = {
            "commands": 0,
            "dials": 0,
            "connects": 0,
            "escapes": 0,
            "dropped_dte_bytes": 0,
            "bit_errors": 0,
        }

    # ---------------------------------------------------------- inspection

    @property
    def state(self) -> ModemState:
        """The current :class:`ModemState`."""
        return self._state

    def register(self, number: int) -> int:
        """Return the value of S-register ``number``."""
        return self._registers.get(number, 0)

    def statistics(self) -> dict[str, int]:
        """Return counters: commands, dials, connects, escapes, drops, bit errors."""
        return dict(self._stats)

    def commands(self) -> list[str]:
        """Return the last command lines executed, oldest first, as typed
        (``"ATZ"``, ``"ATDT5551234"``; case kept, CR dropped)."""
        return list(self._history)

    @property
    def powered(self) -> bool:
        """False between :meth:`power_off` and :meth:`power_on`."""
        return self._powered

    def power_off(self, now: float) -> None:
        """Lose power: a call drops without a word, and the DTE's bytes go nowhere."""
        del now
        self._hang_up()  # the line closes: the far end sees the call end
        self._registers[1] = 0
        self._dte_out.clear()
        self._powered = False

    def power_on(self, now: float) -> None:
        """Power returns: factory settings, and (``error_first``) ERROR to the
        first command, as after any power-up."""
        del now
        self._factory_reset()
        self._command.clear()
        self._in_command = False
        self._seen_a = False
        self._first_command = self.config.error_first
        self._powered = True

    def pending_command_length(self) -> int:
        """Characters of the command line being typed (bounded by MAX_COMMAND + 1)."""
        return len(self._command)

    def line_backlog(self) -> int:
        """Bytes from the line waiting to be paced out to the DTE."""
        return len(self._to_dte.queue)

    def next_event(self) -> LineAction | None:
        """Return the oldest pending line action, or None."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """Return when :meth:`handle_deadline` must next run, or None."""
        times = [self._deadline]
        if self._state is ModemState.ONLINE:
            times.append(self._to_dte.deadline(self._to_dte.clock))
        if self._line_open:
            times.append(self._to_line.deadline(self._to_line.clock))
        if self._plus_count == 3:
            times.append(self._plus_at + self._guard())
        present = [t for t in times if t is not None]
        return min(present) if present else None

    def bytes_to_dte(self, now: float) -> bytes:
        """Return (and forget) the bytes due to the DTE by ``now``."""
        if self._state is ModemState.ONLINE:
            data = self._to_dte.take(now)
            if data:
                kept, drop = self._count_data(self._noise(data))
                self._dte_out += kept
                if drop:
                    self._drop_call()
        out = bytes(self._dte_out)
        self._dte_out.clear()
        return out

    def bytes_to_line(self, now: float) -> bytes:
        """Return (and forget) the bytes due to the line by ``now``."""
        if not self._line_open:
            return b""
        data = self._to_line.take(now)
        if not data:
            return b""
        kept, drop = self._count_data(self._noise(data))
        if drop:
            self._drop_call()  # the kept bytes still go out, before CloseLine
        return kept

    # -------------------------------------------------------------- inputs

    def receive_from_dte(self, data: bytes, now: float) -> None:
        """Consume bytes the DTE wrote to the serial port."""
        if not self._powered:
            return
        for byte in data:
            if self._state is ModemState.ONLINE:
                self._online_byte(byte, now)
            elif self._state in (ModemState.DIALLING, ModemState.ANSWERING):
                # any character aborts a call being set up
                self._abort_call()
            else:
                self._command_byte(byte, now)

    def line_connected(self, now: float) -> None:
        """The adapter's line (TCP connection) is up."""
        if self._state is not ModemState.DIALLING:
            self._events.append(CloseLine())
            return
        self._line_open = True
        self._go_online(now)

    def line_failed(self, now: float) -> None:
        """The adapter could not open the line: nobody picks up."""
        del now
        if self._state is ModemState.DIALLING:
            self._to_command("NO ANSWER")

    def line_data(self, data: bytes, now: float) -> None:
        """Consume bytes from the far end of the line."""
        del now
        if self._line_open:
            self._to_dte.queue += data

    def line_closed(self, now: float) -> None:
        """The far end hung up (the TCP connection closed)."""
        del now
        if not self._line_open:
            return
        self._line_open = False
        if self._state is ModemState.RINGING:
            self._state = ModemState.COMMAND
            self._deadline = None
            self._registers[1] = 0
            return
        self._drop_call()

    def incoming_call(self, now: float) -> bool:
        """A call arrives (answer mode).  Return False if the modem cannot take it."""
        if self._state is not ModemState.COMMAND or self._line_open or not self._powered:
            return False
        self._line_open = True
        self._state = ModemState.RINGING
        self._registers[1] = 0
        self._ring(now)
        return True

    def handle_deadline(self, now: float) -> None:
        """Act on timers due at ``now``: dial results, rings, escape guard, carrier."""
        if self._plus_count == 3 and now >= self._plus_at + self._guard():
            self._plus_count = 0
            self._state = ModemState.ONLINE_COMMAND
            self._stats["escapes"] += 1
            self._result("OK")
        if self._deadline is None or now < self._deadline:
            return
        self._deadline = None
        if self._state is ModemState.DIALLING:
            self._dial_complete(now)
        elif self._state is ModemState.RINGING:
            if self._registers[1] >= MAX_RINGS:
                self._line_open = False
                self._events.append(CloseLine())
                self._state = ModemState.COMMAND
                self._registers[1] = 0
            else:
                self._ring(now)
        elif self._state is ModemState.ANSWERING:
            self._go_online(now)

    # ------------------------------------------------------- command state

    def _command_byte(self, byte: int, now: float) -> None:
        if self._echo:
            self._dte_out.append(byte)
        if byte == self._registers[3]:
            if self._in_command:
                line = self._command.decode("latin-1")
                self._command.clear()
                self._in_command = False
                self._seen_a = False
                self._execute(line, now)
            return
        if byte == self._registers[5]:
            if self._command:
                self._command.pop()
            return
        upper = chr(byte).upper()
        if not self._in_command:
            if self._seen_a and upper == "T":
                self._in_command = True
                self._command.clear()
            else:
                self._seen_a = upper == "A"
            return
        if len(self._command) <= MAX_COMMAND:
            self._command.append(byte)

    def _execute(self, line: str, now: float) -> None:
        self._stats["commands"] += 1
        self._history.append(f"AT{line}")
        if self._first_command:
            self._first_command = False
            self._result("ERROR")
            return
        if len(line) > MAX_COMMAND:
            self._result("ERROR")
            return
        info: list[str] = []
        text = line.upper()
        i = 0
        while i < len(text):
            letter = text[i]
            i += 1
            if letter == " ":
                continue
            if letter == "D":
                self._flush_info(info)
                self._dial(line[i:], now)
                return
            if letter == "A":
                self._flush_info(info)
                self._answer(now)
                return
            if letter == "O":
                i = _skip_number(text, i)[1]
                self._flush_info(info)
                self._return_online()
                return
            if letter == "&":
                if i >= len(text):
                    self._result("ERROR")
                    return
                sub = text[i]
                value, i = _skip_number(text, i + 1)
                if not self._ampersand(sub, value):
                    self._result("ERROR")
                    return
                continue
            if letter == "S":
                ok, i = self._register_command(text, i, info)
                if not ok:
                    self._result("ERROR")
                    return
                continue
            value, i = _skip_number(text, i)
            if not self._basic(letter, value, info):
                self._result("ERROR")
                return
        self._flush_info(info)
        self._result("OK")

    def _basic(self, letter: str, value: int | None, info: list[str]) -> bool:
        n = value or 0
        if letter == "E" and n <= 1:
            self._echo = n == 1
        elif letter == "V" and n <= 1:
            self._verbose = n == 1
        elif letter == "Q" and n <= 1:
            self._quiet = n == 1
        elif letter == "X" and n <= 4:
            self._x_level = n
        elif letter == "Z" and n <= 1:
            self._factory_reset()
        elif letter == "H" and n <= 1:
            if n == 0:
                self._hang_up()
        elif letter == "I" and n <= 9:
            info.append({0: "33600", 3: "optogate Hayes emulator"}.get(n, "OK"))
        elif letter in "LMBNWYPT":
            pass  # speaker, modulation and dial-mode settings have no effect here
        else:
            return False
        return True

    def _ampersand(self, sub: str, value: int | None) -> bool:
        n = value or 0
        if sub == "F" and n == 0:
            self._factory_reset()
            return True
        limits = {"C": 1, "D": 3, "K": 6, "W": 1, "S": 1, "V": 0}
        return sub in limits and n <= limits[sub]

    def _register_command(self, text: str, i: int, info: list[str]) -> tuple[bool, int]:
        number, i = _skip_number(text, i)
        if number is None or number >= REGISTER_COUNT:
            return False, i
        if i < len(text) and text[i] == "=":
            value, i = _skip_number(text, i + 1)
            if value is None or value > 255:
                return False, i
            self._registers[number] = value
            return True, i
        if i < len(text) and text[i] == "?":
            info.append(f"{self.register(number):03d}")
            return True, i + 1
        return False, i

    def _factory_reset(self) -> None:
        self._registers = dict(DEFAULT_REGISTERS)
        self._echo, self._verbose, self._quiet, self._x_level = True, True, False, 4
        # ATZ ends a call in progress; a phone that is ringing keeps ringing
        if self._line_open and self._state is not ModemState.RINGING:
            self._hang_up()

    # ------------------------------------------------------------- results

    def _flush_info(self, info: list[str]) -> None:
        # Q1 silences result codes only; information text is still sent
        for text in info:
            self._dte_out += (f"\r\n{text}\r\n" if self._verbose else f"{text}\r\n").encode()
        info.clear()

    def _result(self, text: str) -> None:
        if self._quiet:
            return
        if self._verbose:
            self._dte_out += b"\r\n" + text.encode("ascii") + b"\r\n"
            return
        base = "CONNECT" if text.startswith("CONNECT") else text
        code = _NUMERIC[base]
        if base == "CONNECT":
            code = NUMERIC_CONNECT.get(self.config.speed, 1) if self._x_level else 1
        self._dte_out += f"{code}\r".encode()

    def _filtered(self, result: str) -> str:
        """Apply the X level to a call-progress result, as Hayes modems do."""
        x = self._x_level
        if result == "NO DIALTONE" and x not in (2, 4):
            return "NO CARRIER"
        if result in ("BUSY", "NO ANSWER") and x < 3:
            return "NO CARRIER"
        return result

    def _to_command(self, result: str) -> None:
        self._state = ModemState.COMMAND
        self._deadline = None
        self._result(self._filtered(result))

    # ---------------------------------------------------------------- calls

    def _dial(self, dial_string: str, now: float) -> None:
        if self._line_open:
            self._result("ERROR")
            return
        self._stats["dials"] += 1
        self._dial_number = normalise_number(dial_string)
        self._state = ModemState.DIALLING
        carrier_wait = float(self._registers[7])
        if self.config.dial_delay > carrier_wait:
            self._dial_number = ""  # the far end never trains up within S7
            self._dial_timeout_only = True
            self._deadline = now + carrier_wait
        else:
            self._dial_timeout_only = False
            self._deadline = now + self.config.dial_delay

    def _dial_complete(self, now: float) -> None:
        del now
        if self._dial_timeout_only:
            self._to_command("NO CARRIER")
            return
        for fault, result in (
            ("no_dialtone", "NO DIALTONE"),
            ("busy", "BUSY"),
            ("no_answer", "NO ANSWER"),
        ):
            if self._faults[fault] > 0:
                self._faults[fault] -= 1
                self._to_command(result)
                return
        address = self.config.phonebook.get(self._dial_number)
        if address is None:
            self._to_command("NO ANSWER")
            return
        self._events.append(OpenLine(address))

    def _answer(self, now: float) -> None:
        if self._state is not ModemState.RINGING:
            self._result("NO CARRIER")
            return
        self._state = ModemState.ANSWERING
        self._deadline = now + self.config.answer_delay

    def _ring(self, now: float) -> None:
        self._registers[1] += 1
        self._result("RING")
        s0 = self._registers[0]
        if s0 and self._registers[1] >= s0:
            self._state = ModemState.ANSWERING
            self._deadline = now + self.config.answer_delay
        else:
            self._deadline = now + self.config.ring_interval

    def _abort_call(self) -> None:
        if self._state is ModemState.ANSWERING or self._line_open:
            self._line_open = False
            self._events.append(CloseLine())
        self._to_command("NO CARRIER")

    def _go_online(self, now: float) -> None:
        self._state = ModemState.ONLINE
        self._deadline = None
        self._registers[1] = 0
        self._stats["connects"] += 1
        self._data_bytes = 0
        self._to_line.clock = self._to_dte.clock = now
        self._last_dte = now
        speed = f" {self.config.speed}" if self._x_level else ""
        protocol = f"/{self.config.protocol}" if self.config.protocol and self._x_level else ""
        self._result(f"CONNECT{speed}{protocol}")

    def _return_online(self) -> None:
        if self._state is not ModemState.ONLINE_COMMAND or not self._line_open:
            self._result("NO CARRIER")
            return
        self._state = ModemState.ONLINE
        self._result("CONNECT" + (f" {self.config.speed}" if self._x_level else ""))

    def _hang_up(self) -> None:
        if self._line_open:
            self._line_open = False
            self._events.append(CloseLine())
        self._to_line.queue.clear()
        self._to_dte.queue.clear()
        self._plus_count = 0
        self._state = ModemState.COMMAND
        self._deadline = None

    def _drop_call(self) -> None:
        """The carrier went away: back to command state with NO CARRIER."""
        was_online = self._state in (
            ModemState.ONLINE,
            ModemState.ONLINE_COMMAND,
            ModemState.ANSWERING,
        )
        self._hang_up()
        if was_online:
            self._result("NO CARRIER")

    # ---------------------------------------------------------- online data

    def _guard(self) -> float:
        return self._registers[12] / 50.0

    def _online_byte(self, byte: int, now: float) -> None:
        escape_char = self._registers[2]
        guard = self._guard()
        if byte == escape_char and escape_char <= 127:
            if self._plus_count == 0 and now - self._last_dte >= guard:
                self._plus_count, self._plus_at = 1, now
            elif 0 < self._plus_count < 3 and now - self._plus_at < guard:
                self._plus_count, self._plus_at = self._plus_count + 1, now
            else:
                self._plus_count = 0
        else:
            self._plus_count = 0
        self._last_dte = now
        if len(self._to_line.queue) >= MAX_BACKLOG:
            self._stats["dropped_dte_bytes"] += 1
            return
        self._to_line.queue.append(byte)

    def _noise(self, data: bytes) -> bytes:
        ber = self.config.ber
        if ber <= 0:
            return data
        out = bytearray(data)
        for index in range(len(out)):
            for bit in range(8):
                if self._rng.random() < ber:
                    out[index] ^= 1 << bit
                    self._stats["bit_errors"] += 1
        return bytes(out)

    def _count_data(self, data: bytes) -> tuple[bytes, bool]:
        """Apply ``no_carrier_after``: return the bytes that still pass, and whether
        the carrier drops after them."""
        limit = self.config.no_carrier_after
        if limit is None:
            return data, False
        room = max(0, limit - self._data_bytes)
        self._data_bytes += len(data)
        if len(data) < room:
            return data, False
        return data[:room], True


def _skip_number(text: str, i: int) -> tuple[int | None, int]:
    """Parse decimal digits at ``text[i:]``; return (value or None, next index)."""
    j = i
    # ASCII digits only: str.isdigit() also accepts superscripts such as "\xb2"
    while j < len(text) and text[j] in _ASCII_DIGITS:
        j += 1
    return (int(text[i:j]) if j > i else None), j
