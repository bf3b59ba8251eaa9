"""Trusted time: forward only, across reboots, deaf to the wall clock."""

from __future__ import annotations

import ast
import inspect
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.inner import trusted_time
from firmware.inner.trusted_time import (
    PERSIST_INTERVAL,
    TimeState,
    TrustedClock,
    TrustedTimeCorrupt,
    TrustedTimeStore,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

T = 1_767_225_600


def test_first_boot_starts_at_zero_then_follows_signed_time() -> None:
    clock = TrustedClock(None, boot_id="b1", mono=100.0)
    assert clock.now(100.0) == 0
    assert not clock.synchronised
    assert clock.observe_signed_time(T, 110.0)
    assert clock.synchronised
    assert clock.now(110.0) == T
    assert clock.now(170.5) == T + 60


def test_never_goes_backwards() -> None:
    clock = TrustedClock(None, boot_id="b1", mono=0.0)
    clock.observe_signed_time(T, 0.0)
    assert clock.now(1000.0) == T + 1000
    # A replayed (older) signed time changes nothing.
    assert not clock.observe_signed_time(T + 10, 1000.0)
    assert clock.now(1000.0) == T + 1000
    # A monotonic reading from the past (a caller bug) cannot move it back either.
    assert clock.now(10.0) == T + 1000
    # A later signed time moves it forward.
    assert clock.observe_signed_time(T + 5000, 1001.0)
    assert clock.now(1002.0) == T + 5001


def test_reboot_resumes_from_the_persisted_mark(tmp_path: Path) -> None:
    store = TrustedTimeStore(tmp_path / "time.json")
    clock = TrustedClock(store.load(), boot_id="b1", mono=50.0)
    clock.observe_signed_time(T, 50.0)
    store.save(clock.state(3650.0))  # an hour later
    assert (tmp_path / "time.json").stat().st_mode & 0o777 == 0o600
    # Power cut; the box is off for a week; the new boot's monotonic clock starts near 0.
    rebooted = TrustedClock(store.load(), boot_id="b2", mono=3.0)
    assert rebooted.now(3.0) == T + 3600
    assert rebooted.now(63.0) == T + 3660  # and runs forward from there
    assert not rebooted.synchronised


def test_daemon_restart_in_the_same_boot_counts_the_downtime(tmp_path: Path) -> None:
    store = TrustedTimeStore(tmp_path / "time.json")
    clock = TrustedClock(None, boot_id="b1", mono=10.0)
    clock.observe_signed_time(T, 10.0)
    store.save(clock.state(20.0))
    restarted = TrustedClock(store.load(), boot_id="b1", mono=500.0)
    assert restarted.now(500.0) == T + 490


def test_same_boot_id_with_impossible_anchor_falls_back_to_mark() -> None:
    state = TimeState(high_water=T, boot_id="b1", anchor_time=T, anchor_mono=1e9)
    clock = TrustedClock(state, boot_id="b1", mono=5.0)
    assert clock.now(5.0) == T


@pytest.mark.parametrize("wall", [0.0, 86_400.0, 4_102_444_800.0, 2.0**40])
def test_wall_clock_changes_nothing(monkeypatch: pytest.MonkeyPatch, wall: float) -> None:
    def run() -> list[int]:
        clock = TrustedClock(None, boot_id="b", mono=0.0)
        clock.observe_signed_time(T, 1.0)
        return [clock.now(m) for m in (1.0, 2.0, 3600.0)]

    baseline = run()
    monkeypatch.setattr(time, "time", lambda: wall)
    monkeypatch.setattr(time, "time_ns", lambda: int(wall * 1e9))
    assert run() == baseline == [T, T + 1, T + 3599]


def test_core_never_reads_a_clock() -> None:
    tree = ast.parse(inspect.getsource(trusted_time))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"time", "datetime", "asyncio", "socket", "calendar"}


def test_wound_back_customer_across_reboots(tmp_path: Path) -> None:
    """Boot, sync, run; reboot many times with clocks anywhere: time only climbs."""
    store = TrustedTimeStore(tmp_path / "time.json")
    seen: list[int] = []
    signed = T
    for boot in range(6):
        clock = TrustedClock(store.load(), boot_id=f"boot-{boot}", mono=float(boot % 3))
        seen.append(clock.now(float(boot % 3)))
        if boot == 0:
            assert clock.observe_signed_time(T, 5.0)
        if boot == 2:
            # A replay of an old metadata's signed time after reboot: ignored.
            assert not clock.observe_signed_time(T - 10 * 86_400, 5.0)
        if boot == 4:
            signed = seen[-1] + 86_400
            assert clock.observe_signed_time(signed, 5.0)
        for minute in range(1, 11):
            mono = 5.0 + 60 * minute
            seen.append(clock.now(mono))
            if clock.should_persist(mono):
                store.save(clock.state(mono))
    assert seen == sorted(seen)
    assert seen[-1] >= signed


