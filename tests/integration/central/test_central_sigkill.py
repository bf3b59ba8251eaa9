"""Central's storage under SIGKILL: admin commands and gateway requests killed mid-write.

A child process runs, in a tight loop, what writes central's storage: the
admin operations the ``optogate central`` commands call (a customer added, a
payment recorded) and the gateway protocol core that ``central run`` serves
(a usage batch stored, a sync that seals a fresh licence set into the blob
store and records it).  It prints a line for each operation only once the
call returned - that is the acknowledgement an operator or a gateway gets.
The test kills it with SIGKILL at a random moment, then checks what a
restarted central would find:

* the database opens (its owner lock is free, a crash's temporary files are
  removed) and parses;
* everything acknowledged is there, and exactly once (a usage batch sent
  again gets the same ack and stores nothing);
* no half-applied operation: every stored payment extended its licence and
  the licence's end is the sum of them; the audit log is contiguous;
* no reference to a missing or damaged blob.

The kill schedule comes from a seeded generator; a failing run names its
seed, and ``OPTOGATE_CRASH_SEED=<seed>`` replays it.  What a SIGKILL does not
show is a power cut's lost page cache (``tests/integration/store`` says why).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from crash_sweep import crash_seed, killed_writer, replaying

from central_stub.gateway import CentralService, GatewayConnection
from central_stub.repository import TinyRepository
from central_stub.testing import LICENCE_AFTER, TempCentral, make_central
from firmware.common.link import messages as m
from firmware.common.uplink import UsageRecord, auth_transcript, sign_usage_batch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Kills per run; each round also restarts from what the last one left.
ROUNDS = 6
#: The kill lands this long after the writer's first acknowledgement: long
#: enough for tens of operations, each a read, a change and a durable write.
KILL_WINDOW_S = (0.0, 0.5)
#: Days each recorded payment extends the licence by.
EXTEND_DAYS = 1
RECORDS_PER_BATCH = 3

# argv: root, round, now, seconds a payment extends by, records per usage batch.
# The operations cycle so that every kind of write is hit.
WRITER = r"""
import sys
from pathlib import Path
from central_stub import admin
from central_stub.gateway import CentralService, GatewayConnection
from central_stub.repository import TinyRepository
from firmware.common.crypto.keys import SigningKey
from firmware.common.link import messages as m
from firmware.common.uplink import UsageRecord, auth_transcript, sign_usage_batch

root, rnd, now = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
extend, records = int(sys.argv[4]), int(sys.argv[5])
repo = TinyRepository(root / "state")
key = SigningKey.load(root / "keys" / "central.key")
gw = root / "gateways" / "gw1"
outer = SigningKey.load(gw / "outer" / "signing.key")
inner = SigningKey.load(gw / "inner" / "signing.key")
(lic,) = repo.snapshot().list_licences("acme")
svc = CentralService(repo, key, sync_expiry=7 * 86400)
conn = GatewayConnection(svc, "sweep")
challenge = conn.handle(m.AuthBegin(gateway_id="gw1"), now)
proof = outer.sign(auth_transcript("gw1", challenge.nonce, key.key_id))
conn.handle(m.AuthProof(signature=proof), now)
print("ready", flush=True)
i = 0
while True:
    i += 1
    step = i % 4
    if step == 0:
        cid = f"c-{rnd}-{i}"
        admin.add_customer(repo, cid, "Customer " + cid, now=now, actor="sweep")
        print("customer", cid, flush=True)
    elif step == 1:
        pay, _ = admin.record_payment(
            repo, licence_id=lic.licence_id, amount_minor=100, currency="EUR",
            extend_seconds=extend, now=now, actor="sweep",
        )
        print("payment", pay.payment_id, flush=True)
    elif step == 2:
        bid = f"b-{rnd}-{i}"
        rec = UsageRecord(now, "echo", lic.licence_id, "00" * 32, 1)
        batch = sign_usage_batch(
            inner, gateway="gw1", batch_id=bid, created=now, records=[rec] * records
        )
        reply = conn.handle(m.UsageReport(batch=batch), now)
        assert isinstance(reply, m.UsageAck), reply
        print("usage", bid, batch.hex(), flush=True)
    else:
        reply = conn.handle(m.Sync(since_version=0), now)
        assert isinstance(reply, m.SyncData), reply
        print("sync", flush=True)
