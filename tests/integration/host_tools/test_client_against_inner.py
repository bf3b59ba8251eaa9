"""host_tools/client.py and ``optogate call`` against a real inner module: every error class.

Each API error class must reach the library as its exception and the command
as its exit code (docs/api.md).  Order matters inside each test: failed
authentications count towards the 429 limit of the caller's address, so the
429 case comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from inner_testbed import Gateway

from host_tools import client as lib

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def optogate_call(gw: Gateway, *args: str, key: str | None = None, url: str | None = None):
    env = {
        **os.environ,
        "OPTOGATE_URL": url or gw.url,
        "OPTOGATE_API_KEY": key or gw.key.secret,
        "OPTOGATE_CA": str(gw.gw.ca_file),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from host_tools.cli import main; sys.exit(main())",
        "call",
        *args,
        "--json",
        "--max-wait",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return proc.returncode, json.loads(out.decode().strip().splitlines()[-1])


async def test_library_maps_every_error_class(gateway: Gateway) -> None:
    async with lib.AsyncClient(
        gateway.url, gateway.key.secret, gateway.gw.ca_file, max_wait=0
    ) as c:
        assert (await c.health())["status"] == "ok"
        assert (await c.auth())["customer"] == "acme"
        assert {s["service"] for s in await c.services()} == {"algo", "slow", "later", "expired"}
        out = await c.call("algo", {"text": "hi"}, b"\x00\x01")
        assert (out.result["params"], out.data) == ({"text": "hi"}, b"\x00\x01")
        cases: list[tuple[str, dict[str, object], bytes, type[lib.GatewayError]]] = [
            ("nope", {}, b"", lib.NotFound),
            ("other", {}, b"", lib.Forbidden),
            ("expired", {}, b"", lib.PaymentRequired),
            ("algo", {"mode": "fly"}, b"", lib.InvalidParams),
            ("algo", {"mode": "refuse"}, b"", lib.InvalidParams),
            ("algo", {}, b"x" * (1024 * 1024 + 1), lib.TooLarge),
            ("algo", {"mode": "crash"}, b"", lib.AlgorithmCrashed),
            ("slow", {"mode": "hang"}, b"", lib.AlgorithmTimeout),
        ]
        for service, params, data, expected in cases:
            with pytest.raises(expected) as info:
                await c.call(service, params, data)
            assert info.value.status in {404, 403, 402, 422, 413, 500, 504}
        with pytest.raises(lib.PaymentRequired) as paid:
            await c.call("expired", {})
        assert paid.value.licence == "L-5"
        assert paid.value.renew == {"service": "expired", "customer": "acme"}
    async with lib.AsyncClient(gateway.url, "og_live_" + "a" * 52, gateway.gw.ca_file) as bad:
        with pytest.raises(lib.Unauthorized):
            await bad.auth()
    async with lib.AsyncClient(gateway.url, gateway.key.secret, None, max_wait=0) as untrusting:
        with pytest.raises(lib.GatewayError) as tls:
            await untrusting.health()
        assert tls.value.exit_code in {8, 12}

    # the sync client, on a thread (the daemon runs on this loop)
    def sync_call() -> lib.CallResult:
        with lib.Client(gateway.url, gateway.key.secret, gateway.gw.ca_file) as sc:
            return sc.call("algo", {"text": "sync"})

    assert (await asyncio.to_thread(sync_call)).result["params"] == {"text": "sync"}
    # 503: the outer module is gone and "later" was never built
    await gateway.peer.stop()
    await gateway.daemon.wait_for(lambda: not gateway.daemon.daemon.upstream.connected)
    async with lib.AsyncClient(
        gateway.url, gateway.key.secret, gateway.gw.ca_file, max_wait=0
    ) as c:
        with pytest.raises(lib.Unavailable) as unavailable:
            await c.call("later", {})
        assert unavailable.value.retry_after is not None
        assert (await c.call("algo", {})).result["version"] == 1  # built: still served
    # 429: too many wrong keys from this address
    async with lib.AsyncClient(
        gateway.url, "og_live_" + "b" * 52, gateway.gw.ca_file, max_wait=0
    ) as bad:
        for _ in range(4):
            with pytest.raises(lib.Unauthorized):
                await bad.auth()
        with pytest.raises(lib.TooManyFailures) as many:
            await bad.auth()
        assert many.value.retry_after is not None


async def test_optogate_call_exit_codes(gateway: Gateway, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"\x00payload\xff")
    target = tmp_path / "out.bin"
    code, doc = await optogate_call(
        gateway, "algo", "--param", "text=hi", "--input", str(source), "--output", str(target)
    )
    assert (code, doc["ok"]) == (0, True)
    assert target.read_bytes() == source.read_bytes()
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    for args, exit_code, status in [
        (("nope",), 6, 404),
        (("other",), 4, 403),
        (("expired",), 5, 402),
        (("algo", "--param", "mode=fly"), 7, 422),
        (("algo", "--input", str(big)), 7, 413),
        (("algo", "--param", "mode=crash"), 10, 500),
        (("slow", "--param", "mode=hang"), 9, 504),
    ]:
        code, doc = await optogate_call(gateway, *args)
        assert (code, doc["ok"], doc["status"]) == (exit_code, False, status), args
    code, doc = await optogate_call(gateway, "algo", "--input", str(tmp_path / "missing"))
    assert code == 2
    code, doc = await optogate_call(gateway, "algo", url="https://127.0.0.1:1")
    assert code == 8
    code, doc = await optogate_call(gateway, "algo", key="og_live_" + "c" * 52)
    assert (code, doc["status"]) == (3, 401)
    await gateway.peer.stop()
    await gateway.daemon.wait_for(lambda: not gateway.daemon.daemon.upstream.connected)
    code, doc = await optogate_call(gateway, "later")
    assert (code, doc["status"]) == (8, 503)
    for _ in range(4):
        code, _ = await optogate_call(gateway, "algo", key="og_live_" + "d" * 52)
    code, doc = await optogate_call(gateway, "algo")
    assert (code, doc["status"], doc["code"]) == (11, 429, "too_many_failures")
