"""The uplink's call policy core: connect, batch, idle hang-up, periodic sync, backoff."""

from __future__ import annotations

import pytest

from firmware.common.errors import ConfigError, LocalProtocolError
from firmware.outer.policy import MIN_RETRY_AFTER, CallPolicy, CallState, PolicyConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(5)]


def config(**overrides: object) -> PolicyConfig:
    fields: dict[str, object] = {
        "idle_hangup": 30.0,
        "sync_interval": 3600.0,
        "sync_batch_window": 600.0,
        "sync_at_start": False,
        "backoff_initial": 10.0,
        "backoff_max": 80.0,
        **overrides,
    }
    return PolicyConfig(**fields)  # type: ignore[arg-type]


def up(policy: CallPolicy, now: float, transport: str = "dialup") -> None:
    policy.connect_started(now)
    policy.connected(transport, now)


def test_pending_request_keeps_the_call_up_and_idle_time_hangs_it_up() -> None:
    p = CallPolicy(config(), 0.0)
    p.request_started(0.0)
    up(p, 20.0)
    assert not p.should_hang_up(1000.0)  # still pending, however long
    p.request_finished(100.0)
    assert not p.should_hang_up(129.9)
    assert p.next_deadline() == 130.0
    assert p.should_hang_up(130.0)
    p.call_ended(130.0)
    assert p.state is CallState.IDLE
    assert not p.should_hang_up(10_000.0)


def test_activity_restarts_the_idle_timer() -> None:
    p = CallPolicy(config(idle_hangup=5.0), 0.0)
    up(p, 0.0)
    p.request_started(4.0)
    p.request_finished(4.5)
    assert not p.should_hang_up(9.0)
    assert p.should_hang_up(9.5)


def test_periodic_sync_is_due_on_schedule_and_after_each_good_sync() -> None:
    p = CallPolicy(config(sync_batch_window=0.0), 0.0)
    assert not p.sync_due(3599.0)
    assert p.next_deadline() == 3600.0
    assert p.sync_due(3600.0)
    p.sync_started(3600.0)
    assert not p.sync_due(3700.0)  # never two at once
    p.sync_finished(3610.0, ok=True)
    assert p.last_sync == 3610.0
    assert not p.sync_due(7209.0)
    assert p.sync_due(7210.0)


def test_sync_at_start() -> None:
    assert CallPolicy(config(sync_at_start=True), 5.0).sync_due(5.0)


def test_sync_due_soon_rides_on_a_call_that_is_up_anyway() -> None:
    p = CallPolicy(config(sync_batch_window=600.0), 0.0)
    assert not p.sync_due(3000.0)  # idle: wait for the schedule
    up(p, 3000.0)
    assert p.sync_due(3000.0)  # within 600 s of 3600: batched onto this call
    p2 = CallPolicy(config(sync_batch_window=600.0), 0.0)
    up(p2, 2000.0)
    assert not p2.sync_due(2000.0)  # too early even for batching
    assert p2.next_deadline() == 2030.0  # the idle hang-up comes first


def test_failed_connect_backs_off_doubling_up_to_the_cap() -> None:
    p = CallPolicy(config(), 0.0)
    waits = []
    now = 0.0
    for _ in range(5):
        assert p.may_connect(now)
        p.connect_started(now)
        waits.append(p.connect_failed(now))
        assert not p.may_connect(now)
        assert p.retry_after(now) == waits[-1]
        now += waits[-1]
    assert waits == [10.0, 20.0, 40.0, 80.0, 80.0]
    p.connect_started(now)
    p.connected("internet", now)
    assert p.failures == 0 and p.backoff_until is None


def test_central_retry_hint_lengthens_the_backoff() -> None:
    p = CallPolicy(config(), 0.0)
    p.connect_started(0.0)
    assert p.connect_failed(0.0, retry_after=300.0) == 300.0


def test_failed_sync_retries_after_the_backoff_not_at_once() -> None:
    p = CallPolicy(config(sync_at_start=True), 0.0)
    p.sync_started(0.0)
    p.connect_started(0.0)
    p.connect_failed(1.0)  # backoff until 11
    p.sync_finished(1.0, ok=False)
    assert not p.sync_due(10.9)
    assert p.sync_due(11.0)
    assert p.next_deadline() == 11.0


def test_no_deadline_while_connecting_even_with_a_sync_overdue() -> None:
    p = CallPolicy(config(sync_at_start=True), 0.0)
    p.connect_started(1.0)  # a request is connecting; the sync waits for its outcome
    assert not p.sync_due(5.0)
    assert p.next_deadline() is None
    p.connected("dialup", 6.0)
    assert p.sync_due(6.0)


def test_retry_after_has_a_floor() -> None:
    p = CallPolicy(config(backoff_initial=0.1, backoff_max=0.1), 0.0)
    assert p.retry_after(0.0) == MIN_RETRY_AFTER


def test_misuse_is_a_local_error_and_changes_nothing() -> None:
    p = CallPolicy(config(), 0.0)
    with pytest.raises(LocalProtocolError):
        p.request_finished(1.0)
    with pytest.raises(LocalProtocolError):
        p.connected("dialup", 1.0)
    with pytest.raises(LocalProtocolError):
        p.connect_failed(1.0)
    up(p, 1.0)
    with pytest.raises(LocalProtocolError):
        p.connect_started(2.0)
    assert p.state is CallState.UP and p.pending == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"order": ()},
        {"order": ("carrier-pigeon",)},
        {"order": ("dialup", "dialup")},
        {"idle_hangup": 0.0},
        {"sync_batch_window": 3600.0},
        {"backoff_max": 1.0},
        {"backoff_factor": 0.5},
    ],
)
def test_bad_config_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        config(**overrides)
