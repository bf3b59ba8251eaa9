"""Streaming calls of the client library against a real inner module.

A file-like input goes up in chunks and the output comes back in chunks, in
both clients, with the same bytes as a plain call; an error answer to a
streamed call is the same typed exception.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator

import pytest
from inner_testbed import Gateway

from host_tools import client as lib

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PAYLOAD_SIZE = 600_000  # several of the library's 256 KiB chunks, under the 1 MiB cap


async def test_sync_and_async_streaming_round_trip(gateway: Gateway) -> None:
    payload = os.urandom(PAYLOAD_SIZE)

    def sync_stream() -> tuple[dict[str, object], bytes]:
        sink = io.BytesIO()
        with lib.Client(gateway.url, gateway.key.secret, gateway.gw.ca_file) as c:
            result = c.call_stream("algo", {"text": "s"}, io.BytesIO(payload), sink)
        return result, sink.getvalue()

    result, echoed = await asyncio.to_thread(sync_stream)
    assert result["params"] == {"text": "s"}
    assert echoed == payload

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    async with lib.AsyncClient(gateway.url, gateway.key.secret, gateway.gw.ca_file) as c:
        result, body = await c.call_stream("algo", {"text": "a"}, source())
        received = b"".join([chunk async for chunk in body])
        assert result["params"] == {"text": "a"}
        assert received == payload
        with pytest.raises(lib.PaymentRequired) as info:
            await c.call_stream("expired", {}, source())
        assert info.value.licence == "L-5"
