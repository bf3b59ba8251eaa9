"""The running server against firmware/inner/openapi.yaml: routes, statuses, bodies."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cbor2
import httpx
import jsonschema
import pytest
import yaml
from inner_testbed import Bed
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from firmware.inner.api import InnerApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SPEC_PATH = Path(__file__).resolve().parents[3] / "firmware" / "inner" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
REGISTRY = Registry().with_resource("spec", DRAFT202012.create_resource(SPEC))


def check(r: httpx.Response, path: str, method: str) -> None:
    """Assert that ``r`` is a documented answer of ``method path`` with a conforming body."""
    op = SPEC["paths"][path][method.lower()]
    status = str(r.status_code)
    assert status in op["responses"], f"{method} {path} answered undocumented {status}"
    response = op["responses"][status]
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    media = r.headers.get("Content-Type", "").split(";")[0]
    content = response.get("content", {})
    if media == "text/plain":
        assert "text/plain" in content
        return
    assert media in content, f"{method} {path} {status}: undocumented {media}"
    schema = content[media]["schema"]
    if media == "application/octet-stream":
        return
    body = cbor2.loads(r.content) if media == "application/cbor" else r.json()
    if media == "application/cbor":
        body = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in body.items()}
    ref = {"$ref": "spec#/" + schema["$ref"][2:]} if "$ref" in schema else schema
    jsonschema.Draft202012Validator(ref, registry=REGISTRY).validate(body)
    if status in {"429", "503"}:
        assert int(r.headers["Retry-After"]) >= 1


def test_every_route_is_documented_and_every_documented_route_served() -> None:
    app_routes = set()
    api = InnerApi.__new__(InnerApi)
    api._cfg = type("C", (), {"max_body_bytes": 1, "max_header_bytes": 1})()  # type: ignore[assignment]
    catch_all = []
    for route in api.app().router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method == "*":  # answers 404 / 405 for what no route serves
            catch_all.append(path)
        elif route.method != "HEAD":
            app_routes.add((route.method, path))
    documented = {(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops}
    assert app_routes == documented
    assert catch_all == ["/{tail}"]


async def test_server_answers_as_documented(bed: Bed) -> None:
    h = bed.auth()
    call = "/v1/services/{service}/call"
    check(await bed.http.get("/v1/health"), "/v1/health", "GET")
    check(await bed.http.post("/v1/auth", headers=h), "/v1/auth", "POST")
    check(await bed.http.post("/v1/auth"), "/v1/auth", "POST")
    check(await bed.http.get("/v1/services", headers=h), "/v1/services", "GET")
    check(await bed.http.get("/metrics", headers=h), "/metrics", "GET")
    check(await bed.http.get("/metrics"), "/metrics", "GET")
    octets = {**h, "Content-Type": "application/octet-stream", "Optogate-Params": "{}"}
    for headers, body in (
        (octets, b"data"),
        ({**h, "Content-Type": "application/json"}, b'{"text": "x"}'),
        ({**h, "Content-Type": "application/cbor"}, cbor2.dumps({"params": {}, "data": b"d"})),
        ({**h, "Content-Type": "application/json", "Accept": "application/cbor"}, b"{}"),
        ({**h, "Content-Type": "application/json"}, b"{bad"),
        ({**h, "Content-Type": "text/csv"}, b"a,b"),
        ({**h, "Content-Type": "application/json"}, b'{"mode": "nope"}'),
        ({**h, "Content-Type": "application/json"}, b'{"mode": "crash"}'),
        ({**h, "Content-Type": "application/json"}, b"x" * (1024 * 1024 + 5)),
    ):
        check(
            await bed.http.post("/v1/services/algo/call", content=body, headers=headers),
            call,
            "POST",
        )
    r = await bed.http.post(
        "/v1/services/algo/call", content=b"{}", headers={**h, "Content-Type": "application/json"}
    )
    assert r.json()["result"]["params"] == {}
    check(await bed.http.post("/v1/services/none/call", headers=h, json={}), call, "POST")
    # 402 with its own schema
    bed.peer.grant("algo", bed.key, lic_id="L-1", valid_until=int(time.time()) - 5)
    assert await bed.daemon.daemon.sync_now()
    r = await bed.http.post("/v1/services/algo/call", headers=h, json={})
    assert r.status_code == 402
    check(r, call, "POST")
    # 503 when the service cannot be built: the outer module is gone
    from inner_testbed import algo_bundle

    bed.peer.publish(algo_bundle("later", 1))
    bed.peer.grant("later", bed.key, lic_id="L-later")
    assert await bed.daemon.daemon.sync_now()
    await bed.peer.stop()
    await bed.daemon.wait_for(lambda: not bed.daemon.daemon.upstream.connected)
    r = await bed.http.post("/v1/services/later/call", headers=h, content=json.dumps({}))
    assert r.status_code == 503
    check(r, call, "POST")
