"""Scenario tests of the session core: two cores in memory, simulated time."""

from __future__ import annotations

import random

import pytest

from firmware.common.errors import LinkDown, LocalProtocolError, PeerRestarted
from firmware.common.link.framing import Flag, Frame, FrameType, encode_frame
from firmware.common.link.session import (
    MessageFailed,
    MessageReceived,
    MessageSent,
    Role,
    Session,
    SessionConfig,
    SessionDown,
    SessionUp,
)
from firmware.common.link.testing import Pair

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

BULK = 0x82
CONTROL = 0x80


def make_pair(baud: int | None = 115200, seed: int = 0, **kw: float) -> Pair:
    pair = Pair(
        SessionConfig(Role.SERVER, baud=baud, **kw),  # type: ignore[arg-type]
        SessionConfig(Role.CLIENT, baud=baud, **kw),  # type: ignore[arg-type]
        seed=seed,
    )
    assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 2.0)
    return pair


def received(events: list) -> list[MessageReceived]:
    return [e for _, e in events if isinstance(e, MessageReceived)]


def of_type(events: list, cls: type) -> list:
    return [(t, e) for t, e in events if isinstance(e, cls)]


def test_handshake_reports_up_on_both_sides_once() -> None:
    pair = make_pair()
    ups_a, ups_b = of_type(pair.events_a, SessionUp), of_type(pair.events_b, SessionUp)
    assert len(ups_a) == len(ups_b) == 1
    assert ups_a[0][1].peer_epoch == pair.b.epoch
    assert ups_b[0][1].peer_epoch == pair.a.epoch
    assert not ups_a[0][1].restarted
    pair.run_for(10.0)  # keepalives keep it up, nothing else happens
    assert pair.a.connected and pair.b.connected
    assert len(of_type(pair.events_a, SessionUp)) == 1


@pytest.mark.parametrize("size", [0, 1, 4087, 4088, 4089, 100_000, 1 << 20])
def test_messages_of_every_size_arrive_intact_and_are_confirmed(size: int) -> None:
    pair = make_pair()
    data = random.Random(size).randbytes(size)
    mid = pair.a.send_message(BULK, data, pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_b)), 200)
    [msg] = received(pair.events_b)
    assert (msg.kind, msg.payload) == (BULK, data)
    assert pair.run_until(lambda: bool(of_type(pair.events_a, MessageSent)), 5)
    assert of_type(pair.events_a, MessageSent)[0][1].msg_id == mid


def test_both_directions_at_once_with_many_messages_in_flight() -> None:
    pair = make_pair(baud=921600)
    rng = random.Random(7)
    sent_a = [rng.randbytes(rng.randrange(0, 20_000)) for _ in range(30)]
    sent_b = [rng.randbytes(rng.randrange(0, 20_000)) for _ in range(30)]
    for d in sent_a:
        pair.a.send_message(BULK, d, pair.now, urgent=len(d) < 1000)
    for d in sent_b:
        pair.b.send_message(BULK, d, pair.now)
    assert pair.run_until(
        lambda: len(received(pair.events_b)) == 30 and len(received(pair.events_a)) == 30, 60
    )
    assert sorted(m.payload for m in received(pair.events_b)) == sorted(sent_a)
    assert sorted(m.payload for m in received(pair.events_a)) == sorted(sent_b)


def test_urgent_message_overtakes_a_bulk_transfer() -> None:
    pair = make_pair(baud=115200)
    pair.a.send_message(BULK, bytes(1 << 20), pair.now)
    pair.run_for(5.0)  # the bulk transfer is well under way
    start = pair.now
    pair.a.send_message(CONTROL, b"status?", pair.now, urgent=True)
    assert pair.run_until(
        lambda: any(m.kind == CONTROL for m in received(pair.events_b)), timeout=5
    )
    arrived = next(t for t, e in pair.events_b if isinstance(e, MessageReceived))
    # Simulated time: behind at most the frame on the wire and the one queued.
    frame_time = (4096 + 64) / 11520
    assert arrived - start < 3 * frame_time
    assert not any(m.kind == BULK for m in received(pair.events_b))


