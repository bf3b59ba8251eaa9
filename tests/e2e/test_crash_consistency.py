"""SIGKILL at random moments on each daemon of a working appliance; state consistent after.

One appliance (internet path) serves a stream of calls while, round after
round, the inner module is SIGKILLed and started again (its usage journal is
written before every answer; its restart syncs and ships usage through the
outer module to central), then the outer module or central is SIGKILLed
while that traffic is likely in flight (the outer writes its cache of
sealed objects, central seals and stores licence sets and usage batches),
and an operator's ``central payment record`` is SIGKILLed at a random point
of its run.  Every process must start again; at the end, with everything
stopped, each daemon's stores must open and parse and hold what was
acknowledged:

* central: every payment whose command succeeded is there, each with its
  licence extension (nothing half applied); every sealed object it names is
  whole; usage batch ids are unique;
* usage: every call that was answered is billed exactly once - no fewer
  units at central than answered calls, no more than calls attempted;
* the outer module's cache index parses and every object it names is whole;
* the inner module's services, trusted time and version registry load.

Where the kills land is drawn from a seeded generator: a failing run names
its seed, and ``OPTOGATE_CRASH_SEED=<seed>`` replays the schedule (the
daemons' own timing still varies).  The single-daemon sweeps in
``tests/integration/*/test_*_sigkill.py`` land many more kills inside writes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_sweep import crash_seed, replaying

from central_stub.repository import TinyRepository
from firmware.common.crypto.freshness import load_registry
from firmware.inner.services import ServiceStore
from firmware.inner.trusted_time import TrustedTimeStore
from firmware.outer.cache import SealedCache, digest_of
from host_tools.client import Client, GatewayError
from host_tools.demo import (
    Appliance,
    appliance,
    free_port,
    optogate_argv,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Start (~15 s), four rounds of kills (~30 s), the last shipment, stop.
BOUND_S = 240
ROUNDS = 4
#: Calls run this long between kills.
CALLS_S = (0.3, 1.5)
#: The second kill of a round lands this long after the inner module is back:
#: its catch-up (sync, usage) is then crossing the outer module and central.
AFTER_RESTART_S = (0.0, 1.0)
#: ``central payment record`` takes half a second to two (imports, one write)
#: while the appliance keeps the machine busy: some are killed, some finish.
ADMIN_KILL_S = (0.2, 2.5)
EXTEND_S = 86400
#: How long the last usage may take to reach central after the inner restarts.
SHIP_S = 90.0
#: Pause between two calls.  Unpaced, the caller's volume follows the API's
#: speed (6,800 calls in one run), and shipping that many records across the
#: 115200-baud link at the end takes longer than SHIP_S; paced, a run makes
#: some 2,000-3,000, and a kill still often lands on a call in flight.
CALL_PAUSE_S = 0.01

_PAYMENT_RE = re.compile(r"^payment (\S+) recorded", re.MULTILINE)


class Caller:
    """Calls ``echo`` in a thread, CALL_PAUSE_S apart; counts answers and failed attempts."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.answered = 0
        self.failed = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-caller")

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the caller did not stop"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self._calls()
        except BaseException as e:  # reaches the test through __exit__
            self.error = e

    def _calls(self) -> None:
        while not self._stop.is_set():
            try:
                with Client(self.app.url, self.app.api_key, self.app.ca_file, max_wait=0) as gw:
                    while not self._stop.is_set():
                        data = gw.call("echo", {"n": self.answered}, b"x").data
                        if data != b"x":
                            raise AssertionError(f"echo answered {data!r}")
                        self.answered += 1
                        self._stop.wait(CALL_PAUSE_S)
            except GatewayError:
                # The inner module died under the call, or is starting: the
                # call may or may not have been journaled before it died.
                self.failed += 1
                self._stop.wait(0.1)


def _kill_and_restart(app: Appliance, name: str) -> None:
    sup = app.supervisor
    assert sup is not None
    sup.kill(name)
    assert sup.wait_exit(name, 10) == -signal.SIGKILL
    sup.restart(name)  # raises LaunchError unless it starts and reports ready


