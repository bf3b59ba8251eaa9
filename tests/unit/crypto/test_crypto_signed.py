"""Signed statements: usage records and challenges, bound to their purpose."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.common.crypto.errors import InvalidObject
from firmware.common.crypto.keys import SigningKey
from firmware.common.crypto.sealed import SIGNATURE_CONTEXT
from firmware.common.crypto.signed import (
    STATEMENT_CONTEXT,
    sign_statement,
    statement_signer,
    verify_statement,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

KEY = SigningKey.generate()
T = 1_767_225_600


def test_roundtrip() -> None:
    data = sign_statement(KEY, context="usage-records", created=T, payload=b"records")
    st_ = verify_statement(data, KEY.public, context="usage-records")
    assert (st_.context, st_.signer, st_.created, st_.payload) == (
        "usage-records",
        KEY.key_id,
        T,
        b"records",
    )
    assert statement_signer(data) == KEY.key_id


def test_other_context_key_or_size_rejected() -> None:
    data = sign_statement(KEY, context="usage-records", created=T, payload=b"records")
    with pytest.raises(InvalidObject):
        verify_statement(data, KEY.public, context="outer-auth")
    with pytest.raises(InvalidObject):
        verify_statement(data, SigningKey.generate().public, context="usage-records")
    with pytest.raises(InvalidObject):
        verify_statement(data, KEY.public, context="usage-records", max_bytes=len(data) - 1)


@pytest.mark.parametrize("index", range(5))
def test_every_field_replaced_is_rejected(index: int) -> None:
    data = sign_statement(KEY, context="usage-records", created=T, payload=b"records")
    fields = cbor2.loads(data)
    replacements = ["outer-auth", b"\x00" * 16, T + 1, b"other", b"\x00" * 64]
    fields[index] = replacements[index]
    with pytest.raises(InvalidObject):
        verify_statement(cbor2.dumps(fields), KEY.public, context="usage-records")


def test_signature_domains_are_separate() -> None:
    assert STATEMENT_CONTEXT != SIGNATURE_CONTEXT
    assert not STATEMENT_CONTEXT.startswith(SIGNATURE_CONTEXT)
    assert not SIGNATURE_CONTEXT.startswith(STATEMENT_CONTEXT)


def test_sign_argument_checks() -> None:
    for kwargs in ({"context": ""}, {"context": "x" * 65}, {"created": -1}):
        args: dict[str, object] = {"context": "c", "created": T, "payload": b""}
        args.update(kwargs)
        with pytest.raises(ValueError):
            sign_statement(KEY, **args)  # type: ignore[arg-type]


@given(st.binary(max_size=400))
def test_garbage_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(InvalidObject):
        verify_statement(data, KEY.public, context="usage-records")


def test_truncations_and_trailing_bytes_rejected() -> None:
    data = sign_statement(KEY, context="c", created=T, payload=b"p")
    for n in range(len(data)):
        with pytest.raises(InvalidObject):
            verify_statement(data[:n], KEY.public, context="c")
    with pytest.raises(InvalidObject):
        verify_statement(data + b"\x00", KEY.public, context="c")
