"""Debounce and power-monitor cores: boundaries, the report deadline, a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.power.config import MAX_DEBOUNCE_S, REPORT_DEADLINE_S
from firmware.common.power.debounce import Debouncer, StableChange
from firmware.common.power.monitor import (
    OwnPowerFailing,
    OwnPowerRestored,
    PeerPowerLost,
    PeerPowerRestored,
    PowerEvent,
    PowerMonitor,
    Signal,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

MS = 0.001
T0 = 100.0
DEBOUNCE = 0.020


def monitor(debounce: float = DEBOUNCE) -> PowerMonitor:
    return PowerMonitor(peer_powered=True, own_power_good=True, debounce=debounce, now=T0)


def run_until(m: PowerMonitor, until: float) -> list[PowerEvent]:
    """Honour every deadline up to ``until``, as the asyncio adapter does."""
    while (deadline := m.next_deadline()) is not None and deadline <= until:
        m.handle_deadline(deadline)
    events = []
    while (event := m.next_event()) is not None:
        events.append(event)
    return events


def test_glitch_of_debounce_minus_1ms_is_ignored() -> None:
    m = monitor()
    m.input_changed(Signal.PEER_POWER, False, T0 + 1.0)
    assert m.next_deadline() == pytest.approx(T0 + 1.0 + DEBOUNCE)
    assert run_until(m, T0 + 1.0 + DEBOUNCE - 1 * MS) == []
    m.input_changed(Signal.PEER_POWER, True, T0 + 1.0 + DEBOUNCE - 1 * MS)
    assert m.next_deadline() is None
    assert run_until(m, T0 + 10.0) == []
    assert m.peer_powered
    assert m.statistics() == {"events": 0, "peer_power_glitches": 1, "own_power_glitches": 0}


def test_loss_of_debounce_plus_1ms_is_reported_at_the_debounce_time() -> None:
    m = monitor()
    start = T0 + 1.0
    m.input_changed(Signal.PEER_POWER, False, start)
    events = run_until(m, start + DEBOUNCE + 1 * MS)
    assert events == [PeerPowerLost(since=start, at=pytest.approx(start + DEBOUNCE))]
    m.input_changed(Signal.PEER_POWER, True, start + DEBOUNCE + 1 * MS)
    assert not m.peer_powered
    events = run_until(m, start + 1.0)
    assert events == [
        PeerPowerRestored(
            since=start + DEBOUNCE + 1 * MS, at=pytest.approx(start + 2 * DEBOUNCE + 1 * MS)
        )
    ]
    assert m.peer_powered


def test_late_deadline_still_counts_before_the_next_edge() -> None:
    # The adapter's timer ran late: the restore edge arrives before the
    # deadline was handled.  The loss did last the debounce time: report it.
    m = monitor()
    m.input_changed(Signal.PEER_POWER, False, T0)
    m.input_changed(Signal.PEER_POWER, True, T0 + DEBOUNCE + 5 * MS)
    assert m.next_event() == PeerPowerLost(since=T0, at=T0 + DEBOUNCE + 5 * MS)


@pytest.mark.parametrize("debounce", [0.001, DEBOUNCE, MAX_DEBOUNCE_S])
def test_loss_reported_within_the_100ms_guarantee(debounce: float) -> None:
    m = monitor(debounce)
    m.input_changed(Signal.PEER_POWER, False, T0)
    deadline = m.next_deadline()
    assert deadline is not None
    assert deadline - T0 <= REPORT_DEADLINE_S
    assert run_until(m, T0 + REPORT_DEADLINE_S) == [PeerPowerLost(T0, pytest.approx(deadline))]


def test_own_power_events_and_order() -> None:
    m = monitor()
    m.input_changed(Signal.OWN_POWER, False, T0 + 0.005)
    m.input_changed(Signal.PEER_POWER, False, T0 + 0.001)  # clamped to T0 + 0.005
    # Both fall due in one late handling: reported oldest first.
    m.handle_deadline(T0 + 1.0)
    assert m.next_event() == PeerPowerLost(T0 + 0.005, T0 + 1.0)
    assert m.next_event() == OwnPowerFailing(T0 + 0.005, T0 + 1.0)
    m.input_changed(Signal.OWN_POWER, True, T0 + 2.0)
    assert run_until(m, T0 + 3.0) == [
        OwnPowerRestored(T0 + 2.0, pytest.approx(T0 + 2.0 + DEBOUNCE))
    ]
    assert m.statistics()["events"] == 3


def test_repeated_level_is_harmless() -> None:
    d = Debouncer(True, DEBOUNCE, T0)
    d.update(False, T0)
    d.update(False, T0 + 0.010)  # RPi.GPIO may report a level twice
    assert d.next_deadline() == pytest.approx(T0 + DEBOUNCE)
    assert d.handle_deadline(T0 + DEBOUNCE) == StableChange(False, T0, T0 + DEBOUNCE)
    assert d.glitches == 0


def test_debouncer_rejects_nonpositive_hold() -> None:
    with pytest.raises(ValueError, match="positive"):
        Debouncer(True, 0.0, T0)


# -- model: integer milliseconds keep the arithmetic exact -------------------------

EDGES = st.lists(st.tuples(st.integers(1, 60), st.booleans()), max_size=40)


def reference(edges: list[tuple[int, bool]], hold: int) -> list[tuple[bool, float, float]]:
    """Stable changes by definition: a raw level held >= hold after its edge."""
    stable, raw, t = True, True, 0
    segments: list[tuple[int, bool]] = []
    for dt, level in edges:
        t += dt
        if level != raw:
            segments.append((t, level))
            raw = level
    changes = []
    for i, (start, level) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else None
        if level != stable and (end is None or end - start >= hold):
            changes.append((level, float(start), float(start + hold)))
            stable = level
    return changes


@given(edges=EDGES, hold=st.integers(1, 80))
def test_monitor_matches_the_definition(edges: list[tuple[int, bool]], hold: int) -> None:
    m = PowerMonitor(peer_powered=True, own_power_good=True, debounce=float(hold), now=0.0)
    lazy = PowerMonitor(peer_powered=True, own_power_good=True, debounce=float(hold), now=0.0)
    events: list[PowerEvent] = []
    t = 0
    for dt, level in edges:
        t += dt
        events += run_until(m, float(t))
        m.input_changed(Signal.PEER_POWER, level, float(t))
        lazy.input_changed(Signal.PEER_POWER, level, float(t))  # deadlines only via edges
    events += run_until(m, float(t + 10_000))
    lazy.handle_deadline(float(t + 10_000))
    got = [(isinstance(e, PeerPowerRestored), e.since, e.at) for e in events]
    assert got == reference(edges, hold)
    lazy_events = []
    while (e := lazy.next_event()) is not None:
        lazy_events.append((isinstance(e, PeerPowerRestored), e.since))
    # A late timer changes when a decision is made, never what is decided.
    assert lazy_events == [(level, since) for level, since, _ in got]
