"""The LAN API of a real inner daemon, over TLS, with a real peer on the link."""

from __future__ import annotations

import asyncio
import json
import ssl

import cbor2
import httpx
import pytest
from inner_testbed import Bed, algo_bundle, generate_api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def call(bed: Bed, params: dict[str, object], data: bytes = b"", service: str = "algo"):
    return await bed.http.post(
        f"/v1/services/{service}/call",
        content=data,
        headers={
            **bed.auth(),
            "Content-Type": "application/octet-stream",
            "Optogate-Params": json.dumps(params),
        },
    )


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


async def test_health_needs_no_key_and_says_little(bed: Bed) -> None:
    r = await bed.http.get("/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["link"] == "up"
    assert "acme" not in r.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/auth"),
        ("GET", "/v1/services"),
        ("POST", "/v1/services/algo/call"),
        ("GET", "/metrics"),
        ("GET", "/no/such/path"),
        ("GET", "/v1/health/../services"),
    ],
)
async def test_nothing_but_health_answers_without_a_key(bed: Bed, method: str, path: str) -> None:
    r = await bed.http.request(method, path)
    assert r.status_code == 401
    assert error_code(r) == "unauthorized"


async def test_wrong_keys_are_401(bed: Bed) -> None:
    for header in (
        "Bearer og_live_" + "a" * 52,  # well formed, unknown
        "Bearer nonsense",
        "Basic " + bed.key.secret,
        bed.key.secret,
    ):
        r = await bed.http.post("/v1/auth", headers={"Authorization": header})
        assert r.status_code == 401, header
        if r.status_code == 429:
            break


async def test_auth_answers_customer_and_services(bed: Bed) -> None:
    r = await bed.http.post("/v1/auth", headers=bed.auth())
    assert r.status_code == 200
    body = r.json()
    assert body["customer"] == "acme"
    assert [s["service"] for s in body["services"]] == ["algo"]
    assert body["services"][0]["valid_until"].endswith("Z")


async def test_services_lists_built_state(bed: Bed) -> None:
    r = await bed.http.get("/v1/services", headers=bed.auth())
    assert r.status_code == 200
    (svc,) = r.json()["services"]
    assert svc["service"] == "algo"
    assert svc["built"] is False
    assert (await call(bed, {"text": "x"})).status_code == 200
    r = await bed.http.get("/v1/services", headers=bed.auth())
    (svc,) = r.json()["services"]
    assert svc["built"] is True
    assert svc["version"] == 1


async def test_call_in_three_forms(bed: Bed) -> None:
    blob = bytes(range(256)) * 10
    r = await call(bed, {"text": "héllo"}, blob)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.content == blob
    assert json.loads(r.headers["Optogate-Result"])["params"] == {"text": "héllo"}

    r = await bed.http.post(
        "/v1/services/algo/call",
        content=cbor2.dumps({"params": {"text": "c"}, "data": blob}),
        headers={**bed.auth(), "Content-Type": "application/cbor"},
    )
    assert r.status_code == 200
    doc = cbor2.loads(r.content)
    assert doc["data"] == blob
    assert doc["result"]["params"] == {"text": "c"}

    r = await bed.http.post("/v1/services/algo/call", json={"text": "j"}, headers=bed.auth())
    assert r.status_code == 200
    assert r.json() == {"result": {"params": {"text": "j"}, "version": 1}}


async def test_metrics_are_prometheus_text(bed: Bed) -> None:
    assert (await call(bed, {})).status_code == 200
    r = await bed.http.get("/metrics", headers=bed.auth())
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'optogate_inner_calls_total{outcome="ok",service="algo"} 1' in text
    assert "optogate_inner_link_up 1" in text
    assert bed.key.secret not in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2