def test_send_while_down_and_oversized_are_typed_errors() -> None:
    s = Session(SessionConfig(Role.CLIENT, max_message=1000), random.Random(1), 0.0)
    with pytest.raises(LinkDown):
        s.send_message(BULK, b"x", 0.0)
    pair = make_pair(max_message=1000)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        pair.a.send_message(BULK, bytes(1001), pair.now)
    with pytest.raises(LocalProtocolError):
        pair.a.send_message(0, b"", pair.now)
    with pytest.raises(LocalProtocolError):
        SessionConfig(Role.CLIENT, window=2)


def test_peer_restart_fails_everything_in_flight_within_one_round_trip() -> None:
    pair = make_pair(baud=115200)
    mid = pair.a.send_message(BULK, bytes(200_000), pair.now)
    pair.run_for(3.0)
    pair.restart("b")
    restarted_at = pair.now
    assert pair.run_until(lambda: bool(of_type(pair.events_a, SessionDown)), 5)
    [(t_down, down)] = of_type(pair.events_a, SessionDown)
    assert isinstance(down.error, PeerRestarted)
    [(t_fail, failed)] = of_type(pair.events_a, MessageFailed)
    assert failed.msg_id == mid and isinstance(failed.error, PeerRestarted)
    assert t_fail <= t_down
    # The new b says HELLO at once; one round trip is a HELLO and its answer,
    # each behind at most one frame already on the wire.
    frame_time = (4096 + 64) / 11520
    assert t_down - restarted_at < 2 * frame_time + 0.05
    assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 2)
    ups = of_type(pair.events_a, SessionUp)
    assert ups[-1][1].restarted and ups[-1][1].peer_epoch == pair.b.epoch
    assert not received(pair.events_b)  # nothing half-delivered


def test_cut_takes_session_down_after_dead_time_and_it_returns_within_2s() -> None:
    pair = make_pair(baud=115200)
    pair.a.send_message(BULK, bytes(50_000), pair.now)
    pair.ab.impairments.cut = pair.ba.impairments.cut = True
    pair.ab.clear()
    pair.ba.clear()
    assert pair.run_until(lambda: bool(of_type(pair.events_a, SessionDown)), 10)
    assert isinstance(of_type(pair.events_a, SessionDown)[0][1].error, LinkDown)
    assert of_type(pair.events_a, MessageFailed)
    pair.run_for(3.0)
    pair.ab.impairments.cut = pair.ba.impairments.cut = False
    restored = pair.now
    assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 2.0)
    assert pair.now - restored < 2.0
    pair.a.send_message(BULK, b"after", pair.now)
    assert pair.run_until(lambda: any(m.payload == b"after" for m in received(pair.events_b)), 2)


def test_short_cut_is_bridged_by_retransmission_without_loss() -> None:
    pair = make_pair(baud=115200)
    data = random.Random(3).randbytes(300_000)
    pair.a.send_message(BULK, data, pair.now)
    pair.run_for(5.0)
    pair.ab.impairments.cut = True
    pair.run_for(1.5)  # shorter than dead_after
    pair.ab.impairments.cut = False
    assert pair.run_until(lambda: bool(received(pair.events_b)), 60)
    assert received(pair.events_b)[0].payload == data
    assert not of_type(pair.events_a, SessionDown)
    assert pair.a.statistics()["timeouts"] >= 1


def test_force_down_fails_in_flight_and_reconnects() -> None:
    pair = make_pair()
    mid = pair.a.send_message(BULK, bytes(100_000), pair.now)
    pair.run_for(1.0)
    error = LinkDown("peer power lost")
    pair.a.force_down(error, pair.now)
    assert not pair.a.connected
    assert pair.a.next_event() == MessageFailed(mid, error)
    assert pair.a.next_event() == SessionDown(error)
    assert pair.a.statistics()["forced_down"] == 1
    assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 2.0)
    # b learnt of the new session from a's HELLO and failed nothing it had
    # not finished: it held only part of a message, which is discarded.
    assert not received(pair.events_b)


