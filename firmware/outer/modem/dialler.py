"""Dial-up call control for a Hayes modem (sans-I/O).

Theory of operation
-------------------
:class:`Dialler` is a state machine driven by three inputs -- bytes from the
modem (:meth:`Dialler.receive_bytes`), the clock (:meth:`Dialler.handle_deadline`)
and the caller's requests (:meth:`prepare`, :meth:`dial`, :meth:`answer`,
:meth:`send_data`, :meth:`hangup`) -- each with an explicit ``now`` in
seconds.  It produces bytes for the modem (:meth:`bytes_to_send`), events
(:meth:`next_event`) and the time it next needs to be woken
(:meth:`next_deadline`).  It never sleeps or reads a
clock, so every scenario below runs under a fake clock in the tests.

Preparing ahead of need (``prepare``; with ``keep_ready`` also after every
originated call)::

    IDLE/READY -> RESETTING -> RESET_PAUSE -> INITIALISING -> READY

This is the reset and init described below, run while nobody waits; the
core then rests in READY.  A dial from READY only checks that the modem is
still there and still set up: ``AT`` (PROBING), and on OK the dial command
goes out at once.  No OK within ``command_timeout`` (the modem was unplugged,
or power-cycled: the USR5637 answers ERROR to the first command after
power-up) means the full reset and init before the dial, counted in
``probe_failures``.  A dial while a preparation runs rides on it: the dial
command follows the init.  A preparation that fails reports
:class:`PrepareFailed` and rests in IDLE, and the next dial starts with the
full reset: nothing retries on its own, so a modem that is gone costs one
attempt per dial, never a loop.  With ``keep_ready`` the core prepares again
as soon as an originated call is over (hung up, carrier lost, failed after
dialling), which keeps the reset and its pause off the next call's path.

Originating a call (``dial``) from IDLE::

    IDLE -> RESETTING   ATZ, expect OK; ERROR: ATZ again, up to RESET_ATTEMPTS
                        (some modems answer ERROR to the first command after
                        power-up); silence: the modem may still be online,
                        left in a call by a predecessor that crashed, so
                        escape with a guarded +++ (RESET_ESCAPE) before the
                        next ATZ, which ends that call
         -> RESET_PAUSE the modem reloads its profile after ATZ
         -> INITIALISING the init string (default ATQ0 V1 E1 S0=0 &C1 &D2)
         -> DIALLING    ATDT<number>; wait up to carrier_timeout for a result
         -> ONLINE      after CONNECT: the byte stream is the caller's

A failed attempt (BUSY, NO ANSWER, NO DIALTONE, NO CARRIER, no result in time)
is reported as :class:`CallAttemptFailed` and retried after an exponential
backoff with seeded jitter (BACKOFF), until ``max_attempts`` are spent
(:class:`CallFailed`).  A retry dials at once when the modem answered the
failed attempt with a result code: it is in command state and still set up.
When not even the CR that aborts a dial was answered, the modem's state is
unknown and the retry starts with the full reset and init
(``retry_resets``).  ERROR to the dial command is not retried: the number or
the modem configuration is wrong.  Every dial counts against
``max_calls_per_hour``; when the cap is reached the call fails at once with
:class:`CallLimitReached` carrying the time the next call is allowed.

Answering (``answer``): after the same reset and init (a preparation under
way is taken over; from READY the reset runs again), WAITING_FOR_RING.  That
is answer mode's resting state, initialised before any ring, so answer mode
never uses READY and ``keep_ready`` does not apply to it.  Each RING is
reported as :class:`Ringing`; with ``auto_answer_rings == 0`` the core
answers with ATA at once, otherwise it sets S0 and waits for the modem's own
CONNECT.  A failed answer goes back to waiting for the next call.

Data mode and carrier loss
--------------------------
After CONNECT every byte from the modem is data (:class:`DataReceived`).  Where
the port has a DCD line the adapter reports it with :meth:`set_carrier_detect`,
which is authoritative.  Without one (a pty) the modem reports a drop only
in-band, with ``\\r\\nNO CARRIER\\r\\n``, and binary data may contain that
text, so the core tells the two apart by what follows:

* Data is the link's framing: ``0x00 COBS(frame) 0x00``, each frame written
  whole.  Text inside a frame is therefore always followed, within a few
  byte times, by the rest of that frame, at least its closing 0x00.
* A modem that dropped carrier is in command state: it sends nothing more of
  its own, but echoes (E1) whatever we type.  So while the NO CARRIER is being
  confirmed our own data is *held back* (:meth:`send_data` queues it), and
  the modem has nothing to echo.  Only what we wrote before the NO CARRIER
  reached us can come back: the core keeps the last :data:`ECHO_SPAN` bytes
  it sent, and bytes that repeat them from the start of one of our frames
  are taken for that echo.  A peer's frame never equals ours (it carries the
  peer's own session token).

Carrier is lost when the stream ends with that text and, with our writes held,
nothing but our own echo follows for the confirm window: ``carrier_confirm``,
or longer at low line speeds, where a modem with error correction delivers
data in bursts of :data:`CONFIRM_BITS` (``Connected.speed`` sets it).  Any other
byte makes the text data: it is delivered at once, counted in
``false_no_carrier``, and the held writes go out.  A trailing partial match is
held the same way (without holding writes) until the window passes or more
bytes come.  A line that dies silently is detected by the link session's
keepalives, not here.

Hang-up
-------
With modem-control lines (``use_dtr``): drop DTR (``&D2`` makes the modem hang
up), raise it again, and check with ``AT`` -> OK.  Without them (a pty), or if
the modem stays silent: the escape sequence -- ``guard`` seconds without
sending, ``+++``, ``guard`` seconds of silence, expect OK -- then ``ATH0``.
Our frames start with a 0x00 delimiter, so link traffic never looks like a
guarded ``+++``.  A modem already in command state (a drop we did not
recognise) does not answer ``+++`` but echoes it: once the echo is seen and a
guard time has passed without OK, ``ATH0`` goes out at once, and its OK ends
the hang-up cleanly.  A hang-up requested while a NO CARRIER is being
confirmed waits for the verdict: a drop needs no hang-up.  A hang-up while a
call is being dialled or answered sends a CR, which makes the modem abandon it.
In READY or while preparing there is no call: HungUp comes at once and the
preparation goes on; a dial still waiting for the reset or the probe is
dropped the same way (with ``keep_ready``), and the modem ends up READY.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Final

from firmware.common.errors import ConfigError, LocalProtocolError, ModemError
from firmware.outer.modem.at import (
    EchoLine,
    FinalResult,
    InformationLine,
    ResultCode,
    ResultParser,
    UnsolicitedResult,
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

#: Tries of ATZ before giving up.  The USR5637 and others answer ERROR to the
#: first command after power-up (line noise in their buffer); 3 covers that
#: and one lost reply.
RESET_ATTEMPTS: Final = 3

#: How the data stream announces carrier loss in verbose mode (V1).
NO_CARRIER_BYTES: Final = b"\r\nNO CARRIER\r\n"

#: Our own output kept to recognise the modem's echo of it after a NO CARRIER:
#: what can be in flight towards the modem when it drops carrier.  Two of the
#: link's largest encoded frames (4.1 KiB each).
ECHO_SPAN: Final = 8192

#: A modem with V.42 error correction hands data to us one LAPM frame at a
#: time (up to 256 octets, 10 bits each on the line), so a gap of up to two
#: such frames can fall inside one of our frames.  The confirm window is never
#: shorter than this at the call's CONNECT speed: 0.15 s at 33600 bit/s,
#: 2.1 s at 2400.
CONFIRM_BITS: Final = 5120

#: The escape sequence (S2 = "+", three times).
ESCAPE_SEQUENCE: Final = b"+++"

#: Extra silence on top of the modem's guard time (S12), so the jitter of the
#: event loop and of the USB serial driver cannot make our silence too short.
GUARD_MARGIN: Final = 0.2

#: Times the escape sequence is tried before declaring the hang-up unclean.
ESCAPE_ATTEMPTS: Final = 2

#: One hour, the window of the calls-per-hour cap.
HOUR: Final = 3600.0

_DIAL_CHARS: Final = frozenset("0123456789*#,WwPpTt@!-() ")


@dataclass(frozen=True)
class DiallerConfig:
    """How to drive the modem; every duration is in seconds.

    Raises ConfigError (from construction) for values that cannot work.
    """

    number: str = ""
    init_string: str = "ATQ0 V1 E1 S0=0 &C1 &D2"
    dial_command: str = "ATDT"
    #: ATZ reloads the stored profile; Hayes-compatible modems need up to a
    #: second before they accept the next command.
    reset_pause: float = 1.0
    command_timeout: float = 5.0
    #: S7 defaults to 50 s of carrier wait on most modems; 60 s leaves time for
    #: dialling the digits before S7 starts counting.
    carrier_timeout: float = 60.0
    max_attempts: int = 5
    backoff_initial: float = 10.0
    backoff_factor: float = 2.0
    backoff_max: float = 600.0
    #: +/- fraction of each backoff, so a fleet of gateways does not redial in step.
    jitter: float = 0.25
    max_calls_per_hour: int = 12
    seed: int | None = None
    #: S12 = 50 fiftieths: the escape guard time of a Hayes modem.
    escape_guard: float = 1.0
    #: Silence after a NO CARRIER in the data stream, with our writes held,
    #: that confirms it.  Data that merely contains the text is followed by
    #: the rest of its frame within a few byte times (pacing, USB latency:
    #: tens of milliseconds); 0.25 s is several times that and still well
    #: under a second.  Low line speeds lengthen it (CONFIRM_BITS).
    carrier_confirm: float = 0.25
    #: How long DTR stays low; &D2 needs it low for more than S25 (50 ms).
    dtr_drop_time: float = 0.5
    use_dtr: bool = False
    auto_answer_rings: int = 0
    answer_timeout: float = 60.0
    #: Prepare the modem again after each originated call and rest in READY,
    #: so the next dial needs only an AT probe (the adapter also prepares
    #: when the port opens).
    keep_ready: bool = False

    def __post_init__(self) -> None:
        if any(ch not in _DIAL_CHARS for ch in self.number):
            raise ConfigError(f"phone number has characters a modem cannot dial: {self.number!r}")
        for name in ("init_string", "dial_command"):
            value = getattr(self, name)
            if not value.upper().startswith("AT") or any(c in value for c in "\r\n"):
                raise ConfigError(f"{name} must be one AT command line, got {value!r}")
        positive = (
            "reset_pause",
            "command_timeout",
            "carrier_timeout",
            "backoff_initial",
            "escape_guard",
            "carrier_confirm",
            "dtr_drop_time",
            "answer_timeout",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_attempts < 1 or self.max_calls_per_hour < 1:
            raise ConfigError("max_attempts and max_calls_per_hour must be at least 1")
        if self.backoff_factor < 1 or self.backoff_max < self.backoff_initial:
            raise ConfigError("backoff must not shrink")
        if not 0 <= self.jitter < 1:
            raise ConfigError("jitter must be in [0, 1)")
        if not 0 <= self.auto_answer_rings <= 255:
            raise ConfigError("auto_answer_rings must be 0..255 (register S0)")


class State(enum.Enum):
    """Where the call is."""

    IDLE = "idle"
    READY = "ready"
    PROBING = "probing"
    RESETTING = "resetting"
    RESET_ESCAPE = "reset escape"
    RESET_ESCAPE_WAIT = "reset escape wait"
    RESET_PAUSE = "reset pause"
    INITIALISING = "initialising"
    DIALLING = "dialling"
    ABORTING = "aborting"
    BACKOFF = "backoff"
    WAITING_FOR_RING = "waiting for ring"
    ANSWERING = "answering"
    ONLINE = "online"
    DTR_LOW = "dtr low"
    DTR_PROBE = "dtr probe"
    ESCAPE_GUARD = "escape guard"
    ESCAPE_WAIT = "escape wait"
    HANGING_UP = "hanging up"


class _Mode(enum.Enum):
    ORIGINATE = "originate"
    ANSWER = "answer"
    PREPARE = "prepare"


@dataclass(frozen=True)
class Ready:
    """The modem is reset and initialised; the core rests in READY until a dial."""


@dataclass(frozen=True)
class PrepareFailed:
    """Preparing the modem failed; the core is IDLE and the next dial starts afresh."""

    error: ModemError


@dataclass(frozen=True)
class Connected:
    """The call is up; from now on the stream carries data."""

    speed: int | None
    protocol: str
    text: str


@dataclass(frozen=True)
class CallAttemptFailed:
    """One attempt failed; another follows at ``retry_at`` (answer mode: at once)."""

    error: ModemError
    attempt: int
    retry_at: float


@dataclass(frozen=True)
class CallFailed:
    """The call could not be made; the core is IDLE again."""

    error: ModemError
    attempts: int


@dataclass(frozen=True)
class Ringing:
    """An incoming call rang (answer mode); ``count`` rings so far."""

    count: int


@dataclass(frozen=True)
class DataReceived:
    """Bytes from the far end (ONLINE only)."""

    data: bytes


@dataclass(frozen=True)
class CarrierLost:
    """The connection dropped; the core is IDLE and the modem in command state."""


@dataclass(frozen=True)
class HungUp:
    """A requested hang-up finished; ``clean`` is False if the modem never confirmed it."""

    clean: bool


@dataclass(frozen=True)
class SetDTR:
    """Action for the adapter: set the DTR line to ``level``."""

    level: bool


DiallerEvent = (
    Ready
    | PrepareFailed
    | Connected
    | CallAttemptFailed
    | CallFailed
    | Ringing
    | DataReceived
    | CarrierLost
    | HungUp
    | SetDTR
)

_RESULT_ERRORS: Final[dict[ResultCode, type[ModemError]]] = {
    ResultCode.BUSY: Busy,
    ResultCode.NO_ANSWER: NoAnswer,
    ResultCode.NO_DIALTONE: NoDialtone,
    ResultCode.NO_CARRIER: NoCarrier,
    ResultCode.ERROR: ModemCommandError,
    ResultCode.OK: ModemCommandError,
}

_HANGUP_STATES: Final = frozenset(
    {State.DTR_LOW, State.DTR_PROBE, State.ESCAPE_GUARD, State.ESCAPE_WAIT, State.HANGING_UP}
)

#: States with no call and nothing under way.
_RESTING_STATES: Final = frozenset({State.IDLE, State.READY})

#: The reset and init sequence.
_RESET_STATES: Final = frozenset(
    {
        State.RESETTING,
        State.RESET_ESCAPE,
        State.RESET_ESCAPE_WAIT,
        State.RESET_PAUSE,
        State.INITIALISING,
    }
)

#: States in which a preparation (mode PREPARE) can be under way.
_PREPARE_STATES: Final = _RESET_STATES | {State.PROBING}


class Dialler:
    """The dial-up call state machine; see the module docstring."""

    def __init__(self, config: DiallerConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._parser = ResultParser()
        self._state = State.IDLE
        self._mode = _Mode.ORIGINATE
        self._out = bytearray()
        self._events: deque[DiallerEvent] = deque()
        self._deadline: float | None = None
        self._calls: deque[float] = deque()
        self._attempts = 0
        self._reset_tries = 0
        self._init_queue: list[str] = []
        self._rings = 0
        self._escape_tries = 0
        self._hangup_requested = False
        self._last_tx = float("-inf")
        #: received bytes that are (or may become) a NO CARRIER
        self._held = b""
        self._held_deadline: float | None = None
        self._confirm_window = config.carrier_confirm
        #: bytes received after a whole NO CARRIER: our own echo, or data
        self._after = bytearray()
        #: offsets in _sent where an echo of our frames could begin
        self._echo_starts: list[int] = []
        #: the last ECHO_SPAN bytes we sent during this call
        self._sent = bytearray()
        #: our data held back while a NO CARRIER is being confirmed
        self._tx_held = bytearray()
        self._escape_tail = b""
        self._escape_echoed = False
        self._probing = False
        self._skip_lf = False
        #: the last attempt's abort went unanswered: the modem's state is unknown
        self._modem_unsure = False
        self._stats = {
            "prepares": 0,
            "prepare_failures": 0,
            "ready_dials": 0,
            "probe_failures": 0,
            "retry_resets": 0,
            "calls": 0,
            "connects": 0,
            "carrier_losses": 0,
            "false_no_carrier": 0,
            "echoed_bytes": 0,
            "held_bytes_dropped": 0,
            "discarded_bytes": 0,
            "bytes_in": 0,
            "bytes_out": 0,
        }

    # ----------------------------------------------------------- inspection

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def preparing(self) -> bool:
        """True while the modem is being reset and initialised with no call asked for."""
        return self._mode is _Mode.PREPARE and self._state in _PREPARE_STATES

    @property
    def in_call(self) -> bool:
        """True while a call is being made, answered, is up or is being hung up."""
        return self._state not in _RESTING_STATES and not self.preparing

    @property
    def confirming(self) -> bool:
        """True while a NO CARRIER in the data stream is being confirmed (writes held)."""
        return self._held == NO_CARRIER_BYTES

    def statistics(self) -> dict[str, int]:
        """Return counters: preparations and their failures, dials from READY and
        failed probes, retries that reset first, calls, connects, carrier losses,
        false NO CARRIER alarms, echoed bytes taken back, held writes dropped
        with the carrier, bytes."""
        return {**self._stats, **{f"parser_{k}": v for k, v in self._parser.statistics().items()}}

    def next_deadline(self) -> float | None:
        """Return when :meth:`handle_deadline` must next be called, or None."""
        times = [t for t in (self._deadline, self._held_deadline) if t is not None]
        return min(times) if times else None

    def bytes_to_send(self) -> bytes:
        """Return (and forget) the bytes to write to the modem."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> DiallerEvent | None:
        """Return the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    # -------------------------------------------------------------- requests

    def prepare(self, now: float) -> None:
        """Reset and initialise the modem ahead of a call, then rest in READY.

        Raises LocalProtocolError unless IDLE or READY.  Outcome: Ready, or
        PrepareFailed (the core is then IDLE).
        """
        self._require_resting("prepare")
        self._mode = _Mode.PREPARE
        self._attempts = 0
        self._stats["prepares"] += 1
        self._start_reset(now, [self.config.init_string])

    def dial(self, now: float) -> None:
        """Start a call to the configured number.

        From IDLE the modem is reset and initialised first; from READY it is
        probed with AT; while a preparation runs the dial follows its init.
        Raises LocalProtocolError unless IDLE, READY or preparing, ConfigError
        without a number.  Outcome: Connected, or CallFailed (also at once when
        the hourly cap is reached, which leaves READY or a preparation as it is).
        """
        state = self._state
        if state is not State.IDLE:
            self._require_resting("dial", allow_preparing=True)
        if not self.config.number.strip():
            raise ConfigError("no phone number configured")
        self._attempts = 0
        self._modem_unsure = False
        if state is State.IDLE:
            self._mode = _Mode.ORIGINATE
            if self._cap_blocks(now):
                return
            self._start_reset(now, [self.config.init_string])
            return
        error = self._cap_error(now)
        if error is not None:
            self._events.append(CallFailed(error, 0))
            return
        self._mode = _Mode.ORIGINATE
        if state is State.READY:
            self._stats["ready_dials"] += 1
            self._parser.reset()
            self._command("AT", now, State.PROBING, self.config.command_timeout)

    def answer(self, now: float) -> None:
        """Prepare the modem to answer incoming calls (RING -> ATA, or S0 auto-answer).

        A preparation under way is taken over; from IDLE or READY the modem
        is reset and initialised.  Raises LocalProtocolError otherwise.
        """
        self._require_resting("answer", allow_preparing=True)
        extra = [f"ATS0={self.config.auto_answer_rings}"] if self.config.auto_answer_rings else []
        self._attempts = 0
        adopt = self.preparing and self._state is not State.PROBING
        self._mode = _Mode.ANSWER
        if adopt:
            self._init_queue += extra
            return
        self._start_reset(now, [self.config.init_string, *extra])

    def send_data(self, data: bytes, now: float) -> None:
        """Queue data for the far end.  Raises LocalProtocolError unless ONLINE.

        While a NO CARRIER is being confirmed the data is held back; it goes
        out if the text turns out to be data, and is dropped with the call if
        the carrier is lost.
        """
        if self._state is not State.ONLINE:
            raise LocalProtocolError(f"cannot send data while {self._state.value}")
        if data:
            self._stats["bytes_out"] += len(data)
            if self.confirming:
                self._tx_held += data
            else:
                self._transmit(data, now)

    def hangup(self, now: float) -> None:
        """End the call, or abandon whatever is in progress; HungUp follows.

        Idempotent: in IDLE it reports HungUp(clean=True) at once; while a
        hang-up is already running it does nothing.  While a NO CARRIER is
        being confirmed it waits for the verdict: a lost carrier ends the call
        (CarrierLost, then HungUp(clean=True)) with nothing sent to the modem.
        """
        state = self._state
        if state in _HANGUP_STATES:
            return
        if state is State.ONLINE:
            if self.confirming:
                self._hangup_requested = True
                return
            self._release(now)
            if self.config.use_dtr:
                self._events.append(SetDTR(False))
                self._enter(State.DTR_LOW, now + self.config.dtr_drop_time)
            else:
                self._start_escape(now)
            return
        if state in (State.DIALLING, State.ANSWERING, State.ABORTING):
            self._hangup_requested = True
            if state is not State.ABORTING:
                self._abort_call(now)
            return
        if state is State.READY or self.preparing:
            self._events.append(HungUp(clean=True))  # no call: the modem stays prepared
            return
        if self.config.keep_ready and self._mode is _Mode.ORIGINATE and state in _PREPARE_STATES:
            # a dial waiting for the reset or the probe: drop it, finish preparing
            self._mode = _Mode.PREPARE
            self._events.append(HungUp(clean=True))
            return
        self._go_idle()
        self._events.append(HungUp(clean=True))
        if state is State.BACKOFF:
            self._call_over(now)

    def set_carrier_detect(self, present: bool, now: float) -> None:
        """Report the DCD line (ports that have one); its loss while ONLINE ends the call."""
        if not present and self._state is State.ONLINE:
            if self.confirming:
                self._carrier_dropped(now)  # that NO CARRIER was the modem's
            else:
                self._release(now)
                self._carrier_lost(now)

    # ------------------------------------------------------------------ input

    def receive_bytes(self, data: bytes, now: float) -> None:
        """Consume bytes read from the modem."""
        if not data:
            return
        self._stats["bytes_in"] += len(data)
        if self._state is State.ONLINE:
            self._data_in(data, now)
            return
        if self._state in (
            State.IDLE,
            State.READY,
            State.DTR_LOW,
            State.ESCAPE_GUARD,
            State.RESET_ESCAPE,
        ):
            # idle chatter, or the tail of the data stream while we hang up
            self._stats["discarded_bytes"] += len(data)
            return
        if self._state is State.ESCAPE_WAIT and not self._escape_echoed:
            self._note_escape_echo(data, now)
        self._parser.receive_bytes(data)
        self._drain_parser(now)

    def handle_deadline(self, now: float) -> None:
        """Act on every deadline that is due at ``now``."""
        if self._held_deadline is not None and now >= self._held_deadline:
            self._held_deadline = None
            if not self.confirming:
                self._release(now)  # a partial match, and nothing more came: data
            elif self._only_our_echo_followed():
                self._carrier_dropped(now)
            else:
                self._refuted(now)
        if self._deadline is None or now < self._deadline:
            return
        self._deadline = None
        handler = getattr(self, f"_timeout_{self._state.name.lower()}", None)
        if handler is not None:
            handler(now)

    # ------------------------------------------------------------- internals

    def _require_resting(self, what: str, *, allow_preparing: bool = False) -> None:
        if self._state in _RESTING_STATES or (allow_preparing and self.preparing):
            return
        raise LocalProtocolError(f"cannot {what} while {self._state.value}")

    def _enter(self, state: State, deadline: float | None) -> None:
        self._state = state
        self._deadline = deadline

    def _go_idle(self) -> None:
        self._enter(State.IDLE, None)
        self._parser.reset()
        self._held = b""
        self._held_deadline = None
        self._after.clear()
        self._echo_starts = []
        self._sent.clear()
        self._tx_held.clear()
        self._hangup_requested = False

    def _command(self, command: str, now: float, state: State, timeout: float) -> None:
        self._parser.command_sent(command)
        self._out += command.encode("ascii") + b"\r"
        self._last_tx = now
        self._enter(state, now + timeout)

    def _cap_error(self, now: float) -> CallLimitReached | None:
        while self._calls and self._calls[0] <= now - HOUR:
            self._calls.popleft()
        if len(self._calls) < self.config.max_calls_per_hour:
            return None
        return CallLimitReached(retry_at=self._calls[0] + HOUR)

    def _cap_blocks(self, now: float) -> bool:
        error = self._cap_error(now)
        if error is None:
            return False
        self._fail(error, now)
        return True

    def _fail(self, error: ModemError, now: float) -> None:
        """End what is under way with ``error``: PrepareFailed or CallFailed."""
        state, mode = self._state, self._mode
        self._go_idle()
        if mode is _Mode.PREPARE:
            # Rest in IDLE: the next dial runs the full reset; retrying here
            # could spin on a modem that is gone.
            self._stats["prepare_failures"] += 1
            self._events.append(PrepareFailed(error))
            return
        self._events.append(CallFailed(error, self._attempts))
        if not (self.config.keep_ready and mode is _Mode.ORIGINATE):
            return
        if state in (State.INITIALISING, State.PROBING):
            # the hourly cap, found just after the modem answered its init or
            # probe: it is ready as it is
            self._mode = _Mode.PREPARE
            self._rest_ready()
        elif state in (State.DIALLING, State.ABORTING, State.BACKOFF):
            self._call_over(now)
        # a modem that failed its reset or init stays IDLE until the next dial

    def _rest_ready(self) -> None:
        self._enter(State.READY, None)
        self._parser.reset()
        self._events.append(Ready())

    def _call_over(self, now: float) -> None:
        """An originated call is over: with ``keep_ready``, prepare for the next one."""
        if self.config.keep_ready and self._mode is _Mode.ORIGINATE:
            self.prepare(now)

    def _start_reset(self, now: float, commands: list[str]) -> None:
        self._init_queue = commands
        self._reset_tries = 1
        self._parser.reset()
        self._command("ATZ", now, State.RESETTING, self.config.command_timeout)

    def _next_init(self, now: float) -> None:
        if self._init_queue:
            command = self._init_queue.pop(0)
            self._command(command, now, State.INITIALISING, self.config.command_timeout)
        elif self._mode is _Mode.ORIGINATE:
            self._start_attempt(now)
        elif self._mode is _Mode.PREPARE:
            self._rest_ready()
        else:
            self._rings = 0
            self._enter(State.WAITING_FOR_RING, None)

    def _start_attempt(self, now: float) -> None:
        if self._cap_blocks(now):
            return
        self._calls.append(now)
        self._attempts += 1
        self._stats["calls"] += 1
        command = f"{self.config.dial_command}{self.config.number}"
        self._command(command, now, State.DIALLING, self.config.carrier_timeout)

    def _abort_call(self, now: float) -> None:
        # Any character typed while a modem dials or answers aborts the call.
        self._out += b"\r"
        self._last_tx = now
        self._enter(State.ABORTING, now + self.config.command_timeout)

    def _attempt_failed(self, error: ModemError, now: float) -> None:
        if self._hangup_requested:
            self._go_idle()
            self._events.append(HungUp(clean=True))
            self._call_over(now)
            return
        if self._mode is _Mode.ANSWER:
            self._attempts += 1
            self._events.append(CallAttemptFailed(error, self._attempts, now))
            self._rings = 0
            self._parser.reset()
            self._enter(State.WAITING_FOR_RING, None)
            return
        retryable = not isinstance(error, ModemCommandError)
        if not retryable or self._attempts >= self.config.max_attempts:
            self._fail(error, now)
            return
        cfg = self.config
        growth = cfg.backoff_factor ** (self._attempts - 1)
        delay = min(cfg.backoff_max, cfg.backoff_initial * growth)
        delay *= 1.0 + self._rng.uniform(-cfg.jitter, cfg.jitter)
        retry_at = now + delay
        self._events.append(CallAttemptFailed(error, self._attempts, retry_at))
        self._parser.reset()
        self._enter(State.BACKOFF, retry_at)

    def _go_online(self, result: FinalResult, now: float) -> None:
        tail = self._parser.detach()
        self._skip_lf = self._parser.pending_lf
        self._hangup_requested = False
        self._stats["connects"] += 1
        self._sent.clear()
        window = self.config.carrier_confirm
        if result.speed:
            window = max(window, CONFIRM_BITS / result.speed)
        self._confirm_window = window
        self._enter(State.ONLINE, None)
        self._events.append(Connected(result.speed, result.protocol, result.text))
        if tail:
            self._data_in(tail, now)

    def _carrier_lost(self, now: float) -> None:
        self._go_idle()
        self._events.append(CarrierLost())
        self._call_over(now)

    def _start_escape(self, now: float) -> None:
        self._escape_tries += 1
        self._escape_tail = b""
        self._escape_echoed = False
        self._probing = False
        guard = self.config.escape_guard + GUARD_MARGIN
        self._parser.reset()
        self._enter(State.ESCAPE_GUARD, max(now, self._last_tx + guard))

    def _note_escape_echo(self, data: bytes, now: float) -> None:
        # A modem online passes our +++ down the line; one in command state
        # echoes it.  (A far end that echoes would send it back too, but then
        # the modem says OK after the guard, before the deadline set here.)
        seen = self._escape_tail + data
        self._escape_tail = seen[-(len(ESCAPE_SEQUENCE) - 1) :]
        if ESCAPE_SEQUENCE in seen and self._deadline is not None:
            self._escape_echoed = True
            after_guard = self._last_tx + self.config.escape_guard + GUARD_MARGIN
            self._deadline = min(self._deadline, max(now, after_guard))

    def _hung_up(self, clean: bool, now: float) -> None:
        self._escape_tries = 0
        self._probing = False
        self._go_idle()
        self._events.append(HungUp(clean))
        self._call_over(now)

    # --------------------------------------------------------------- data mode

    def _transmit(self, data: bytes, now: float) -> None:
        self._out += data
        self._last_tx = now
        self._sent += data
        if len(self._sent) > ECHO_SPAN:
            del self._sent[: len(self._sent) - ECHO_SPAN]

    def _data_in(self, data: bytes, now: float) -> None:
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if not data:
            return
        if self.confirming:
            self._after_no_carrier(data, now)
        else:
            self._scan(data, now)

    def _scan(self, data: bytes, now: float, not_before: int = 0) -> None:
        """Deliver data, holding back a NO CARRIER (and any echo of ours after
        it) that ends the stream, or a trailing prefix of one.

        ``not_before``: a NO CARRIER starting before this offset is data.
        """
        buf = self._held + data
        self._held = b""
        end = len(buf)
        while (at := buf.rfind(NO_CARRIER_BYTES, not_before, end)) >= 0:
            rest = buf[at + len(NO_CARRIER_BYTES) :]
            starts = self._echo_starts_for(rest)
            if starts is not None:
                # From here on the modem, if it really is in command state,
                # hears nothing from us (send_data holds), so only the echo of
                # what we sent before can follow.
                if at:
                    self._events.append(DataReceived(buf[:at]))
                self._held = NO_CARRIER_BYTES
                self._after[:] = rest
                self._echo_starts = starts
                self._held_deadline = now + self._confirm_window
                return
            end = at + len(NO_CARRIER_BYTES) - 1
        keep = 0
        for k in range(min(len(buf), len(NO_CARRIER_BYTES) - 1), 0, -1):
            if NO_CARRIER_BYTES.startswith(buf[-k:]):
                keep = k
                break
        deliver = buf[: len(buf) - keep]
        self._held = buf[len(buf) - keep :]
        self._held_deadline = now + self._confirm_window if self._held else None
        if deliver:
            self._events.append(DataReceived(deliver))

    def _echo_starts_for(self, rest: bytes) -> list[int] | None:
        """Return where in our recent output an echo equal to ``rest`` (so far)
        could begin: at the start of one of our frames.  None if nowhere."""
        if rest and rest[0] != 0:
            return None  # cheap and common: text inside a frame runs on
        sent = self._sent
        starts = []
        at = sent.find(b"\x00")
        while at >= 0:
            if at + 1 < len(sent) and sent[at + 1] != 0 and sent.startswith(rest, at):
                starts.append(at)
            at = sent.find(b"\x00", at + 1)
        if not rest:
            return starts
        return starts or None

    def _after_no_carrier(self, data: bytes, now: float) -> None:
        before = len(self._after)
        self._after += data
        sent = self._sent
        self._echo_starts = [
            k for k in self._echo_starts if sent[k + before : k + before + len(data)] == data
        ]
        if self._echo_starts:
            # still possibly our echo: wait for silence after it
            self._held_deadline = now + self._confirm_window
            return
        self._refuted(now)

    def _only_our_echo_followed(self) -> bool:
        count = len(self._after)
        if not count:
            return True
        return any(k + count == len(self._sent) for k in self._echo_starts)

    def _refuted(self, now: float) -> None:
        """The NO CARRIER was data: deliver it and what followed, send what we held."""
        self._stats["false_no_carrier"] += 1
        after = bytes(self._after)
        self._held = b""
        self._release(now)
        # delivered in one piece with what followed, which may itself end
        # with a NO CARRIER
        self._scan(NO_CARRIER_BYTES + after, now, not_before=1)
        if self._hangup_requested:
            self._hangup_requested = False
            self.hangup(now)

    def _release(self, now: float) -> None:
        """Deliver held bytes as data and send the writes held meanwhile."""
        if self._held:
            self._events.append(DataReceived(self._held))
        self._held = b""
        self._held_deadline = None
        self._after.clear()
        self._echo_starts = []
        if self._tx_held:
            held = bytes(self._tx_held)
            self._tx_held.clear()
            self._transmit(held, now)

    def _carrier_dropped(self, now: float) -> None:
        """The NO CARRIER was the modem's: end the call (and a hang-up waiting on it)."""
        self._stats["carrier_losses"] += 1
        self._stats["echoed_bytes"] += len(self._after)
        self._stats["held_bytes_dropped"] += len(self._tx_held)
        hangup = self._hangup_requested
        self._go_idle()
        self._events.append(CarrierLost())
        if hangup:
            self._events.append(HungUp(clean=True))
        self._call_over(now)

    # ------------------------------------------------------- parser events

    def _drain_parser(self, now: float) -> None:
        while (event := self._parser.next_event()) is not None:
            if isinstance(event, EchoLine | InformationLine):
                continue
            if isinstance(event, UnsolicitedResult):
                self._on_ring(now)
                continue
            self._on_final(event, now)
            if self._state is State.ONLINE:
                return

    def _on_ring(self, now: float) -> None:
        if self._state is not State.WAITING_FOR_RING:
            return
        self._rings += 1
        self._events.append(Ringing(self._rings))
        if self.config.auto_answer_rings == 0:
            self._command("ATA", now, State.ANSWERING, self.config.answer_timeout)

    def _on_final(self, result: FinalResult, now: float) -> None:
        code = result.code
        state = self._state
        if code is ResultCode.CONNECT:
            if state in (State.DIALLING, State.ANSWERING, State.ABORTING, State.WAITING_FOR_RING):
                if self._hangup_requested:
                    # connected just as we gave up: go online, then hang up properly
                    self._go_online(result, now)
                    self.hangup(now)
                    return
                self._go_online(result, now)
            return
        if state is State.RESET_ESCAPE_WAIT:
            # whatever the escape got (OK, or ERROR from a modem that was in
            # command state after all), the modem now listens: reset it
            self._parser.reset()
            self._command("ATZ", now, State.RESETTING, self.config.command_timeout)
        elif state is State.PROBING:
            if code is not ResultCode.OK:
                self._probe_failed(now)
            elif self._mode is _Mode.PREPARE:
                self._rest_ready()  # the dial was abandoned during the probe
            else:
                self._start_attempt(now)
        elif state is State.RESETTING:
            if code is ResultCode.OK:
                self._enter(State.RESET_PAUSE, now + self.config.reset_pause)
            else:
                self._retry_reset(ModemCommandError(f"ATZ answered {result.text}"), now)
        elif state is State.INITIALISING:
            if code is ResultCode.OK:
                self._next_init(now)
            else:
                self._fail(ModemCommandError(f"init command answered {result.text}"), now)
        elif state in (State.DIALLING, State.ANSWERING):
            self._attempt_failed(_RESULT_ERRORS[code](result.text), now)
        elif state is State.ABORTING:
            self._attempt_failed(ModemTimeout("no carrier before the deadline"), now)
        elif state is State.DTR_PROBE:
            if code is ResultCode.OK:
                self._hung_up(True, now)
        elif state is State.ESCAPE_WAIT:
            if code is ResultCode.OK:
                self._command("ATH0", now, State.HANGING_UP, self.config.command_timeout)
            elif code is ResultCode.NO_CARRIER:
                self._hung_up(True, now)
        elif state is State.HANGING_UP:
            self._hung_up(code in (ResultCode.OK, ResultCode.NO_CARRIER), now)

    def _probe_failed(self, now: float) -> None:
        """No OK to the probe from READY: unplugged, power-cycled or confused.
        Reset and initialise in full; the dial (if any) follows."""
        self._stats["probe_failures"] += 1
        self._start_reset(now, [self.config.init_string])

    def _retry_reset(self, error: ModemError, now: float) -> None:
        if self._reset_tries >= RESET_ATTEMPTS:
            self._fail(error, now)
            return
        self._reset_tries += 1
        self._parser.reset()
        self._command("ATZ", now, State.RESETTING, self.config.command_timeout)

    # ------------------------------------------------------------ timeouts

    def _timeout_probing(self, now: float) -> None:
        self._probe_failed(now)

    def _timeout_resetting(self, now: float) -> None:
        if self._reset_tries >= RESET_ATTEMPTS:
            self._fail(ModemTimeout("no answer to ATZ"), now)
            return
        self._reset_tries += 1
        self._parser.reset()
        guard = self.config.escape_guard + GUARD_MARGIN
        self._enter(State.RESET_ESCAPE, max(now, self._last_tx + guard))

    def _timeout_reset_escape(self, now: float) -> None:
        self._out += b"+++"
        self._last_tx = now
        # the modem answers one guard time after the +++, if it was online
        wait = self.config.escape_guard + GUARD_MARGIN + self.config.command_timeout
        self._enter(State.RESET_ESCAPE_WAIT, now + wait)

    def _timeout_reset_escape_wait(self, now: float) -> None:
        self._parser.reset()
        self._command("ATZ", now, State.RESETTING, self.config.command_timeout)

    def _timeout_reset_pause(self, now: float) -> None:
        self._next_init(now)

    def _timeout_initialising(self, now: float) -> None:
        self._fail(ModemTimeout("no answer to the init string"), now)

    def _timeout_dialling(self, now: float) -> None:
        self._abort_call(now)

    def _timeout_answering(self, now: float) -> None:
        self._abort_call(now)

    def _timeout_aborting(self, now: float) -> None:
        # not even the CR that aborts a dial got an answer: before another
        # attempt the modem needs the full reset (it may have restarted)
        self._modem_unsure = True
        self._attempt_failed(ModemTimeout("no carrier before the deadline"), now)

    def _timeout_backoff(self, now: float) -> None:
        if self._modem_unsure:
            self._modem_unsure = False
            self._stats["retry_resets"] += 1
            self._start_reset(now, [self.config.init_string])
        else:
            self._start_attempt(now)

    def _timeout_dtr_low(self, now: float) -> None:
        self._events.append(SetDTR(True))
        self._parser.reset()
        self._command("AT", now, State.DTR_PROBE, self.config.command_timeout)

    def _timeout_dtr_probe(self, now: float) -> None:
        self._start_escape(now)

    def _timeout_escape_guard(self, now: float) -> None:
        self._out += b"+++"
        self._last_tx = now
        wait = self.config.escape_guard + GUARD_MARGIN + self.config.command_timeout
        self._enter(State.ESCAPE_WAIT, now + wait)

    def _timeout_escape_wait(self, now: float) -> None:
        if self._escape_echoed:
            # The modem echoed +++ and said no OK: it is in command state
            # already, after a drop we did not recognise.  ATH0 -> OK settles it.
            self._parser.reset()
            self._probing = True
            self._command("ATH0", now, State.HANGING_UP, self.config.command_timeout)
        elif self._escape_tries < ESCAPE_ATTEMPTS:
            self._start_escape(now)
        else:
            self._hung_up(False, now)

    def _timeout_hanging_up(self, now: float) -> None:
        if self._probing and self._escape_tries < ESCAPE_ATTEMPTS:
            self._start_escape(now)  # that echo was the far end's after all
        else:
            self._hung_up(False, now)
