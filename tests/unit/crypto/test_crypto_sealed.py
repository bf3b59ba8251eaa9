"""Sealed objects: round trips, known answers, and every way to break one."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from trust_fixtures import DAY, NOW, forge, header_fields, resign

from firmware.common.crypto.errors import ExpiredObject, InvalidObject, RollbackError
from firmware.common.crypto.keys import RecipientKey, SigningKey
from firmware.common.crypto.sealed import (
    MAX_SEALED_BYTES,
    Compression,
    Kind,
    open_sealed,
    seal,
    verify_sealed,
)
from firmware.common.licence import LicenceSet

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

VECTORS = Path(__file__).parents[2] / "vectors" / "sealed" / "sealed_vectors.json"
PAYLOAD = b"the dxf converter, version 3 " * 20


def make(central: SigningKey, inner: RecipientKey, **overrides: object) -> bytes:
    args: dict[str, object] = {
        "kind": Kind.BUNDLE,
        "subject": "dxf-convert",
        "version": 3,
        "created": NOW,
        "expires": NOW + DAY,
        "issuer": central,
        "recipient": inner.public,
        "compression": Compression.ZLIB,
    }
    args.update(overrides)
    payload = args.pop("payload", PAYLOAD)
    assert isinstance(payload, bytes)
    return seal(payload, **args)  # type: ignore[arg-type]


def open_(data: bytes, central: SigningKey, inner: RecipientKey, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"now": NOW + 1, "expected_kind": Kind.BUNDLE}
    args.update(kw)
    return open_sealed(data, inner, central.public, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("pq", [False, True])
def test_roundtrip(
    central: SigningKey,
    inner: RecipientKey,
    inner_pq: RecipientKey,
    compression: Compression,
    pq: bool,
) -> None:
    recipient = inner_pq if pq else inner
    data = make(central, recipient, compression=compression)
    opened = open_(data, central, recipient)
    assert opened.payload == PAYLOAD
    h = opened.header
    assert (h.kind, h.subject, h.version, h.created, h.expires) == (
        Kind.BUNDLE,
        "dxf-convert",
        3,
        NOW,
        NOW + DAY,
    )
    assert (h.issuer, h.recipient, h.suite, h.compression) == (
        central.key_id,
        recipient.key_id,
        recipient.suite,
        compression,
    )
    assert h.payload_length == len(PAYLOAD)
    assert verify_sealed(data, central.public) == h


def test_empty_payload_roundtrips(central: SigningKey, inner: RecipientKey) -> None:
    assert open_(make(central, inner, payload=b""), central, inner).payload == b""


def test_known_answer_vectors() -> None:
    doc = json.loads(VECTORS.read_text())
    issuer = SigningKey.from_seed(bytes.fromhex(doc["issuer_seed_hex"]))
    assert len(doc["objects"]) >= 3
    for obj in doc["objects"]:
        recipient = RecipientKey.from_raw(
            bytes.fromhex(doc["recipients"][obj["recipient"]]["secret_hex"])
        )
        opened = open_sealed(
            bytes.fromhex(obj["sealed_hex"]),
            recipient,
            issuer.public,
            now=obj["now"],
            expected_kind=Kind[obj["kind"]],
            expected_subject=obj["subject"],
        )
        assert opened.payload.hex() == obj["payload_hex"]
        assert opened.header.version == obj["version"]
        assert opened.header.expires == obj["expires"]
        assert opened.header.compression is Compression[obj["compression"]]
        if opened.header.kind is Kind.LICENCE_SET:
            lset = LicenceSet.from_payload(opened.payload)
            assert lset.gateway == obj["subject"]
            assert lset.to_payload() == opened.payload  # the encoding is pinned too


def test_every_byte_flipped_is_rejected(central: SigningKey, inner: RecipientKey) -> None:
    data = make(central, inner, payload=b"small")
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            bad = data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]
            with pytest.raises(InvalidObject):
                open_(bad, central, inner)


# Replacement values for each header field (index in wire order).
FIELD_REPLACEMENTS = {
    0: 2,  # format version
    1: 2,  # kind
    2: "doc-encrypt",  # subject
    3: 4,  # version
    4: NOW - 10,  # created
    5: NOW + 2 * DAY,  # expires
    6: b"\x00" * 16,  # issuer key id
    7: b"\x00" * 16,  # recipient key id
    8: 2,  # suite
    9: 2,  # compression
    10: 4,  # payload length
}


@pytest.mark.parametrize("index", sorted(FIELD_REPLACEMENTS))
def test_every_header_field_replaced_is_rejected(
    central: SigningKey, inner: RecipientKey, index: int
) -> None:
    """Replaced without re-signing: the signature fails.  Re-signed by central
    itself: the HPKE info no longer matches (or a key id no longer does)."""
    fields = header_fields(issuer=central, recipient=inner.public, payload_length=5)
    good = forge(fields, b"hello", issuer=central, recipient=inner.public)
    assert open_(good, central, inner).payload == b"hello"
    _, ciphertext, signature = cbor2.loads(good)
    changed = list(fields)
    changed[index] = FIELD_REPLACEMENTS[index]
    new_header = cbor2.dumps(changed)
    unsigned = cbor2.dumps([new_header, ciphertext, signature])
    with pytest.raises(InvalidObject):
        open_(unsigned, central, inner)
    with pytest.raises(InvalidObject):
        open_(
            resign(new_header, ciphertext, central),
            central,
            inner,
            expected_kind=Kind(changed[1]) if index == 1 else Kind.BUNDLE,
        )


def test_signature_ciphertext_or_header_swapped_between_objects(
    central: SigningKey, inner: RecipientKey
) -> None:
    a = cbor2.loads(make(central, inner, payload=b"aaaa", version=1))
    b = cbor2.loads(make(central, inner, payload=b"bbbb", version=2))
    for parts in ([a[0], b[1], a[2]], [a[0], a[1], b[2]], [b[0], a[1], a[2]]):
        with pytest.raises(InvalidObject):
            open_(cbor2.dumps(parts), central, inner)
    # Even re-signed by central, a's header cannot open b's ciphertext.
    with pytest.raises(InvalidObject):
        open_(resign(a[0], b[1], central), central, inner)


def test_wrong_recipient_rejected(
    central: SigningKey, inner: RecipientKey, other_inner: RecipientKey, inner_pq: RecipientKey
) -> None:
    data = make(central, inner)
    for wrong in (other_inner, inner_pq):
        with pytest.raises(InvalidObject):
            open_(data, central, wrong)


def test_header_naming_us_but_sealed_to_another_rejected(
    central: SigningKey, inner: RecipientKey, other_inner: RecipientKey
) -> None:
    fields = header_fields(issuer=central, recipient=inner.public, payload_length=5)
    data = forge(fields, b"hello", issuer=central, recipient=other_inner.public)
    with pytest.raises(InvalidObject):
        open_(data, central, inner)


def test_wrong_issuer_rejected(central: SigningKey, inner: RecipientKey) -> None:
    impostor = SigningKey.generate()
    with pytest.raises(InvalidObject):
        open_(make(impostor, inner), central, inner)
    with pytest.raises(InvalidObject):
        verify_sealed(make(impostor, inner), central.public)


def test_wrong_kind_or_subject_rejected(central: SigningKey, inner: RecipientKey) -> None:
    data = make(central, inner)
    with pytest.raises(InvalidObject):
        open_(data, central, inner, expected_kind=Kind.LICENCE_SET)
    with pytest.raises(InvalidObject):
        open_(data, central, inner, expected_subject="doc-encrypt")
    assert open_(data, central, inner, expected_subject="dxf-convert").payload == PAYLOAD


def test_expiry_boundary(central: SigningKey, inner: RecipientKey) -> None:
    data = make(central, inner)
    assert open_(data, central, inner, now=NOW + DAY - 1).payload == PAYLOAD
    with pytest.raises(ExpiredObject):
        open_(data, central, inner, now=NOW + DAY)
    with pytest.raises(ExpiredObject):
        open_(data, central, inner, now=NOW + 365 * DAY)


def test_min_version(central: SigningKey, inner: RecipientKey) -> None:
    data = make(central, inner, version=3)
    assert open_(data, central, inner, min_version=3).header.version == 3
    with pytest.raises(RollbackError):
        open_(data, central, inner, min_version=4)


def test_payload_over_caller_limit_rejected(central: SigningKey, inner: RecipientKey) -> None:
    data = make(central, inner)
    with pytest.raises(InvalidObject):
        open_(data, central, inner, max_payload_bytes=len(PAYLOAD) - 1)
    assert open_(data, central, inner, max_payload_bytes=len(PAYLOAD)).payload == PAYLOAD


@pytest.mark.parametrize("declared", [0, 1000, 999_999])
def test_zip_bomb_stops_at_declared_length(
    central: SigningKey, inner: RecipientKey, declared: int
) -> None:
    bomb = zlib.compress(b"\x00" * 20_000_000, 9)  # 20 MB from ~20 KB
    fields = header_fields(
        issuer=central, recipient=inner.public, compression=1, payload_length=declared
    )
    with pytest.raises(InvalidObject):
        open_(forge(fields, bomb, issuer=central, recipient=inner.public), central, inner)


def test_declared_length_longer_than_content_rejected(
    central: SigningKey, inner: RecipientKey
) -> None:
    for comp, body in ((0, b"12345"), (1, zlib.compress(b"12345"))):
        fields = header_fields(
            issuer=central, recipient=inner.public, compression=comp, payload_length=6
        )
        with pytest.raises(InvalidObject):
            open_(forge(fields, body, issuer=central, recipient=inner.public), central, inner)


def test_trailing_data_after_compressed_stream_rejected(
    central: SigningKey, inner: RecipientKey
) -> None:
    fields = header_fields(issuer=central, recipient=inner.public, compression=1, payload_length=5)
    body = zlib.compress(b"hello") + b"extra"
    with pytest.raises(InvalidObject):
        open_(forge(fields, body, issuer=central, recipient=inner.public), central, inner)


def test_bad_compressed_stream_rejected(central: SigningKey, inner: RecipientKey) -> None:
    for comp in (1, 2):
        fields = header_fields(
            issuer=central, recipient=inner.public, compression=comp, payload_length=5
        )
        with pytest.raises(InvalidObject):
            open_(
                forge(fields, b"not compressed", issuer=central, recipient=inner.public),
                central,
                inner,
            )


def _with(fields: list[object], index: int, value: object) -> list[object]:
    changed = list(fields)
    changed[index] = value
    return changed


def test_bad_header_shapes_rejected_even_when_signed(
    central: SigningKey, inner: RecipientKey
) -> None:
    base = header_fields(issuer=central, recipient=inner.public, payload_length=5)
    variants: list[list[object]] = [
        base[:-1],
        [*base, 0],
        [True, *base[1:]],
        _with(base, 2, ""),
        _with(base, 3, -1),
        _with(base, 4, NOW + DAY),  # created == expires
        _with(base, 6, b"\x00" * 15),
        _with(base, 8, 9),
        _with(base, 9, 7),
        _with(base, 10, 1.5),
        _with(base, 2, "x" * 201),
    ]
    for fields in variants:
        data = forge(fields, b"hello", issuer=central, recipient=inner.public)
        with pytest.raises(InvalidObject):
            open_(data, central, inner)


def test_non_canonical_encoding_rejected(central: SigningKey, inner: RecipientKey) -> None:
    header, ciphertext, signature = cbor2.loads(make(central, inner))
    # An array of 3 in the long form (0x98 0x03) instead of 0x83.
    long_form = b"\x98\x03" + cbor2.dumps(header) + cbor2.dumps(ciphertext) + cbor2.dumps(signature)
    assert cbor2.loads(long_form) == [header, ciphertext, signature]
    with pytest.raises(InvalidObject):
        open_(long_form, central, inner)


def test_truncations_and_trailing_bytes_rejected(central: SigningKey, inner: RecipientKey) -> None:
    data = make(central, inner, payload=b"x")
    for n in range(len(data)):
        with pytest.raises(InvalidObject):
            open_(data[:n], central, inner)
    for extra in (b"\x00", b"\xff", data):
        with pytest.raises(InvalidObject):
            open_(data + extra, central, inner)


def test_oversized_input_rejected_before_parsing(central: SigningKey, inner: RecipientKey) -> None:
    with pytest.raises(InvalidObject):
        open_(b"\x83" + bytes(MAX_SEALED_BYTES), central, inner)


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_a_typed_error(data: bytes) -> None:
    central, inner = _KEYS
    with pytest.raises(InvalidObject):
        open_(data, central, inner)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=80)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=12) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


@given(_cbor_values)
def test_arbitrary_cbor_is_a_typed_error(value: object) -> None:
    central, inner = _KEYS
    with pytest.raises(InvalidObject):
        open_(cbor2.dumps(value), central, inner)


@given(st.data())
def test_random_mutation_of_a_valid_object_is_rejected(data: st.DataObject) -> None:
    central, inner = _KEYS
    good = _GOOD
    i = data.draw(st.integers(0, len(good) - 1))
    replacement = data.draw(st.binary(min_size=0, max_size=8))
    bad = good[:i] + replacement + good[i + 1 :]
    if bad == good:
        return
    with pytest.raises(InvalidObject):
        open_(bad, central, inner)


def test_seal_argument_checks(central: SigningKey, inner: RecipientKey) -> None:
    for overrides in (
        {"subject": ""},
        {"subject": "x" * 201},
        {"version": -1},
        {"created": NOW, "expires": NOW},
        {"expires": 2**63},
    ):
        with pytest.raises(ValueError):
            make(central, inner, **overrides)


_KEYS = (SigningKey.generate(), RecipientKey.generate())
_GOOD = make(*_KEYS, payload=b"mutate me")


@pytest.mark.parametrize("pq", [False, True])
def test_largest_header_values_roundtrip(
    central: SigningKey, inner: RecipientKey, inner_pq: RecipientKey, pq: bool
) -> None:
    recipient = inner_pq if pq else inner
    top = 2**63 - 1
    data = make(central, recipient, subject="é" * 100, version=top, created=top - 1, expires=top)
    h = open_(data, central, recipient, now=top - 1).header
    assert (h.subject, h.version, h.expires) == ("é" * 100, top, top)


@pytest.mark.parametrize("pq", [False, True])
def test_short_ciphertexts_are_a_typed_error(
    central: SigningKey, inner: RecipientKey, inner_pq: RecipientKey, pq: bool
) -> None:
    recipient = inner_pq if pq else inner
    fields = header_fields(issuer=central, recipient=recipient.public, payload_length=1)
    header = cbor2.dumps(fields)
    for ciphertext in (b"", b"\x00", b"\x00" * 31, b"\x00" * 48, b"\x00" * 1200):
        with pytest.raises(InvalidObject):
            open_(resign(header, ciphertext, central), central, recipient)