def _pump_but_do_not_drain_b(pair: Pair, rounds: int) -> None:
    """Run both cores while b's owner takes none of b's events."""
    for _ in range(rounds):
        data = pair.ab.due(pair.now + 1)
        if data:
            pair.b.receive_bytes(data, pair.now)
        pair.ba.send(pair.b.bytes_to_send(pair.now), pair.now)
        data = pair.ba.due(pair.now + 1)
        if data:
            pair.a.receive_bytes(data, pair.now)
        while (ev := pair.a.next_event()) is not None:
            pair.events_a.append((pair.now, ev))
        pair.ab.send(pair.a.bytes_to_send(pair.now), pair.now)
        pair.now += 0.001


def test_flow_control_stops_sender_while_receiver_does_not_drain() -> None:
    pair = make_pair(baud=None)
    for _ in range(8):  # one 1 MiB message after the other
        pair.a.send_message(BULK, bytes(1 << 20), pair.now)
        _pump_but_do_not_drain_b(pair, 100)
    # Five messages (5 MiB > the 4 MiB limit) closed b's window; the rest wait.
    assert pair.b.statistics()["messages_received"] == 5
    assert len(of_type(pair.events_a, MessageSent)) == 5
    assert pair.a.connected and pair.b.connected
    while pair.b.next_event() is not None:
        pass
    assert pair.run_until(lambda: len(received(pair.events_b)) == 3, 30)
    assert pair.b.statistics()["messages_received"] == 8


def test_own_frames_reflected_by_the_line_are_ignored() -> None:
    s = Session(SessionConfig(Role.CLIENT), random.Random(1), 0.0)
    hello = s.bytes_to_send(0.0)
    s.receive_bytes(hello, 0.0)  # an echoing pty
    assert s.statistics()["dropped_echo"] == 1
    assert not s.connected


def test_frames_from_a_stale_session_are_dropped() -> None:
    pair = make_pair()
    stale = Frame(
        FrameType.DATA,
        flags=int(Flag.FIRST | Flag.LAST),  # from the server side
        kind=BULK,
        session=(pair.a._token + 1) % (1 << 32) or 1,
        seq=0,
        payload=b"\x00\x00\x00\x09\x00\x00\x00\x01X",
    )
    pair.b.receive_bytes(encode_frame(stale), pair.now)
    assert pair.b.statistics()["dropped_stale"] >= 1
    assert pair.b.next_event() is None


def test_keepalive_detects_a_silent_peer() -> None:
    pair = make_pair(keepalive_interval=0.5, dead_after=2.0)
    pair.ab.impairments.cut = True
    assert pair.run_until(lambda: not pair.b.connected, 3.0)
    assert pair.b.statistics()["dead_peer"] == 1


def test_stream_mode_without_a_line_rate() -> None:
    pair = make_pair(baud=None)
    data = random.Random(9).randbytes(3 << 20)
    pair.b.send_message(BULK, data, pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_a)), 10)
    assert received(pair.events_a)[0].payload == data


def test_fragment_size_adapts_to_noise_and_recovers() -> None:
    pair = make_pair(baud=115200)
    pair.ab.impairments.ber = 1e-5
    pair.a.send_message(BULK, bytes(400_000), pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_b)), 200)
    noisy = pair.a.statistics()["payload_size"]
    assert 256 <= noisy < 2000
    pair.ab.impairments.ber = 0.0
    pair.a.send_message(BULK, bytes(2_000_000), pair.now)
    assert pair.run_until(lambda: len(received(pair.events_b)) == 2, 400)
    assert pair.a.statistics()["payload_size"] > noisy