"""


def _table(repo: TinyRepository, name: str) -> list[dict[str, Any]]:
    """The documents of one table, read from the committed file."""
    data = json.loads(repo.path.read_bytes())
    return list(data.get(name, {}).values())


def _authed(central: TempCentral, svc: CentralService, now: int) -> GatewayConnection:
    conn = GatewayConnection(svc, "check")
    challenge = conn.handle(m.AuthBegin(gateway_id="gw1"), now)
    assert isinstance(challenge, m.AuthChallenge)
    proof = central.gateways["gw1"].outer.sign(
        auth_transcript("gw1", challenge.nonce, central.key.key_id)
    )
    assert isinstance(conn.handle(m.AuthProof(signature=proof), now), m.AuthOk)
    return conn


@pytest.mark.timeout(120)
def test_central_killed_mid_write_keeps_every_acknowledged_change(tmp_path: Path) -> None:
    seed = crash_seed()
    why = f"crash seed {seed} (replay: OPTOGATE_CRASH_SEED={seed})"
    rng = random.Random(seed)
    now = int(time.time())
    central = make_central(tmp_path, now=now)
    (licence,) = central.repo.snapshot().list_licences("acme")
    initial_until = licence.valid_until
    assert initial_until == now + LICENCE_AFTER
    customers: set[str] = set()
    payments: set[str] = set()
    batches: dict[str, bytes] = {}
    kinds_acked: set[str] = set()

    for rnd in range(ROUNDS):
        lines = killed_writer(
            [
                WRITER,
                *(str(a) for a in (tmp_path, rnd, now, EXTEND_DAYS * 86400, RECORDS_PER_BATCH)),
            ],
            tmp_path / "acks.log",
            rng.uniform(*KILL_WINDOW_S),
            why,
        )
        for line in lines:
            kind, *rest = line.split()
            kinds_acked.add(kind)
            if kind == "customer":
                customers.add(rest[0])
            elif kind == "payment":
                payments.add(rest[0])
            elif kind == "usage":
                batches[rest[0]] = bytes.fromhex(rest[1])

        # What a restarted central finds.
        with replaying(why):
            _check_round(central, initial_until, customers, payments, batches, why)

    # Every kind of write was acknowledged at least once across the rounds.
    assert kinds_acked == {"customer", "payment", "usage", "sync"}, why
    with replaying(why):
        _check_exactly_once(central, batches, now, why)


def _check_round(
    central: TempCentral,
    initial_until: int,
    customers: set[str],
    payments: set[str],
    batches: dict[str, bytes],
    why: str,
) -> None:
    state = central.config.state_dir
    (licence,) = central.repo.snapshot().list_licences("acme")
    repo = TinyRepository(state, lock_timeout=0.0)
    with repo.transaction():  # the dead writer's lock is free; its debris goes
        pass
    assert not list(state.glob(".central.json.*.tmp")), why
    view = repo.snapshot()
    stored_customers = {c.customer_id for c in view.list_customers()}
    assert customers <= stored_customers, why
    stored_payments = view.list_payments(licence.licence_id)
    ids = [p.payment_id for p in stored_payments]
    assert len(ids) == len(set(ids)), why
    assert payments <= set(ids), why
    # Each payment and its licence extension were one commit.
    lic = view.get_licence(licence.licence_id)
    assert lic is not None
    assert lic.valid_until == initial_until + len(ids) * EXTEND_DAYS * 86400, why
    usage_batches = [d["batch_id"] for d in _table(repo, "usage_batches")]
    assert len(usage_batches) == len(set(usage_batches)), why
    assert set(batches) <= set(usage_batches), why
    rows = view.list_usage("acme", 0, 2**62)
    for batch_id in usage_batches:
        assert sum(r.batch_id == batch_id for r in rows) == RECORDS_PER_BATCH, why
    audit = view.list_audit()
    assert [e.seq for e in audit] == list(range(1, len(audit) + 1)), why
    assert view.get_counter("audit") == len(audit), why
    for ref in _table(repo, "sealed"):
        repo.blobs.get(ref["blob"])  # present and undamaged, or StorageError


def _check_exactly_once(
    central: TempCentral, batches: dict[str, bytes], now: int, why: str
) -> None:
    state = central.config.state_dir
    (licence,) = central.repo.snapshot().list_licences("acme")
    # A batch acknowledged before a kill, sent again, is acknowledged again
    # and stored nothing: usage reaches central exactly once.
    repo = TinyRepository(state)
    rows_before = len(repo.snapshot().list_usage("acme", 0, 2**62))
    conn = _authed(central, CentralService(repo, central.key, sync_expiry=7 * 86400), now)
    for batch_id, data in batches.items():
        reply = conn.handle(m.UsageReport(batch=data), now)
        assert isinstance(reply, m.UsageAck) and reply.batch_id == batch_id, why
    assert len(repo.snapshot().list_usage("acme", 0, 2**62)) == rows_before, why
    # And central still takes new writes on the state the kills left.
    fresh = sign_usage_batch(
        central.gateways["gw1"].inner_signing,
        gateway="gw1",
        batch_id="after-the-kills",
        created=now,
        records=[UsageRecord(now, "echo", licence.licence_id, "00" * 32, 1)],
    )
    assert isinstance(conn.handle(m.UsageReport(batch=fresh), now), m.UsageAck)
