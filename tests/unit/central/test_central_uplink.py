"""The uplink's shared formats: auth transcript bytes, signed usage batches, usage acks."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.keys import SigningKey
from firmware.common.uplink import (
    AUTH_CONTEXT,
    InvalidUsageBatch,
    UsageAckPayload,
    UsageRecord,
    auth_transcript,
    decode_usage_ack,
    encode_usage_ack,
    sign_usage_batch,
    verify_usage_batch,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

KEY = SigningKey.from_seed(bytes(range(32)))
HASH = "ab" * 32
RECORD = UsageRecord(
    at=1_767_225_600, service="echo", licence="lic-000001", credential=HASH, units=2
)


def _batch(**override: object) -> bytes:
    fields: dict[str, object] = {
        "gateway": "gw1",
        "batch_id": "b-1",
        "created": 1_767_225_600,
        "records": [RECORD],
    }
    fields.update(override)
    return sign_usage_batch(KEY, **fields)  # type: ignore[arg-type]


def test_auth_transcript_is_pinned_byte_for_byte() -> None:
    t = auth_transcript("gw1", b"\x01\x02", "00112233445566778899aabbccddeeff")
    assert t == (
        AUTH_CONTEXT
        + b"\x00\x03gw1"
        + b"\x02\x01\x02"
        + bytes.fromhex("00112233445566778899aabbccddeeff")
    )
    assert AUTH_CONTEXT == b"optogate uplink auth v1\x00"


def test_auth_transcript_binds_every_part() -> None:
    kid = "00" * 16
    base = auth_transcript("gw1", b"n" * 32, kid)
    assert base != auth_transcript("gw2", b"n" * 32, kid)
    assert base != auth_transcript("gw1", b"m" * 32, kid)
    assert base != auth_transcript("gw1", b"n" * 32, "01" * 16)
    # the length prefixes keep ("gw1", "1...") and ("gw11", "...") apart
    assert auth_transcript("gw1", b"1" * 32, kid) != auth_transcript("gw11", b"1" * 31, kid)
    for bad in (("", b"n", kid), ("gw1", b"", kid), ("gw1", b"n", "00"), ("gw1", b"n", "zz" * 16)):
        with pytest.raises(ValueError):
            auth_transcript(*bad)


def test_usage_batch_round_trip() -> None:
    batch = verify_usage_batch(_batch(), KEY.public)
    assert (batch.gateway, batch.batch_id, batch.records) == ("gw1", "b-1", (RECORD,))
    assert len(batch.digest) == 32


def test_usage_batch_refuses_another_key_and_bad_fields() -> None:
    with pytest.raises(InvalidUsageBatch, match="signature"):
        verify_usage_batch(_batch(), SigningKey.generate().public)
    with pytest.raises(InvalidUsageBatch):
        _batch(records=[UsageRecord(1, "echo", "lic", "not-a-hash", 1)])
    with pytest.raises(InvalidUsageBatch):
        _batch(batch_id="x" * 129)
    with pytest.raises(InvalidUsageBatch):
        _batch(gateway="")


def test_usage_records_carry_duration_outcome_and_bytes() -> None:
    failed = UsageRecord(7, "dxf2svg", "lic-2", "a" * 64, 0, 5003, "algorithm_timeout", 900, 0)
    batch = verify_usage_batch(_batch(records=[RECORD, failed]), KEY.public)
    assert batch.records == (RECORD, failed)
    for bad in ("OK", "", "x" * 65, "timed out"):
        with pytest.raises(InvalidUsageBatch, match="outcome"):
            _batch(records=[UsageRecord(1, "echo", "lic", "a" * 64, 0, 1, bad, 0, 0)])
    with pytest.raises(InvalidUsageBatch, match="bytes_in"):
        _batch(records=[UsageRecord(1, "echo", "lic", "a" * 64, 0, 1, "ok", -1, 0)])


def test_usage_batch_must_be_canonical() -> None:
    body, sig = cbor2.loads(_batch())
    # the same content with an indefinite-length wrapper: not canonical
    loose = b"\x9f" + cbor2.dumps(body) + cbor2.dumps(sig) + b"\xff"
    with pytest.raises(InvalidUsageBatch):
        verify_usage_batch(loose, KEY.public)


@given(st.binary(max_size=512))
def test_garbage_raises_only_invalid_usage_batch(data: bytes) -> None:
    with pytest.raises(InvalidUsageBatch):
        verify_usage_batch(data, KEY.public)


@given(st.data())
def test_any_flipped_bit_is_refused(data: st.DataObject) -> None:
    good = bytearray(_batch())
    i = data.draw(st.integers(0, len(good) - 1))
    good[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(InvalidUsageBatch):
        verify_usage_batch(bytes(good), KEY.public)


def test_usage_ack_round_trip_and_refusals() -> None:
    ack = UsageAckPayload("gw1", "b-1", b"\x07" * 32, 3)
    assert decode_usage_ack(encode_usage_ack(ack)) == ack
    with pytest.raises(InvalidUsageBatch):
        decode_usage_ack(cbor2.dumps({"format": 1}))
    with pytest.raises(InvalidUsageBatch):
        decode_usage_ack(encode_usage_ack(UsageAckPayload("gw1", "b", b"\x07" * 31, 3)))


@given(st.binary(max_size=256))
def test_usage_ack_garbage_raises_only_invalid_usage_batch(data: bytes) -> None:
    with pytest.raises(InvalidUsageBatch):
        decode_usage_ack(data)
