"""Property tests of the session: random faults never corrupt, duplicate or hang.

Each scenario joins two cores over lines that drop, flip bits, duplicate,
swap, truncate and inject garbage, restarts either side and cuts the line at
random moments, while both sides send messages.  Then the line heals.  The
invariants:

* every message delivered is byte-for-byte one that was sent, and no message
  is delivered twice;
* every message a still-running side sent ends in exactly one MessageSent or
  MessageFailed, and MessageSent means the peer delivered it;
* after the line heals, the session comes back and carries messages again.

Scenario counts: the default profile runs a hundred per test; the run of
record (``HYPOTHESIS_PROFILE=record``) runs 2,500 per test, 10,000 in all.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import LinkError
from firmware.common.link.session import (
    MessageFailed,
    MessageReceived,
    MessageSent,
    Role,
    SessionConfig,
)
from firmware.common.link.testing import Impairments, Pair

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

TAG = struct.Struct(">I")


@dataclass
class Ledger:
    """What each side sent, per incarnation, and what arrived."""

    payloads: dict[int, bytes] = field(default_factory=dict)  # tag -> payload
    sent: dict[tuple[str, int, int], int] = field(default_factory=dict)  # (side, inc, id) -> tag
    delivered: dict[int, int] = field(default_factory=dict)  # tag -> times
    next_tag: int = 0


impairment = st.builds(
    Impairments,
    ber=st.sampled_from([0.0, 1e-6, 1e-5, 1e-4]),
    drop=st.floats(0, 0.2),
    duplicate=st.floats(0, 0.1),
    swap=st.floats(0, 0.1),
    truncate=st.floats(0, 0.05),
    garbage=st.floats(0, 0.05),
)

send = st.tuples(
    st.just("send"),
    st.sampled_from("ab"),
    st.integers(0, 30_000),
    st.booleans(),
    st.integers(1, 6),  # a burst of this many messages
)
action = st.one_of(
    send,
    send,
    send,  # traffic is what meets the faults: weight it
    st.tuples(st.just("restart"), st.sampled_from("ab")),
    st.tuples(st.just("cut"), st.floats(0.1, 6.0)),
    st.tuples(st.just("wait"), st.floats(0.0, 2.0)),
)
actions = st.lists(action, min_size=2, max_size=12)


class Runner:
    def __init__(self, seed: int, baud: int | None, imp_ab: Impairments, imp_ba: Impairments):
        self.pair = Pair(
            SessionConfig(Role.SERVER, baud=baud, dead_after=2.0, keepalive_interval=0.5),
            SessionConfig(Role.CLIENT, baud=baud, dead_after=2.0, keepalive_interval=0.5),
            seed=seed,
        )
        self.pair.ab.impairments = imp_ab
        self.pair.ba.impairments = imp_ba
        self.ledger = Ledger()
        self.incarnation = {"a": 0, "b": 0}
        self.seen = {"a": 0, "b": 0}  # events of each side already checked
        self.outcomes: dict[tuple[str, int, int], str] = {}

    def session(self, side: str):  # type: ignore[no-untyped-def]
        return self.pair.a if side == "a" else self.pair.b

    def events(self, side: str) -> list:
        return self.pair.events_a if side == "a" else self.pair.events_b

    def collect(self) -> None:
        """Account for every new event of both sides."""
        for side in "ab":
            evs = self.events(side)
            for _, ev in evs[self.seen[side] :]:
                key = (side, self.incarnation[side], getattr(ev, "msg_id", -1))
                if isinstance(ev, MessageReceived):
                    (tag,) = TAG.unpack_from(ev.payload)
                    assert ev.payload == self.ledger.payloads[tag], "corrupted delivery"
                    self.ledger.delivered[tag] = self.ledger.delivered.get(tag, 0) + 1
                    assert self.ledger.delivered[tag] == 1, "duplicate delivery"
                elif isinstance(ev, MessageSent | MessageFailed):
                    assert key in self.ledger.sent, "outcome for a message never sent"
                    assert key not in self.outcomes, "two outcomes for one message"
                    self.outcomes[key] = "sent" if isinstance(ev, MessageSent) else "failed"
                    if isinstance(ev, MessageFailed):
                        assert isinstance(ev.error, LinkError)
            self.seen[side] = len(evs)

    def send(self, side: str, size: int, urgent: bool) -> None:
        sess = self.session(side)
        if not sess.connected:
            return
        tag = self.ledger.next_tag
        self.ledger.next_tag += 1
        body = TAG.pack(tag) + self.pair.rng.randbytes(size)
        self.ledger.payloads[tag] = body
        msg_id = sess.send_message(0x82, body, self.pair.now, urgent=urgent)
        self.ledger.sent[(side, self.incarnation[side], msg_id)] = tag

    def restart(self, side: str) -> None:
        self.collect()
        self.pair.restart(side)
        self.incarnation[side] += 1

    def run(self, actions: list) -> None:
        pair = self.pair
        pair.run_until(lambda: pair.a.connected and pair.b.connected, 5.0)
        for act in actions:
            if act[0] == "send":
                for i in range(act[4]):
                    self.send(act[1], act[2] >> i, act[3])
                pair.run_for(0.05)
            elif act[0] == "restart":
                self.restart(act[1])
            elif act[0] == "cut":
                pair.ab.impairments.cut = pair.ba.impairments.cut = True
                pair.run_for(act[1])
                pair.ab.impairments.cut = pair.ba.impairments.cut = False
            else:
                pair.run_for(act[1])
            self.collect()
        # Heal the line and let everything settle.
        pair.ab.impairments = Impairments()
        pair.ba.impairments = Impairments()
        live = lambda: [  # noqa: E731
            k for k in self.ledger.sent if self.incarnation[k[0]] == k[1] and k not in self.outcomes
        ]
        settled = pair.run_until(lambda: (self.collect(), not live())[1], 600.0)
        assert settled, f"messages never resolved: {live()}"
        for key, outcome in self.outcomes.items():
            if outcome == "sent":
                assert self.ledger.delivered.get(self.ledger.sent[key]) == 1, "sent, not delivered"
        # Liveness: the session returns and carries a message each way.  First
        # let any dead-peer timer started during the faults run out (a message
        # sent into a session about to be declared dead fails, rightly).
        pair.run_for(pair.config_a.dead_after + 1.0)
        self.collect()
        assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 5.0)
        # (Frames a dead incarnation put on the wire may still arrive now:
        # count only the two new messages.)
        fresh = [self.ledger.next_tag, self.ledger.next_tag + 1]
        self.send("a", 10, True)
        self.send("b", 5000, False)
        assert pair.run_until(
            lambda: (self.collect(), all(t in self.ledger.delivered for t in fresh))[1], 30.0
        )


@given(
    seed=st.integers(0, 2**32),
    imp_ab=impairment,
    imp_ba=impairment,
    actions=actions,
)
def test_noisy_line_at_921600_baud(
    seed: int, imp_ab: Impairments, imp_ba: Impairments, actions: list
) -> None:
    Runner(seed, 921600, imp_ab, imp_ba).run(actions)


@given(
    seed=st.integers(0, 2**32),
    imp_ab=impairment,
    imp_ba=impairment,
    actions=actions,
)
def test_noisy_stream_without_line_rate(
    seed: int, imp_ab: Impairments, imp_ba: Impairments, actions: list
) -> None:
    Runner(seed, None, imp_ab, imp_ba).run(actions)


@given(
    seed=st.integers(0, 2**32),
    actions=st.lists(
        st.one_of(
            st.tuples(
                st.just("send"),
                st.sampled_from("ab"),
                st.integers(0, 3000),
                st.booleans(),
                st.integers(1, 4),
            ),
            st.tuples(st.just("restart"), st.sampled_from("ab")),
            st.tuples(st.just("wait"), st.floats(0.0, 0.5)),
        ),
        max_size=20,
    ),
)
def test_restarts_on_a_clean_line_fail_exactly_what_was_in_flight(seed: int, actions: list) -> None:
    Runner(seed, 115200, Impairments(), Impairments()).run(actions)


@given(seed=st.integers(0, 2**32), data=st.binary(max_size=2000))
def test_garbage_fed_to_a_live_session_delivers_nothing(seed: int, data: bytes) -> None:
    runner = Runner(seed, 921600, Impairments(), Impairments())
    pair = runner.pair
    assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 5.0)
    pair.b.receive_bytes(data, pair.now)
    runner.collect()
    assert not runner.ledger.delivered
    runner.run([("send", "a", 100, False, 1), ("wait", 1.0)])
