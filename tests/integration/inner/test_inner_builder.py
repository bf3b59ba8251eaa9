"""The service builder in a real daemon: single flight, version swaps, refused objects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from inner_testbed import Bed, algo_bundle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def call(bed: Bed, params: dict[str, object], service: str = "algo") -> httpx.Response:
    return await bed.http.post(
        f"/v1/services/{service}/call",
        content=b"",
        headers={
            **bed.auth(),
            "Content-Type": "application/octet-stream",
            "Optogate-Params": json.dumps(params),
        },
    )


async def test_concurrent_first_calls_cause_one_fetch(bed: Bed) -> None:
    bed.peer.fetch_delay = 0.5  # all calls arrive while the fetch is running
    answers = await asyncio.gather(*(call(bed, {"text": str(i)}) for i in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert bed.peer.counts["fetch"] == 1
    assert bed.daemon.daemon.builder.stats["builds"] == 1


async def test_newer_version_swaps_without_failing_calls_in_flight(bed: Bed) -> None:
    r = await call(bed, {})
    assert json.loads(r.headers["Optogate-Result"])["version"] == 1
    slow = [asyncio.ensure_future(call(bed, {"mode": "sleep", "seconds": 1.0})) for _ in range(3)]
    await asyncio.sleep(0.2)
    bed.peer.publish(algo_bundle("algo", 2))
    assert await bed.daemon.daemon.sync_now()  # metadata lists v2: background upgrade
    builder = bed.daemon.daemon.builder
    await bed.daemon.wait_for(lambda: builder.loaded["algo"].version == 2, timeout=20)
    answers = await asyncio.gather(*slow)
    assert [r.status_code for r in answers] == [200, 200, 200]
    # the calls that started on v1 finished on v1; new calls run v2
    assert {json.loads(r.headers["Optogate-Result"])["version"] for r in answers} == {1}
    r = await call(bed, {})
    assert json.loads(r.headers["Optogate-Result"])["version"] == 2
    assert builder.stats["swaps"] == 1
    # only v2 stays on disk
    assert [p.name for p in (bed.gw.state / "services" / "algo").glob("v*")] == ["v2"]


@pytest.mark.parametrize("tamper", ["bundle-bit", "wrong-recipient"])
async def test_tampered_or_misaddressed_bundles_are_refused(bed: Bed, tamper: str) -> None:
    bed.peer.tamper = tamper
    r = await call(bed, {})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable"
    assert "Retry-After" in r.headers
    assert "algo" not in bed.daemon.daemon.builder.loaded
    assert not (bed.gw.state / "services" / "algo").exists()
    # within the backoff no new fetch is made
    fetches = bed.peer.counts["fetch"]
    again = await call(bed, {})
    assert again.status_code == 503
    # the backoff's refusal says why in words, naming no internal class
    assert (
        again.json()["error"]["message"]
        == "service algo is not available: its bundle did not verify"
    )
    assert bed.peer.counts["fetch"] == fetches
    assert bed.daemon.events("build_failed")


async def test_rolled_back_bundle_and_metadata_are_refused(bed: Bed) -> None:
    old_bundle = bed.peer.sealed_bundle("algo")  # v1, as central once sealed it
    old_meta = bed.peer.metadata()
    bed.peer.publish(algo_bundle("algo", 3))
    assert await bed.daemon.daemon.sync_now()
    assert (await call(bed, {})).status_code == 200  # v3 built
    # a hostile upstream replays old metadata: refused, state unchanged
    bed.peer.replay_metadata = old_meta
    assert not await bed.daemon.daemon.sync_now()
    assert "RollbackError" in bed.daemon.events("sync_failed")[-1]
    bed.peer.replay_metadata = b""
    # the service store is lost; the upstream answers the fetch with the old v1
    await bed.daemon.stop()
    import shutil

    shutil.rmtree(bed.gw.state / "services" / "algo")
    bed.peer.replay_bundle = old_bundle
    from inner_testbed import DaemonRunner

    bed.daemon = DaemonRunner(bed.gw)
    await bed.daemon.start()
    await bed.daemon.wait_for(lambda: bed.peer.counts["sync"] >= 4)
    r = await call(bed, {})
    assert r.status_code == 503
    assert "algo" not in bed.daemon.daemon.builder.loaded
    assert bed.daemon.events("build_failed")
    # with the real v3 on offer (after the backoff) it builds again
    bed.peer.replay_bundle = b""
    await asyncio.sleep(2.1)
    r = await call(bed, {})
    assert r.status_code == 200
    assert json.loads(r.headers["Optogate-Result"])["version"] == 3


async def test_revocation_removes_the_built_service(bed: Bed) -> None:
    assert (await call(bed, {})).status_code == 200
    assert (bed.gw.state / "services" / "algo" / "current.json").exists()
    bed.peer.revoke("L-1")
    assert await bed.daemon.daemon.sync_now()
    assert "algo" not in bed.daemon.daemon.builder.loaded
    assert not (bed.gw.state / "services" / "algo").exists()
    assert (await call(bed, {})).status_code == 403


async def test_a_revocation_stripped_from_the_sync_cannot_be_outlived(bed: Bed) -> None:
    assert (await call(bed, {})).status_code == 200
    bed.peer.revoke("L-1")
    # the upstream relays central's fresh metadata but not the set it lists
    bed.peer.tamper = "strip-licences"
    assert not await bed.daemon.daemon.sync_now()
    assert "InvalidObject" in bed.daemon.events("sync_failed")[-1]
    trust = bed.daemon.daemon.trust
    # nothing was adopted: the old set under the metadata that listed it,
    # which expires on its own time (the bound on any withheld sync)
    assert not trust.licences.revoked
    assert trust.verifier.metadata is not None
    assert (await call(bed, {})).status_code == 200
    # a restart finds the same consistent pair on disk and serves on
    await bed.daemon.stop()
    from inner_testbed import DaemonRunner

    bed.daemon = DaemonRunner(bed.gw)
    await bed.daemon.start()
    assert (await call(bed, {})).status_code == 200
    # the whole sync applies the revocation
    bed.peer.tamper = ""
    assert await bed.daemon.daemon.sync_now()
    assert (await call(bed, {})).status_code == 403


async def test_expiry_removes_the_service_and_payment_rebuilds_it(bed: Bed) -> None:
    assert (await call(bed, {})).status_code == 200
    now = int(time.time())
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=now - 5)
    assert await bed.daemon.daemon.sync_now()
    assert "algo" not in bed.daemon.daemon.builder.loaded
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=now + 3600)
    await asyncio.sleep(2.1)
    r = await call(bed, {})
    assert r.status_code == 200
    assert bed.peer.counts["fetch"] == 2


async def test_built_services_survive_a_restart_without_fetching(bed: Bed) -> None:
    assert (await call(bed, {})).status_code == 200
    await bed.daemon.stop()
    from inner_testbed import DaemonRunner

    again = DaemonRunner(bed.gw)
    bed.daemon = again
    await again.start()
    assert "algo" in again.daemon.builder.loaded
    fetches = bed.peer.counts["fetch"]
    assert (await call(bed, {})).status_code == 200
    assert bed.peer.counts["fetch"] == fetches


async def test_a_long_build_answers_503_and_goes_on(bed: Bed) -> None:
    from firmware.inner.config import LinkConfig

    api = bed.daemon.daemon.api
    api._link = LinkConfig(**{**vars(api._link), "build_wait_s": 0.3})
    bed.peer.fetch_delay = 1.5
    r = await call(bed, {})
    assert r.status_code == 503
    assert "being built" in r.json()["error"]["message"]
    assert int(r.headers["Retry-After"]) >= 1
    builder = bed.daemon.daemon.builder
    await bed.daemon.wait_for(lambda: "algo" in builder.loaded)
    assert (await call(bed, {})).status_code == 200
    assert bed.peer.counts["fetch"] == 1
