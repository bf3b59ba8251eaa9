"""The service builder in a real daemon: single flight, version swaps, refused objects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from inner_testbed import GW, Bed, algo_bundle

from firmware.common.crypto.freshness import object_name
from firmware.common.crypto.sealed import Kind

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
    assert "UnlistedObject" in bed.daemon.events("sync_failed")[-1]
    held = _held_version(bed)
    assert bed.peer.since_versions[-2:] == [held, 0]  # asked again for the whole set
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


def _held_version(bed: Bed, kind: Kind = Kind.LICENCE_SET) -> int:
    return bed.daemon.daemon.trust.verifier.registry.highest(object_name(kind, GW))


async def test_a_sync_names_the_licence_set_held_and_an_unchanged_set_is_not_resent(
    bed: Bed,
) -> None:
    assert (await call(bed, {})).status_code == 200
    held = _held_version(bed)
    assert held > 0
    assert await bed.daemon.daemon.sync_now()
    # the inner module named the set it holds; the answer listed it and did not resend it
    assert bed.peer.since_versions[-1] == held
    assert _held_version(bed) == held
    assert (await call(bed, {})).status_code == 200
    # a changed set is sent whole and applied
    bed.peer.revoke("L-1")
    assert await bed.daemon.daemon.sync_now()
    assert bed.peer.since_versions[-1] == held
    assert _held_version(bed) > held
    assert (await call(bed, {})).status_code == 403


async def test_a_new_licence_set_is_not_mistaken_for_the_held_metadata_version(
    bed: Bed,
) -> None:
    """Central's sync metadata and licence set versions are both millisecond clocks.

    The set a payment makes can carry the very number of the metadata the
    gateway holds; the sync must still fetch it.
    """
    now = int(time.time())
    bed.peer._meta_version = 1000  # well above the set versions so far
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=now - 5)
    assert await bed.daemon.daemon.sync_now()
    assert (await call(bed, {})).status_code == 402
    held_meta = _held_version(bed, Kind.SYNC_METADATA)
    assert held_meta > 1000
    # the payment's set gets the held metadata's number
    bed.peer._set_version = held_meta - 1
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=now + 3600)
    assert await bed.daemon.daemon.sync_now(), bed.daemon.events("sync_failed")
    assert _held_version(bed) == held_meta
    assert (await call(bed, {})).status_code == 200


async def test_an_upstream_claiming_the_set_unchanged_is_asked_for_it_again(bed: Bed) -> None:
    assert (await call(bed, {})).status_code == 200
    held = _held_version(bed)
    bed.peer.revoke("L-1")
    # the upstream answers "unchanged" although the metadata lists a newer set
    bed.peer.tamper = "claim-unchanged"
    assert await bed.daemon.daemon.sync_now()
    # the lean answer did not fit what is held: asked again for the whole set
    assert bed.peer.since_versions[-2:] == [held, 0]
    assert _held_version(bed) > held
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
