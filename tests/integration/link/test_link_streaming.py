"""Streamed Service replies over a real pty: joined, passed on as they come, refused when bad."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from test_link_pty import PtyPair, with_links

from firmware.common.errors import LinkDown
from firmware.common.link import messages as m
from firmware.common.link.link import Link

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LICENCE = b"sealed licence"


@pytest.fixture
def pty_pair() -> Iterator[PtyPair]:
    pair = PtyPair()
    yield pair
    pair.close()


def _parts(bundle: bytes, size: int = m.PART_SIZE) -> list[m.ServicePart]:
    return [m.ServicePart(offset=o, data=bundle[o : o + size]) for o in range(0, len(bundle), size)]


def _end(bundle: bytes) -> m.Service:
    return m.Service(sealed_bundle=b"", sealed_licence=LICENCE, streamed=len(bundle))


async def _stream(*items: m.Message) -> AsyncIterator[m.Message]:
    for item in items:
        yield item


@pytest.mark.asyncio
async def test_a_large_service_reply_is_streamed_in_order_and_joined(pty_pair: PtyPair) -> None:
    bundle = os.urandom(50_000)

    async def handler(msg: m.Message) -> m.Message:
        return m.Service(sealed_bundle=bundle, sealed_licence=LICENCE)

    async def body(client: Link, server: Link) -> None:
        seen: list[int] = []
        reply = await client.request(
            m.FetchService(service="dxf"),
            expect=m.Service,
            on_part=lambda p: seen.append(p.offset),
            timeout=20,
        )
        assert reply == m.Service(sealed_bundle=bundle, sealed_licence=LICENCE)
        expected = list(range(0, len(bundle), m.PART_SIZE))
        assert sorted(seen) == expected
        # At most two parts are unacknowledged at a time, so each completes
        # within one place of its turn (the short last one may overtake).
        assert all(abs(expected.index(o) - i) <= 1 for i, o in enumerate(seen)), seen
        assert server.statistics()["link_replies"] == len(seen) + 1
        assert client.statistics()["link_parts_received"] == len(seen)

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_a_small_bundle_travels_inline(pty_pair: PtyPair) -> None:
    async def handler(msg: m.Message) -> m.Message:
        return m.Service(sealed_bundle=b"b" * m.PART_SIZE, sealed_licence=LICENCE)

    async def body(client: Link, server: Link) -> None:
        reply = await client.request(m.FetchService(service="echo"), expect=m.Service)
        assert reply.sealed_bundle == b"b" * m.PART_SIZE
        assert "link_parts_received" not in client.statistics()

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_a_relay_passes_each_part_on_before_the_next_exists(pty_pair: PtyPair) -> None:
    """The handler makes part k+1 only once the client has part k: true streaming."""
    bundle = os.urandom(5 * m.PART_SIZE + 17)
    parts = _parts(bundle)
    arrived = [asyncio.Event() for _ in parts]
    closed = asyncio.Event()

    async def relay() -> AsyncIterator[m.Message]:
        try:
            for i, part in enumerate(parts):
                if i:
                    await asyncio.wait_for(arrived[i - 1].wait(), 10)
                yield part
            yield _end(bundle)
        finally:
            closed.set()

    async def handler(msg: m.Message) -> AsyncIterator[m.Message]:
        return relay()

    async def body(client: Link, server: Link) -> None:
        def on_part(part: m.ServicePart) -> None:
            arrived[part.offset // m.PART_SIZE].set()

        reply = await client.request(
            m.FetchService(service="dxf"), expect=m.Service, on_part=on_part, timeout=20
        )
        assert reply.sealed_bundle == bundle
        assert reply.streamed == 0
        await asyncio.wait_for(closed.wait(), 5)

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_parts_out_of_order_and_repeated_are_joined_by_offset(pty_pair: PtyPair) -> None:
    bundle = os.urandom(4 * 1000 + 3)
    parts = _parts(bundle, 1000)
    shuffled = [parts[3], parts[0], parts[0], parts[4], parts[2], parts[1], parts[2]]

    async def handler(msg: m.Message) -> AsyncIterator[m.Message]:
        return _stream(*shuffled, _end(bundle))

    async def body(client: Link, server: Link) -> None:
        seen: list[int] = []
        reply = await client.request(
            m.FetchService(service="dxf"), expect=m.Service, on_part=lambda p: seen.append(p.offset)
        )
        assert reply.sealed_bundle == bundle
        assert sorted(seen) == [p.offset for p in parts]  # each new part told once
        stats = client.statistics()
        # the last repeat may come after the whole bundle was there: a late reply then
        assert stats["link_parts_repeated"] + stats.get("link_late_replies", 0) == 2

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_an_inline_end_replaces_the_parts_sent_before_it(pty_pair: PtyPair) -> None:
    """A relay that fell back to its cache after forwarding parts ends with the whole bundle.

    The end is larger than a part, and still not cut into parts: parts at the
    same offsets would clash with those already sent.
    """
    bundle = os.urandom(3 * m.PART_SIZE + 10)

    async def handler(msg: m.Message) -> AsyncIterator[m.Message]:
        return _stream(
            *_parts(os.urandom(2000), 1000),
            m.Service(sealed_bundle=bundle, sealed_licence=LICENCE),
        )

    async def body(client: Link, server: Link) -> None:
        reply = await client.request(m.FetchService(service="dxf"), expect=m.Service)
        assert reply.sealed_bundle == bundle
        assert client.statistics()["link_parts_received"] == 2  # the discarded ones

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_a_stream_that_ends_inline_at_once_is_cut_into_parts(pty_pair: PtyPair) -> None:
    bundle = os.urandom(3 * m.PART_SIZE + 10)

    async def handler(msg: m.Message) -> AsyncIterator[m.Message]:
        return _stream(m.Service(sealed_bundle=bundle, sealed_licence=LICENCE))

    async def body(client: Link, server: Link) -> None:
        reply = await client.request(m.FetchService(service="dxf"), expect=m.Service)
        assert reply.sealed_bundle == bundle
        assert client.statistics()["link_parts_received"] == 4

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("items", "match"),
    [
        (
            [m.ServicePart(offset=0, data=b"a" * 10), m.ServicePart(offset=0, data=b"b" * 10)],
            "two different parts",
        ),
        (
            [m.ServicePart(offset=0, data=b"x" * 8), m.ServicePart(offset=4, data=b"x" * 6)],
            "more part bytes",
        ),
    ],
)
async def test_inconsistent_parts_fail_the_exchange_and_the_link_lives_on(
    pty_pair: PtyPair, items: list[m.Message], match: str
) -> None:
    async def handler(msg: m.Message) -> AsyncIterator[m.Message] | m.Message:
        if isinstance(msg, m.Status):
            return m.StatusReport(fields={"ok": True})
        return _stream(*items, _end(b"z" * 10))

    async def body(client: Link, server: Link) -> None:
        with pytest.raises(m.InvalidMessage, match=match):
            await client.request(m.FetchService(service="dxf"), expect=m.Service, timeout=10)
        assert isinstance(await client.request(m.Status()), m.StatusReport)

    await with_links(pty_pair, body, handler)


@pytest.mark.asyncio
async def test_a_session_going_down_mid_stream_fails_the_request_and_closes_the_stream(
    pty_pair: PtyPair,
) -> None:
    bundle = os.urandom(30 * m.PART_SIZE)
    closed = asyncio.Event()
    started = asyncio.Event()

    async def slow() -> AsyncIterator[m.Message]:
        try:
            for part in _parts(bundle):
                started.set()
                yield part
                await asyncio.sleep(0.05)
            yield _end(bundle)
        finally:
            closed.set()

    async def handler(msg: m.Message) -> AsyncIterator[m.Message]:
        return slow()

    async def body(client: Link, server: Link) -> None:
        request = asyncio.create_task(
            client.request(m.FetchService(service="dxf"), expect=m.Service, timeout=20)
        )
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.2)
        client.force_down(LinkDown("power cut"))
        with pytest.raises(LinkDown):
            await request
        await asyncio.wait_for(closed.wait(), 10)
        assert server.statistics().get("link_streams_abandoned", 0) == 1

    await with_links(pty_pair, body, handler)
