"""Metering: durable records, signed batches, acks, and exactly-once across kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import httpx
import pytest
from inner_testbed import (
    Bed,
    CentralPeer,
    DaemonProcess,
    algo_bundle,
    free_port,
    generate_api_key,
    provisioned,
    ssl_context,
)

pytestmark = [pytest.mark.integration]


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Return once ``cond()`` holds; raise TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.05)


async def call(http: httpx.AsyncClient, key: str, params: dict[str, object]) -> httpx.Response:
    return await http.post(
        "/v1/services/algo/call",
        content=b"abc",
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/octet-stream",
            "Optogate-Params": json.dumps(params),
        },
    )


@pytest.mark.timeout(60)
async def test_records_are_shipped_signed_and_dropped_only_after_a_signed_ack(bed: Bed) -> None:
    for _ in range(5):
        assert (await call(bed.http, bed.key.secret, {})).status_code == 200
    assert (await call(bed.http, bed.key.secret, {"mode": "refuse"})).status_code == 422
    daemon = bed.daemon.daemon
    # an ack without central's signature does not drop anything
    bed.peer.tamper = "no-ack-signature"
    await daemon.ship_usage()
    assert daemon.journal.queued()["batches"] == 1
    assert "InvalidAck" in bed.daemon.events("usage_ship_failed")[-1]
    # no ack at all: kept, resent later with the same id and bytes
    bed.peer.tamper = ""
    bed.peer.ack_usage = False
    await daemon.ship_usage()
    assert daemon.journal.queued()["batches"] == 1
    bed.peer.ack_usage = True
    await daemon.ship_usage()
    assert daemon.journal.queued() == {"entries": 0, "batches": 0}
    assert len(set(bed.peer.batch_sends)) == 1
    assert len(bed.peer.batch_sends) == 3
    records = bed.peer.records()
    assert len(records) == 6
    assert sorted(r.units for r in records) == [0, 1, 1, 1, 1, 1]
    assert {r.licence for r in records} == {"L-1"}
    assert {r.credential for r in records} == {bed.key.key_hash}


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_exactly_once_across_kill_9() -> None:
    link_port = free_port()
    with provisioned(link_port) as gw:
        peer = CentralPeer(gw)
        key = generate_api_key()
        peer.publish(algo_bundle("algo", 1))
        peer.grant("algo", key, lic_id="L-1")
        await peer.start(link_port)
        daemon = DaemonProcess(gw)
        try:
            async with httpx.AsyncClient(
                base_url=daemon.url, verify=ssl_context(gw), timeout=10
            ) as http:
                # 1: twenty answered calls, then kill -9
                await daemon.start()
                for _ in range(20):
                    assert (await call(http, key.secret, {})).status_code == 200
                await daemon.kill()
                # 2: the restart batches them and ships; central does not ack
                peer.ack_usage = False
                await daemon.start()
                for _ in range(10):
                    assert (await call(http, key.secret, {})).status_code == 200
                await until(lambda: bool(peer.batch_sends))  # the restart's catch-up
                # 3: kill -9 in the middle of a burst of calls
                burst = [asyncio.ensure_future(call(http, key.secret, {})) for _ in range(40)]
                await asyncio.wait(burst[:10])
                await daemon.kill()
                answered = 0
                for f in burst:
                    with contextlib.suppress(httpx.HTTPError):
                        answered += (await f).status_code == 200
                # 4: restart with acks: everything queued goes, once
                peer.ack_usage = True
                await daemon.start()
                await asyncio.sleep(0.5)
                deadline = asyncio.get_running_loop().time() + 20
                while list((gw.state / "usage").glob("batch-*")):
                    assert asyncio.get_running_loop().time() < deadline, "batches not acked"
                    await asyncio.sleep(0.1)
                assert await daemon.terminate() == 0
        finally:
            with contextlib.suppress(Exception):
                await daemon.terminate()
            await peer.stop()
        records = peer.records()
        # nothing answered is lost; nothing is counted twice (at most the
        # calls killed between their record and their answer are extra)
        assert 30 + answered <= len(records) <= 30 + 40
        assert len(peer.batch_sends) > len(peer.batches)  # there were resends...
        assert all(r.units == 1 for r in records)  # ...stored once per batch id
        assert not list((gw.state / "usage").glob("seg-*.log"))[1:]