async def test_error_classes(bed: Bed) -> None:
    # 404: unknown service (valid key)
    r = await call(bed, {}, service="nope")
    assert (r.status_code, error_code(r)) == (404, "not_found")
    r = await bed.http.get("/no/such/path", headers=bed.auth())
    assert (r.status_code, error_code(r)) == (404, "not_found")
    # 400: malformed JSON, invalid UTF-8, bad CBOR, bad params header
    r = await bed.http.post(
        "/v1/services/algo/call",
        content=b"{not json",
        headers={**bed.auth(), "Content-Type": "application/json"},
    )
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    r = await bed.http.post(
        "/v1/services/algo/call",
        content=b'{"text": "\xff\xfe"}',
        headers={**bed.auth(), "Content-Type": "application/json"},
    )
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    r = await bed.http.post(
        "/v1/services/algo/call",
        content=b"\xff\x00",
        headers={**bed.auth(), "Content-Type": "application/cbor"},
    )
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    r = await bed.http.post(
        "/v1/services/algo/call",
        content=b"",
        headers={**bed.auth(), "Content-Type": "application/octet-stream", "Optogate-Params": "{"},
    )
    assert (r.status_code, error_code(r)) == (400, "bad_request")
    # 415
    r = await bed.http.post(
        "/v1/services/algo/call",
        content=b"x",
        headers={**bed.auth(), "Content-Type": "text/plain"},
    )
    assert (r.status_code, error_code(r)) == (415, "unsupported_media_type")
    # 413: body over the configured 1 MiB
    r = await call(bed, {}, b"x" * (1024 * 1024 + 1))
    assert (r.status_code, error_code(r)) == (413, "too_large")
    # 413: headers over 8 KiB
    r = await bed.http.post("/v1/auth", headers={**bed.auth(), "X-Filler": "y" * 9000})
    assert (r.status_code, error_code(r)) == (413, "too_large")
    # 422: schema, and the algorithm's own refusal
    r = await call(bed, {"mode": "fly"})
    assert (r.status_code, error_code(r)) == (422, "invalid_params")
    r = await call(bed, {"mode": "refuse"})
    assert (r.status_code, error_code(r)) == (422, "invalid_params")
    assert "line 12" in r.json()["error"]["message"]
    # 500: the algorithm crashed; nothing of it leaks
    r = await call(bed, {"mode": "crash"})
    assert (r.status_code, error_code(r)) == (500, "algorithm_crashed")
    assert "secret" not in r.text
    # still serving
    assert (await call(bed, {})).status_code == 200


async def test_timeout_is_504(bed: Bed) -> None:
    bed.peer.publish(algo_bundle("slow", 1, timeout_s=0.5))
    bed.peer.grant("slow", bed.key, lic_id="L-slow")
    assert await bed.daemon.daemon.sync_now()
    r = await call(bed, {"mode": "hang"}, service="slow")
    assert (r.status_code, error_code(r)) == (504, "algorithm_timeout")
    assert (await call(bed, {}, service="slow")).status_code == 200


async def test_forbidden_and_revoked_are_403(bed: Bed) -> None:
    other = generate_api_key()
    bed.peer.publish(algo_bundle("other", 1))
    bed.peer.grant("other", other, lic_id="L-other")
    assert await bed.daemon.daemon.sync_now()
    r = await call(bed, {}, service="other")  # known service, not this key's
    assert (r.status_code, error_code(r)) == (403, "forbidden")
    bed.peer.revoke("L-1")
    assert await bed.daemon.daemon.sync_now()
    r = await call(bed, {})
    assert (r.status_code, error_code(r)) == (403, "forbidden")
    assert "revoked" in r.json()["error"]["message"]


async def test_too_many_failures_is_429_with_retry_after(bed: Bed) -> None:
    bad = {"Authorization": "Bearer og_live_" + "b" * 52}
    codes = [(await bed.http.post("/v1/auth", headers=bad)).status_code for _ in range(6)]
    assert codes[:5] == [401] * 5
    assert codes[5] == 429
    r = await bed.http.post("/v1/auth", headers=bed.auth())  # even a good key, from there
    assert r.status_code == 429
    assert error_code(r) == "too_many_failures"
    assert int(r.headers["Retry-After"]) > 0
    assert (await bed.http.get("/v1/health")).status_code == 200


async def test_payment_required_then_pay_and_call_again(bed: Bed) -> None:
    import time

    now = int(time.time())
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=now - 10)
    assert await bed.daemon.daemon.sync_now()
    syncs = bed.peer.counts.get("sync", 0)
    await asyncio.sleep(2.1)  # past the refresh's burst guard
    r = await call(bed, {})
    assert (r.status_code, error_code(r)) == (402, "payment_required")
    err = r.json()["error"]
    assert err["licence"] == "L-1"
    assert err["renew"] == {"service": "algo", "customer": "acme"}
    assert err["valid_until"].endswith("Z")
    assert bed.peer.counts["sync"] >= syncs + 1  # it asked central before refusing
    # the customer pays: central extends the licence; the next call works at once
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=now + 3600)
    await asyncio.sleep(2.1)
    r = await call(bed, {})
    assert r.status_code == 200, r.text


async def test_tls_below_1_3_is_refused(bed: Bed) -> None:
    ctx = ssl.create_default_context(cafile=str(bed.gw.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with httpx.AsyncClient(base_url=bed.daemon.url, verify=ctx) as old:
        with pytest.raises(httpx.ConnectError):
            await old.get("/v1/health")


async def test_secrets_never_reach_the_log(bed: Bed) -> None:
    await call(bed, {"text": "password123"})
    await bed.http.post("/v1/auth", headers={"Authorization": "Bearer og_live_" + "c" * 52})
    log = bed.daemon.out.getvalue()
    assert bed.key.secret not in log
    assert "c" * 52 not in log
    assert "password123" not in log