def test_power_cut_loses_at_most_the_persist_interval(tmp_path: Path) -> None:
    store = TrustedTimeStore(tmp_path / "time.json")
    clock = TrustedClock(None, boot_id="a", mono=0.0)
    clock.observe_signed_time(T, 0.0)
    store.save(clock.state(0.0))
    last = 0.0
    for second in range(0, 1000, 7):
        if clock.should_persist(float(second)):
            store.save(clock.state(float(second)))
        last = float(second)
    before_cut = clock.now(last)
    after = TrustedClock(store.load(), boot_id="b", mono=0.0).now(0.0)
    assert before_cut - PERSIST_INTERVAL - 7 <= after <= before_cut


def test_corrupt_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "time.json"
    store = TrustedTimeStore(path)
    assert store.load() is None
    fields = '"boot_id": "b", "anchor_time": null, "anchor_mono": null'
    bad = [
        b"",
        b"{}",
        b"[1]",
        ('{"format": 1, "high_water": -1, ' + fields + "}").encode(),
        b'{"format": 1, "high_water": 5, "boot_id": 3, "anchor_time": null, "anchor_mono": null}',
        b'{"format": 1, "high_water": 5, "boot_id": "b", "anchor_time": 5, "anchor_mono": null}',
        b'{"format": 1, "high_water": 5, "boot_id": "b", "anchor_time": 5, "anchor_mono": "x"}',
        b'{"format": 1, "high_water": 5, "boot_id": "b", "anchor_time": 5, "anchor_mono": NaN}',
        b'{"format": 2, "high_water": 5, "boot_id": "b", "anchor_time": null, "anchor_mono": null}',
    ]
    for data in bad:
        path.write_bytes(data)
        with pytest.raises(TrustedTimeCorrupt):
            store.load()


def test_state_roundtrip() -> None:
    state = TimeState(high_water=T, boot_id="b", anchor_time=T - 5, anchor_mono=12.5)
    assert TimeState.from_json(state.to_json()) == state


def test_bad_signed_time_is_a_caller_error() -> None:
    clock = TrustedClock(None, boot_id="b", mono=0.0)
    with pytest.raises(ValueError):
        clock.observe_signed_time(-1, 0.0)
    with pytest.raises(ValueError):
        clock.observe_signed_time(1.5, 0.0)  # type: ignore[arg-type]


_events = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 10_000)),
        st.tuples(st.just("signed"), st.integers(0, 2 * T)),
        st.tuples(st.just("reboot"), st.floats(0, 100)),
        st.tuples(st.just("restart"), st.floats(0, 100)),
    ),
    max_size=40,
)


@given(_events)
def test_property_monotone_and_at_least_signed(events: list[tuple[str, float]]) -> None:
    mono = 0.0
    boot = 0
    clock = TrustedClock(None, boot_id="0", mono=mono)
    persisted = clock.state(mono)
    last = clock.now(mono)
    for action, value in events:
        if action == "advance":
            mono += value
        elif action == "signed":
            clock.observe_signed_time(int(value), mono)
            assert clock.now(mono) >= int(value)
        elif action == "reboot":
            boot += 1
            mono = value
            clock = TrustedClock(persisted, boot_id=str(boot), mono=mono)
            last = min(last, persisted.high_water)  # unsaved progress is lost, nothing more
        else:  # daemon restart, same boot: monotonic clock keeps going
            mono += value
            clock = TrustedClock(persisted, boot_id=str(boot), mono=mono)
            last = min(last, persisted.high_water)
        now = clock.now(mono)
        assert now >= last
        assert now >= persisted.high_water
        last = now
        persisted = clock.state(mono)


@given(st.binary(max_size=300) | st.just(b"[" * 100_000) | st.just(b'{"a":' * 50_000))
def test_state_parser_is_total(data: bytes) -> None:
    try:
        state = TimeState.from_json(data)
    except TrustedTimeCorrupt:
        return
    assert state.high_water >= 0