def _payment(app: Appliance, licence: str, kill_after: float) -> str | None:
    """Run ``central payment record``, SIGKILL it after ``kill_after`` s; its payment id if it
    succeeded first."""
    argv = optogate_argv(
        "central", "--config", str(app.central_config), "payment", "record",
        "--licence", licence, "--amount", "1.00", "--extend", f"{EXTEND_S // 3600}h",
    )  # fmt: skip
    with subprocess.Popen(
        argv, cwd=app.state_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None
    if proc.returncode != 0:
        return None
    match = _PAYMENT_RE.search(out)
    assert match is not None, out
    return match.group(1)


def _units_at_central(state: Path) -> int:
    view = TinyRepository(state / "central").snapshot()
    return sum(r.units for r in view.list_usage("demo", 0, 2**62) if r.service == "echo")


@pytest.fixture
def state() -> Iterator[Path]:
    """An appliance directory kept past the appliance's stop (for the checks), then removed.

    Not below pytest's tmp_path: the inner module's unprivileged algorithm
    workers must be able to reach the installed services.
    """
    directory = Path(tempfile.mkdtemp(prefix="optogate-crash-"))  # the demo opens it to 0755
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(BOUND_S)
def test_sigkill_each_daemon_at_random_moments_keeps_state_consistent(state: Path) -> None:
    seed = crash_seed()
    why = f"crash seed {seed} (replay: OPTOGATE_CRASH_SEED={seed})"
    rng = random.Random(seed)
    payments: list[str] = []
    # A port of its own: another appliance on this machine may hold the usual one.
    port = free_port()
    with (
        replaying(why),
        appliance(state, internet=True, expiring_after_s=None, api_port=port) as app,
    ):
        sup = app.supervisor
        assert sup is not None
        licence = app.licences["dxf2svg"]
        (before,) = [
            lic
            for lic in TinyRepository(state / "central").snapshot().list_licences("demo")
            if lic.licence_id == licence
        ]
        with Client(app.url, app.api_key, app.ca_file, max_wait=120, timeout=300) as gw:
            gw.call("echo", {}, b"built")  # built once: later calls need no fetch
        warm = 1
        with Caller(app) as caller:
            for _ in range(ROUNDS):
                time.sleep(rng.uniform(*CALLS_S))
                _kill_and_restart(app, "inner")
                time.sleep(rng.uniform(*AFTER_RESTART_S))
                _kill_and_restart(app, rng.choice(["outer", "central"]))
                paid = _payment(app, licence, rng.uniform(*ADMIN_KILL_S))
                if paid is not None:
                    payments.append(paid)
        answered, attempted = caller.answered + warm, caller.answered + warm + caller.failed
        assert caller.answered > 0, why
        # A last restart of the inner module ships what its journal holds.
        sup.stop("inner")
        sup.restart("inner")
        usage = state / "inner" / "usage"
        deadline = time.monotonic() + SHIP_S
        while list(usage.glob("batch-*.cbor")) or _units_at_central(state) < answered:
            assert time.monotonic() < deadline, (
                f"usage never reached central: {_units_at_central(state)} of {answered}"
                f" answered calls; {why}"
            )
            time.sleep(0.2)
        # Every death was one of this test's kills: nothing died on its own.
        assert len(sup.deaths) == 2 * ROUNDS, ([(d.name, d.exit_code) for d in sup.deaths], why)
        assert all(d.exit_code == -signal.SIGKILL for d in sup.deaths), why
    # Everything is stopped now: open each daemon's state as a restart would.
    with replaying(why):
        _check_central(state, licence, before.valid_until, payments, answered, attempted, why)
        _check_outer(state, why)
        _check_inner(state, why)


def _check_central(
    state: Path,
    licence: str,
    until_before: int,
    payments: list[str],
    answered: int,
    attempted: int,
    why: str,
) -> None:
    repo = TinyRepository(state / "central", lock_timeout=0.0)
    with repo.transaction():  # opens: the lock is free, the file parses
        pass
    view = repo.snapshot()
    stored = view.list_payments(licence)
    assert set(payments) <= {p.payment_id for p in stored}, why
    lic = view.get_licence(licence)
    assert lic is not None
    # Each stored payment came with its extension, none without.
    assert lic.valid_until == until_before + len(stored) * EXTEND_S, why
    raw = json.loads((state / "central" / "central.json").read_bytes())
    for ref in raw.get("sealed", {}).values():
        repo.blobs.get(ref["blob"])  # whole, or StorageError
    batch_ids = [b["batch_id"] for b in raw.get("usage_batches", {}).values()]
    assert len(batch_ids) == len(set(batch_ids)), why
    units = _units_at_central(state)
    # Billed exactly once: every answered call, and nothing but attempted calls.
    assert answered <= units <= attempted, (units, answered, attempted, why)


def _check_outer(state: Path, why: str) -> None:
    directory = state / "outer" / "cache"
    cache = SealedCache(directory)
    cache.load()
    assert cache.counters["index_invalid"] == 0, why
    named = [e.bundle for e in cache.services.values() if e.bundle is not None]
    if cache.licence is not None:
        named.append(cache.licence.digest)
    if cache.sync is not None:
        named += [d for d in (cache.sync.sealed, cache.sync.licences) if d is not None]
    assert cache.sync is not None, why  # the inner module's syncs went through it
    for digest in named:
        data = cache.read(digest)
        assert data is not None and digest_of(data) == digest, why


def _check_inner(state: Path, why: str) -> None:
    inner = state / "inner"
    assert "echo" in {s.name for s in ServiceStore(inner / "services").installed()}, why
    assert TrustedTimeStore(inner / "trust" / "time.json").load() is not None, why
    load_registry(inner / "trust" / "versions.json")  # parses, or RegistryCorrupt
    assert not list((inner / "usage").glob("batch-*.cbor")), why
