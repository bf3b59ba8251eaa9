"""The link test's pure parts: chunk reassembly, the echo handler, the report."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from firmware.common.errors import RemoteError
from firmware.common.link import cli
from firmware.common.link import messages as m

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def chunks(data: bytes, size: int, transfer: int = 1) -> list[m.LinkData]:
    parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    return [
        m.LinkData(chunk=p, index=i, last=i == len(parts) - 1, transfer=transfer)
        for i, p in enumerate(parts)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_reassembly_hashes_in_index_order_whatever_the_arrival_order(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 5000))
    parts = chunks(data, 300)
    rng.shuffle(parts)
    r = cli.Reassembly()
    for i, part in enumerate(parts):
        assert not r.complete
        r.add(part)
        assert r.complete == (i == len(parts) - 1)
    digest = r.digest()
    assert digest == m.LinkDigest(sha256=hashlib.sha256(data).digest(), nbytes=len(data))
    assert not r.complete  # digest() starts over


def test_reassembly_refuses_duplicates() -> None:
    r = cli.Reassembly()
    r.add(m.LinkData(chunk=b"a", index=0, last=False))
    r.add(m.LinkData(chunk=b"b", index=1, last=False))
    r.add(m.LinkData(chunk=b"d", index=3, last=False))
    for again in (0, 1, 3):  # already hashed, and held out of order
        with pytest.raises(RemoteError) as info:
            r.add(m.LinkData(chunk=b"x", index=again, last=False))
        assert info.value.code == "bad_transfer"


def test_a_new_transfer_restarts_reassembly() -> None:
    r = cli.Reassembly()
    r.add(m.LinkData(chunk=b"old", index=0, last=False, transfer=1))
    r.add(m.LinkData(chunk=b"old", index=1, last=False, transfer=1))  # that test was aborted
    for part in chunks(b"new data", 3, transfer=2):
        r.add(part)
    assert r.digest().sha256 == hashlib.sha256(b"new data").digest()


def test_the_same_transfer_id_may_be_reused_after_a_digest() -> None:
    r = cli.Reassembly()
    for data in (b"first", b"second"):
        for part in chunks(data, 2, transfer=5):
            r.add(part)
        assert r.digest().sha256 == hashlib.sha256(data).digest()


def test_reassembly_bounds_out_of_order_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "MAX_HELD_BYTES", 10)
    r = cli.Reassembly()
    r.add(m.LinkData(chunk=b"x" * 6, index=1, last=False))
    with pytest.raises(RemoteError, match="out-of-order"):
        r.add(m.LinkData(chunk=b"x" * 6, index=2, last=False))
    assert r.nbytes == 0


async def test_echo_responder_answers_echo_and_the_last_chunk() -> None:
    echo = cli.EchoResponder()
    reply = await echo(m.LinkEcho(nonce=b"n", sent_at=3.0))
    assert reply == m.LinkEchoReply(nonce=b"n", sent_at=3.0)
    parts = chunks(b"0123456789", 4)
    # The last chunk first: its answer waits until the gap is filled.
    last = asyncio.create_task(echo(parts[-1]))
    await asyncio.sleep(0)
    assert not last.done()
    for part in parts[:-1]:
        assert await echo(part) is None
    digest = await asyncio.wait_for(last, 1)
    assert digest == m.LinkDigest(sha256=hashlib.sha256(b"0123456789").digest(), nbytes=10)


async def test_echo_responder_gives_up_on_missing_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "ASSEMBLY_TIMEOUT", 0.05)
    echo = cli.EchoResponder()
    with pytest.raises(RemoteError) as info:
        await echo(m.LinkData(chunk=b"z", index=3, last=True))
    assert info.value.code == "incomplete_transfer"


async def test_echo_responder_refuses_other_requests() -> None:
    with pytest.raises(RemoteError) as info:
        await cli.EchoResponder()(m.Status())
    assert info.value.code == "unsupported"


def test_error_counters_pick_line_trouble_and_fill_zeros() -> None:
    stats = {"frames_sent": 10, "dropped_crc": 3, "retransmits": 2, "link_requests": 4}
    picked = cli.error_counters(stats)
    assert picked["dropped_crc"] == 3
    assert picked["retransmits"] == 2
    assert picked["timeouts"] == 0
    assert "frames_sent" not in picked
    assert "link_requests" not in picked


def test_result_json_has_exactly_the_documented_keys() -> None:
    keys = set(cli.LinkTestResult(line_rate_Bps=11520.0).as_json())
    assert keys == {
        "rtt_ms",
        "bytes",
        "seconds",
        "goodput_Bps",
        "line_rate_Bps",
        "fraction",
        "digest_ok",
        "counters",
    }
    failed = cli.LinkTestResult(error="LinkDown: cut").as_json()
    assert failed["error"] == "LinkDown: cut"
    assert failed["digest_ok"] is False
