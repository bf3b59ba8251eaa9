"""The serial adapter and the dialler over real ptys, against the modem emulator."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator
from typing import cast

import pytest
import serial
from cobs import cobs

from firmware.common.adapters.tcp import serve_tcp
from firmware.common.adapters.transport import Transport
from firmware.common.errors import LinkClosed, LinkDown, LinkError, PortError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig
from firmware.outer.modem.dialler import NO_CARRIER_BYTES, DiallerConfig, State
from firmware.outer.modem.errors import (
    Busy,
    CallAbandoned,
    CallLimitReached,
    ModemTimeout,
    NoAnswer,
    NoCarrier,
)
from firmware.outer.modem.port import ModemConnection, ModemTransport
from host_tools.sim.hayes import HayesConfig
from host_tools.sim.modem import ModemEmulator

pytestmark = [pytest.mark.integration]

#: Test timing: a short S12 guard (10/50 s) keeps hang-ups quick; the escape
#: test below uses the factory 1 s guard.
FAST_INIT = "ATQ0 V1 E1 S0=0 &C1 &D2 S12=10"


def fast_config(**overrides: object) -> DiallerConfig:
    fields: dict[str, object] = {
        "number": "5551234",
        "init_string": FAST_INIT,
        "reset_pause": 0.05,
        "command_timeout": 2.0,
        "carrier_timeout": 5.0,
        "backoff_initial": 0.1,
        "backoff_max": 0.5,
        "escape_guard": 0.2,
        "carrier_confirm": 0.2,
        "seed": 1,
        **overrides,
    }
    return DiallerConfig(**fields)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"{host}:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_exactly(conn: ModemConnection, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        data = await conn.read()
        assert data, f"call ended after {len(got)} of {count} bytes"
        got += data
    return bytes(got)


def emulator(address: str, **overrides: object) -> ModemEmulator:
    fields: dict[str, object] = {"phonebook": {"5551234": address}, "dial_delay": 0.2, **overrides}
    return ModemEmulator(HayesConfig(**fields))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def rig(
    config: DiallerConfig | None = None, *, address: str | None = None, **emulated: object
) -> AsyncIterator[tuple[ModemEmulator, ModemConnection]]:
    """An emulator whose phone book leads to ``address`` (default: an echo
    server), and a connection on its pty."""
    async with contextlib.AsyncExitStack() as stack:
        if address is None:
            address = await stack.enter_async_context(echo_server())
        modem = await stack.enter_async_context(emulator(address, **emulated))
        conn = await ModemConnection.open(modem.port_path, config or fast_config())
        await stack.enter_async_context(conn)
        yield modem, conn


@pytest.mark.timeout(20)
async def test_dial_echo_server_and_move_bytes_both_ways() -> None:
    async with rig(speed=57600) as (modem, conn):
        assert not conn.has_modem_control  # a pty: hang-up degrades to +++
        connected = await conn.dial()
        assert connected.speed == 57600
        payload = bytes(range(256)) * 8  # every byte value, 8-bit clean
        conn.write(payload)
        await conn.drain()
        assert await read_exactly(conn, len(payload)) == payload
        await conn.hangup()
        assert conn.state is State.IDLE
        assert await conn.read() == b""
        assert modem.core.statistics()["escapes"] == 1


@pytest.mark.timeout(20)
async def test_busy_twice_then_connect() -> None:
    async with rig(busy=2) as (_, conn):
        await conn.dial()
        assert conn.statistics()["calls"] == 3
        conn.write(b"ping")
        assert await read_exactly(conn, 4) == b"ping"


@pytest.mark.timeout(20)
async def test_failures_raise_the_last_result() -> None:
    async with rig(fast_config(max_attempts=2), busy=5) as (_, conn):
        with pytest.raises(Busy):
            await conn.dial()
        assert conn.state is State.IDLE
    config = fast_config(max_attempts=1, max_calls_per_hour=1)
    async with rig(config, address="127.0.0.1:1", no_answer=1) as (_, conn):
        with pytest.raises(NoAnswer):
            await conn.dial()
        with pytest.raises(CallLimitReached):
            await conn.dial()


@pytest.mark.timeout(20)
async def test_error_on_first_command_after_power_up() -> None:
    async with rig(error_first=True) as (_, conn):
        await conn.dial()
        assert conn.state is State.ONLINE


@pytest.mark.timeout(20)
async def test_carrier_drop_after_n_bytes() -> None:
    async with rig(no_carrier_after=300) as (_, conn):
        lost: list[bool] = []
        conn.on_carrier_lost = lambda: lost.append(True)
        await conn.dial()
        conn.write(bytes(1000))
        got = bytearray()
        while data := await conn.read():
            got += data
        await asyncio.wait_for(conn.carrier_lost.wait(), 5)
        assert lost == [True]
        assert len(got) < 300  # what was echoed before the line went
        assert b"NO CARRIER" not in got  # the result code is not data
        assert conn.state is State.IDLE
        with pytest.raises(NoCarrier):
            conn.write(b"x")


@pytest.mark.timeout(20)
async def test_far_end_hangup_is_carrier_loss() -> None:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(5)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with rig(address=f"{host}:{port}") as (_, conn):
            await conn.dial()
            conn.write(b"hello")
            assert await conn.read() == b""
            assert conn.carrier_lost.is_set()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.slow
@pytest.mark.timeout(30)
async def test_hangup_with_the_factory_guard_time() -> None:
    config = fast_config(init_string="ATQ0 V1 E1 S0=0 &C1 &D2", escape_guard=1.0)
    async with rig(config) as (modem, conn):
        await conn.dial()
        conn.write(b"+++ in data is just data")
        assert await read_exactly(conn, 24) == b"+++ in data is just data"
        await conn.hangup()
        assert modem.core.statistics()["escapes"] == 1
        # the modem is back in command state and can call again
        await conn.dial()
        assert conn.state is State.ONLINE


@pytest.mark.timeout(30)
async def test_two_emulators_back_to_back() -> None:
    # Rings every 0.5 s: a RING that comes while central's modem is still being
    # initialised is missed, as on a real line, and the next one is answered.
    answerer = ModemEmulator(
        HayesConfig(answer_delay=0.1, ring_interval=0.5), listen=("127.0.0.1", 0)
    )
    async with answerer:
        assert answerer.listen_address is not None
        async with rig(address=answerer.listen_address) as (_, outer):
            central = await ModemConnection.open(answerer.port_path, fast_config(number=""))
            async with central:
                answering = asyncio.create_task(central.answer())
                await outer.dial()
                await asyncio.wait_for(answering, 10)
                outer.write(b"\x00request\x00")
                assert await read_exactly(central, 9) == b"\x00request\x00"
                central.write(b"\x00reply\x00")
                assert await read_exactly(outer, 7) == b"\x00reply\x00"
                await outer.hangup()
                await asyncio.wait_for(central.carrier_lost.wait(), 5)


@pytest.mark.timeout(10)
async def test_unopenable_port_is_a_port_error() -> None:
    with pytest.raises(PortError):
        await ModemConnection.open("/nonexistent/tty", fast_config())


@pytest.mark.timeout(20)
async def test_exclusive_open() -> None:
    async with rig() as (modem, _):
        with pytest.raises(PortError):
            await ModemConnection.open(modem.port_path, fast_config())


@pytest.mark.timeout(20)
async def test_hangup_while_dialling_abandons_the_call() -> None:
    dialling = asyncio.Event()

    def log(event: str, **fields: object) -> None:
        if event == "state" and fields["state"] == State.DIALLING.value:
            dialling.set()

    async with echo_server() as address, emulator(address, dial_delay=30.0) as modem:
        conn = await ModemConnection.open(modem.port_path, fast_config(), log=log)
        async with conn:
            call = asyncio.create_task(conn.dial())
            await asyncio.wait_for(dialling.wait(), 5)
            await conn.hangup()
            assert conn.state is State.IDLE
            assert modem.core.statistics()["dials"] == 1
            assert modem.core.state.value == "command"  # the CR aborted the dial
            with pytest.raises(CallAbandoned):
                await call
            # cancelling a dial abandons the call the same way
            dialling.clear()
            call = asyncio.create_task(conn.dial())
            await asyncio.wait_for(dialling.wait(), 5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(conn.hangup(), 5)
            assert conn.state is State.IDLE
            assert modem.core.statistics()["dials"] == 2
            assert modem.core.state.value == "command"


@pytest.mark.timeout(20)
async def test_close_during_a_call_hangs_up() -> None:
    async with rig() as (modem, conn):
        await conn.dial()
        await conn.close()
        await conn.close()  # idempotent
        assert modem.core.statistics()["escapes"] == 1
        assert modem.core.state.value == "command"


@pytest.mark.timeout(20)
async def test_modem_vanishing_is_a_port_error() -> None:
    async with echo_server() as address:
        modem = emulator(address)
        await modem.start()
        try:
            conn = await ModemConnection.open(modem.port_path, fast_config())
            await conn.dial()
        finally:
            await modem.aclose()  # the USB modem is unplugged mid-call
        got = b"x"
        with contextlib.suppress(PortError):
            while got:
                got = await conn.read()
        assert got, "read() must raise PortError, not report a clean end"
        assert conn.carrier_lost.is_set()
        with pytest.raises(PortError):
            await conn.dial()
        await conn.close()


@pytest.mark.timeout(20)
async def test_auto_answer_by_s0() -> None:
    answerer = ModemEmulator(
        HayesConfig(answer_delay=0.1, ring_interval=0.3), listen=("127.0.0.1", 0)
    )
    async with answerer:
        assert answerer.listen_address is not None
        config = fast_config(number="", auto_answer_rings=2)
        async with await ModemConnection.open(answerer.port_path, config) as central:
            answering = asyncio.create_task(central.answer())
            reader, writer = await asyncio.open_connection(*answerer.listen_address.split(":"))
            try:
                connected = await asyncio.wait_for(answering, 10)
                assert connected.speed == 33600
                assert answerer.core.register(0) == 2
                writer.write(b"raw tcp caller")
                assert await read_exactly(central, 14) == b"raw tcp caller"
                central.write(b"ok")
                assert await reader.readexactly(2) == b"ok"
            finally:
                writer.close()
                await writer.wait_closed()
            await asyncio.wait_for(central.carrier_lost.wait(), 5)


@pytest.mark.timeout(20)
async def test_carrier_drop_also_hangs_up_the_far_end() -> None:
    far_end_saw_eof = asyncio.Event()

    async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(1000))
        await writer.drain()
        if await reader.read() == b"":
            far_end_saw_eof.set()
        writer.close()

    server = await asyncio.start_server(talker, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with rig(address=f"{host}:{port}", no_carrier_after=300) as (_, conn):
            await conn.dial()
            got = bytearray()
            while data := await conn.read():
                got += data
            assert len(got) == 300
            await asyncio.wait_for(far_end_saw_eof.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(30)
async def test_link_session_runs_over_a_modem_call() -> None:
    """The framed Link facade, unchanged, over a dialled call to central on TCP."""
    central_done = asyncio.Event()

    async def echo(msg: m.Message) -> m.Message | None:
        assert isinstance(msg, m.LinkEcho)
        return m.LinkEchoReply(nonce=msg.nonce, sent_at=msg.sent_at)

    async def central(transport: Transport) -> None:
        link = Link(transport, SessionConfig(role=Role.SERVER, baud=33600), rng=random.Random(1))
        try:
            # serve() ends with LinkDown once the caller hangs up
            with pytest.raises(LinkDown):
                await link.serve(echo)
            with contextlib.suppress(LinkError, PortError):
                await link.aclose()
        finally:
            central_done.set()

    server = await serve_tcp("127.0.0.1", 0, central)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with rig(address=f"{host}:{port}", speed=33600) as (_, conn):
            await conn.dial()
            transport: Transport = ModemTransport(conn)
            assert transport.name == f"modem:{conn.path}"
            link = Link(
                transport, SessionConfig(role=Role.CLIENT, baud=33600), rng=random.Random(2)
            )
            try:
                await link.wait_up(10)
                for nonce in (b"\x00NO CARRIER\r\n+++", bytes(range(256)) * 4):
                    request = m.LinkEcho(nonce=nonce[:64], sent_at=2.5)
                    reply = await link.request(request, expect=m.LinkEchoReply, timeout=10)
                    assert reply.nonce == nonce[:64]
            finally:
                await link.aclose()  # hangs the call up
            assert conn.state is State.IDLE
            with pytest.raises(LinkClosed):
                await transport.read()
            await asyncio.wait_for(central_done.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(30)
async def test_modem_left_online_by_a_crashed_predecessor() -> None:
    async with echo_server() as address, emulator(address) as modem:
        # the predecessor configured the modem, dialled, and died mid-call
        # without hanging up (a pty has no DTR to drop when it closes)
        predecessor = serial.Serial(modem.port_path, 115200, timeout=0)
        try:
            predecessor.write(b"ATS12=10D5551234\r")
            deadline = asyncio.get_running_loop().time() + 5
            while modem.core.state.value != "online":
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        finally:
            predecessor.close()
        async with await ModemConnection.open(modem.port_path, fast_config()) as conn:
            await conn.dial()
            conn.write(b"fresh call")
            assert await read_exactly(conn, 10) == b"fresh call"
            assert modem.core.statistics()["connects"] == 2


def frame(payload: bytes) -> bytes:
    """A frame as the link puts it on the wire: 0x00 COBS(payload) 0x00."""
    return b"\x00" + cast(bytes, cobs.encode(payload)) + b"\x00"


@pytest.mark.timeout(30)
async def test_link_reports_an_in_band_drop_as_carrier_loss_while_we_keep_sending() -> None:
    """The emulator drops the call after N bytes in the middle of a bulk transfer
    from us whose frames carry the NO CARRIER text: the session keeps writing
    data frames, yet the dialler recognises the modem's NO CARRIER, so the
    session goes down because the carrier was lost, not because keepalives
    stopped, and the hang-up after it needs nothing from the modem."""

    async def digest(msg: m.Message) -> m.Message | None:
        assert isinstance(msg, m.LinkData)
        return m.LinkDigest(sha256=hashlib.sha256(msg.chunk).digest(), nbytes=len(msg.chunk))

    async def central(transport: Transport) -> None:
        link = Link(transport, SessionConfig(role=Role.SERVER, baud=33600), rng=random.Random(1))
        with contextlib.suppress(LinkError, PortError):
            await link.serve(digest)
        with contextlib.suppress(LinkError, PortError):
            await link.aclose()

    server = await serve_tcp("127.0.0.1", 0, central)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with rig(address=f"{host}:{port}", speed=33600, no_carrier_after=6000) as (
            modem,
            conn,
        ):
            await conn.dial()
            link = Link(
                ModemTransport(conn),
                SessionConfig(role=Role.CLIENT, baud=33600),
                rng=random.Random(2),
            )
            try:
                await link.wait_up(10)
                # the text, many times, in frames that fill the line for ~6 s
                chunk = (b"\x00data" + NO_CARRIER_BYTES) * 1000
                bulk = m.LinkData(chunk=chunk, index=0, last=True)
                with pytest.raises(LinkDown):
                    await link.request(bulk, expect=m.LinkDigest, timeout=20)
                # the session went down because the carrier was lost
                lost_when_down = conn.carrier_lost.is_set()
            finally:
                with contextlib.suppress(LinkDown):  # the failure, reported once more
                    await link.aclose()
            assert lost_when_down
            assert conn.state is State.IDLE
            assert conn.statistics()["carrier_losses"] == 1
            # the hang-up after the drop: nothing to do, the modem is on hook
            assert modem.core.statistics()["escapes"] == 0
            assert modem.core.state.value == "command"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(20)
async def test_a_frame_ending_with_the_text_then_a_pause_is_not_a_drop() -> None:
    """The far end sends a frame whose last bytes before its delimiter are the
    text, then falls silent until the dialler has judged it: data."""
    tricky = frame(b"payload" + NO_CARRIER_BYTES)
    later = frame(b"next")
    quiet = asyncio.Event()

    async def far_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(frame(b"hello")))
        writer.write(tricky)
        await writer.drain()
        await quiet.wait()
        writer.write(later)
        await writer.drain()
        await reader.read()  # until the call ends
        writer.close()

    server = await asyncio.start_server(far_end, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with rig(address=f"{host}:{port}") as (_, conn):
            await conn.dial()
            conn.write(frame(b"hello"))  # so a lone 0x00 could be our echo
            # held while the far end stays silent, then judged to be data
            assert await read_exactly(conn, len(tricky)) == tricky
            assert conn.statistics()["false_no_carrier"] == 1
            assert conn.state is State.ONLINE
            assert not conn.carrier_lost.is_set()
            quiet.set()
            assert await read_exactly(conn, len(later)) == later
            assert conn.statistics()["carrier_losses"] == 0
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(20)
async def test_hangup_of_a_modem_that_dropped_unnoticed_is_clean() -> None:
    """With numeric results the drop ("3\\r") cannot be told from data and the
    dialler stays online; the hang-up's +++ is then echoed by a modem already
    in command state, and ATH0 settles it cleanly."""
    config = fast_config(init_string="ATQ0 V0 E1 S0=0 &C1 &D2 S12=10")
    async with rig(config, no_carrier_after=300) as (modem, conn):
        await conn.dial()
        conn.write(bytes(1000))
        await conn.drain()
        got = bytearray()
        while not got.endswith(b"3\r"):  # the numeric NO CARRIER, passed on as data
            got += await asyncio.wait_for(conn.read(), 5)
        assert modem.core.state.value == "command"
        state_before = conn.state
        await conn.hangup()  # raises ModemTimeout if unclean
        assert state_before is State.ONLINE  # the dialler had nothing to recognise
        assert conn.state is State.IDLE
        assert modem.core.statistics()["escapes"] == 0  # it was never online to escape
        assert modem.core.state.value == "command"


# ------------------------------------------------ ready between calls


@pytest.mark.timeout(20)
async def test_ready_modem_is_dialled_after_a_probe_only() -> None:
    async with rig(fast_config(keep_ready=True)) as (modem, conn):
        assert await conn.wait_prepared()
        assert conn.state is State.READY
        assert modem.core.commands() == ["ATZ", FAST_INIT]
        await conn.dial()
        assert modem.core.commands()[2:] == ["AT", "ATDT5551234"]
        conn.write(b"ping")
        assert await read_exactly(conn, 4) == b"ping"
        await conn.hangup()
        # prepared again straight after the hang-up, off the next call's path
        assert await conn.wait_prepared()
        assert modem.core.commands()[4:] == ["ATH0", "ATZ", FAST_INIT]
        await conn.dial()
        assert modem.core.commands()[7:] == ["AT", "ATDT5551234"]
        stats = conn.statistics()
        assert (stats["prepares"], stats["ready_dials"], stats["probe_failures"]) == (2, 2, 0)


@pytest.mark.timeout(20)
async def test_power_cycled_modem_is_reset_before_the_dial() -> None:
    async with rig(fast_config(keep_ready=True), error_first=True) as (modem, conn):
        assert await conn.wait_prepared()
        modem.power_off()
        modem.power_on()  # it answers ERROR to the first command again
        await conn.dial()
        assert modem.core.commands()[3:] == ["AT", "ATZ", FAST_INIT, "ATDT5551234"]
        assert conn.statistics()["probe_failures"] == 1


@pytest.mark.timeout(30)
async def test_modem_without_power_fails_the_dial_once_then_recovers() -> None:
    config = fast_config(keep_ready=True, command_timeout=0.5, max_attempts=1)
    async with rig(config) as (modem, conn):
        assert await conn.wait_prepared()
        modem.power_off()
        with pytest.raises(ModemTimeout):
            await conn.dial()  # no OK to the probe, then none to three resets
        assert conn.state is State.IDLE  # and it stays there: no retry loop
        assert modem.core.commands() == ["ATZ", FAST_INIT]
        modem.power_on()
        await conn.dial()
        assert modem.core.commands()[2:] == ["ATZ", FAST_INIT, "ATDT5551234"]


@pytest.mark.timeout(30)
async def test_failed_preparation_is_reported_and_left_for_the_next_dial() -> None:
    config = fast_config(keep_ready=True, command_timeout=0.5)
    async with echo_server() as address, emulator(address) as modem:
        modem.power_off()
        async with await ModemConnection.open(modem.port_path, config) as conn:
            assert not await conn.wait_prepared()
            assert conn.state is State.IDLE
            assert "ATZ" in conn.prepare_error
            assert conn.statistics()["prepare_failures"] == 1
            modem.power_on()
            await conn.dial()
            assert modem.core.commands() == ["ATZ", FAST_INIT, "ATDT5551234"]
            await conn.hangup()
            assert await conn.wait_prepared()
            assert conn.prepare_error == ""


@pytest.mark.timeout(20)
async def test_modem_is_prepared_again_after_an_in_band_drop() -> None:
    async with rig(fast_config(keep_ready=True), no_carrier_after=300) as (modem, conn):
        assert await conn.wait_prepared()
        await conn.dial()
        conn.write(bytes(1000))
        while await conn.read():
            pass
        assert conn.carrier_lost.is_set()
        await conn.hangup()  # nothing to do: the modem dropped the call
        assert await conn.wait_prepared()
        assert modem.core.commands()[2:] == ["AT", "ATDT5551234", "ATZ", FAST_INIT]
        await conn.dial()
        assert modem.core.commands()[6:] == ["AT", "ATDT5551234"]
