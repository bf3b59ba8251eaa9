"""Joining a streamed Service reply (the exchange's bookkeeping) and cutting one (split_service)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.errors import LocalProtocolError
from firmware.common.link import messages as m
from firmware.common.link.kinds import Kind
from firmware.common.link.link import PartJoiner
from firmware.common.link.testing import collect_reply

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LICENCE = b"L"


def _exchange() -> PartJoiner:
    return PartJoiner()


def _end(n: int) -> m.Service:
    return m.Service(sealed_bundle=b"", sealed_licence=LICENCE, streamed=n)


def test_the_end_may_come_before_the_last_parts() -> None:
    ex = _exchange()
    assert ex.add(m.ServicePart(offset=4, data=b"4567"))
    ex.end(_end(10))
    assert ex.joined() is None  # bytes 0..3 and 8..9 are still on their way
    assert ex.add(m.ServicePart(offset=0, data=b"0123"))
    assert ex.joined() is None
    assert ex.add(m.ServicePart(offset=8, data=b"89"))
    assert ex.joined() == m.Service(sealed_bundle=b"0123456789", sealed_licence=LICENCE)


def test_a_part_beyond_the_announced_end_is_refused() -> None:
    ex = _exchange()
    ex.end(_end(10))
    with pytest.raises(m.InvalidMessage, match="beyond the bundle"):
        ex.add(m.ServicePart(offset=8, data=b"890"))


def test_a_repeat_is_not_new_and_a_different_one_is_refused() -> None:
    ex = _exchange()
    assert ex.add(m.ServicePart(offset=0, data=b"ab"))
    assert not ex.add(m.ServicePart(offset=0, data=b"ab"))
    with pytest.raises(m.InvalidMessage, match="two different parts"):
        ex.add(m.ServicePart(offset=0, data=b"ac"))


def test_a_service_cannot_be_streamed_and_inline_at_once() -> None:
    with pytest.raises(LocalProtocolError, match="streamed"):
        m.Service(sealed_bundle=b"x", sealed_licence=LICENCE, streamed=1)
    data = m.encode(_end(1), 1, 2)
    body = data.replace(b"\x40", b"\x41x", 1)  # sealed_bundle b"" -> b"x"
    with pytest.raises(m.InvalidMessage):
        m.decode(Kind.SERVICE, body)


@given(
    size=st.integers(0, 20_000),
    part=st.integers(1, 5000),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_then_join_in_any_order_gives_the_reply_back(size: int, part: int, seed: int) -> None:
    import random

    reply = m.Service(sealed_bundle=os.urandom(size), sealed_licence=LICENCE)
    items = list(m.split_service(reply, part))
    if size <= part:
        assert items == [reply]
        return
    *parts, end = items
    assert end == _end(size)
    assert all(isinstance(p, m.ServicePart) and len(p.data) <= part for p in parts)
    random.Random(seed).shuffle(parts)
    ex = _exchange()
    cut = random.Random(seed).randrange(len(parts) + 1)  # where the end overtakes
    for i, p in enumerate(parts):
        if i == cut:
            ex.end(end)
        assert isinstance(p, m.ServicePart)
        ex.add(p)
    ex.end(end)
    assert ex.joined() == reply


def test_split_refuses_a_part_size_out_of_bounds() -> None:
    reply = m.Service(sealed_bundle=b"x" * 10, sealed_licence=LICENCE)
    for bad in (0, m.MAX_PART + 1):
        with pytest.raises(LocalProtocolError):
            list(m.split_service(reply, bad))


@pytest.mark.asyncio
async def test_collect_reply_joins_a_handler_stream_and_refuses_a_short_one() -> None:
    reply = m.Service(sealed_bundle=os.urandom(10_000), sealed_licence=LICENCE)

    async def stream(items: list[m.Message]) -> AsyncIterator[m.Message]:
        for item in items:
            yield item

    items = list(m.split_service(reply))
    assert await collect_reply(stream(items)) == reply
    assert await collect_reply(reply) == reply
    with pytest.raises(m.InvalidMessage, match="before its parts"):
        await collect_reply(stream(items[1:]))
    with pytest.raises(LocalProtocolError, match="no end"):
        await collect_reply(stream(items[:-1]))
