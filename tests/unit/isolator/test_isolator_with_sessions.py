"""The real link sessions talking through the filter core, in simulated time.

The outer module's session (server, side a) and the inner module's (client,
side b) run on firmware/common/link/testing.py's in-memory bench; every byte
each side sends passes through the isolator's filter before it reaches the
other line.  Honest traffic must get through intact and untouched by the
filter; what the allowlist forbids must not arrive, however the ARQ retries.
"""

import random

import pytest

from firmware.common.link.kinds import Kind
from firmware.common.link.session import MessageReceived, Role, SessionConfig
from firmware.common.link.testing import Impairments, Pair
from firmware.isolator import suite
from firmware.isolator.filtercore import A_TO_B, B_TO_A, Filter, FilterConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

BAUD = 1_000_000
MS_PER_S = 1000


def isolated_pair(seed: int = 0, maintenance: bool = False) -> tuple[Pair, Filter]:
    pair = Pair(
        SessionConfig(Role.SERVER, baud=BAUD),  # a: the outer module
        SessionConfig(Role.CLIENT, baud=BAUD),  # b: the inner module
        seed=seed,
    )
    core = Filter(FilterConfig(suite.shipped_config(maintenance)))
    for line, direction in ((pair.ab, A_TO_B), (pair.ba, B_TO_A)):
        arrived = line.due

        # the isolator takes what the line delivers (noise included) and
        # hands the receiver only what it forwards
        def through_isolator(now: float, arrived=arrived, d=direction) -> bytes:
            return core.feed(d, arrived(now), int(now * MS_PER_S))

        line.due = through_isolator  # type: ignore[method-assign]
    assert pair.run_until(lambda: pair.a.connected and pair.b.connected, 2.0)
    return pair, core


def received(events: list) -> list[MessageReceived]:
    return [e for _, e in events if isinstance(e, MessageReceived)]


def drops(core: Filter) -> dict[str, int]:
    return {
        f"{d} {k}": v
        for d, counters in core.statistics().items()
        for k, v in counters.items()
        if k.startswith("dropped_") and v
    }


def test_request_and_reply_cross_intact() -> None:
    pair, core = isolated_pair()
    rng = random.Random(1)
    request = rng.randbytes(900)
    bundle = rng.randbytes(300_000)  # many full frames
    pair.b.send_message(Kind.FETCH_SERVICE, request, pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_a)), 5.0)
    pair.a.send_message(Kind.SERVICE, bundle, pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_b)), 20.0)
    assert [(m.kind, m.payload) for m in received(pair.events_a)] == [(Kind.FETCH_SERVICE, request)]
    assert [(m.kind, m.payload) for m in received(pair.events_b)] == [(Kind.SERVICE, bundle)]
    assert drops(core) == {}
    assert core.statistics()[A_TO_B]["frames_out"] > 70


def test_outer_module_cannot_command_the_inner_module() -> None:
    pair, core = isolated_pair()
    # a compromised outer module sends a request, and a maintenance message
    pair.a.send_message(Kind.FETCH_SERVICE, b"do as I say", pair.now)
    pair.a.send_message(Kind.LINK_DATA, b"x" * 100, pair.now)
    pair.run_for(3.0)
    assert received(pair.events_b) == []
    assert drops(core)["a->b dropped_kind"] >= 2  # every retransmission is dropped too


def test_oversized_request_is_blocked_at_the_wire() -> None:
    pair, core = isolated_pair()
    pair.b.send_message(Kind.FETCH_SERVICE, bytes(4097), pair.now)  # cap is 4096
    pair.run_for(2.0)
    assert received(pair.events_a) == []
    assert drops(core)["b->a dropped_msg_len"] >= 1


def test_maintenance_traffic_passes_only_when_enabled() -> None:
    pair, core = isolated_pair(maintenance=True)
    pair.b.send_message(Kind.LINK_ECHO, b"ping", pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_a)), 5.0)
    assert received(pair.events_a)[0].payload == b"ping"
    assert drops(core) == {}


def test_noise_is_dropped_by_the_isolator_and_repaired_by_the_arq() -> None:
    pair, core = isolated_pair(seed=3)
    pair.ab.impairments = Impairments(ber=2e-5, garbage=0.05)
    bundle = random.Random(2).randbytes(200_000)
    pair.a.send_message(Kind.SERVICE, bundle, pair.now)
    assert pair.run_until(lambda: bool(received(pair.events_b)), 60.0)
    assert received(pair.events_b)[0].payload == bundle
    noise = drops(core)
    assert sum(v for k, v in noise.items() if k.startswith("a->b")) > 0, noise
    assert not any(k.startswith("b->a") for k in noise)  # the clean direction lost nothing
