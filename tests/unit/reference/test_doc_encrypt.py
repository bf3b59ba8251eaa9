"""doc-encrypt: round trips, wrong password, truncation and tampering of the container."""

from __future__ import annotations

import os
import struct

import pytest
from reference_loader import load

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

de = load("doc-encrypt", "doc_encrypt")

#: Cheap scrypt for the tests that are not about the defaults.
FAST = {"log2_n": 10, "r": 8, "p": 1}


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536])
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    doc = os.urandom(size)
    box = de.encrypt(doc, "pässwörd", **FAST)
    assert box[:4] == b"OGDE"
    chunks = max(1, -(-size // 65536))
    assert len(box) == de.HEADER_SIZE + size + 16 * chunks
    assert de.decrypt(box, "pässwörd") == doc


def test_large_document_round_trips_through_the_service_entry() -> None:
    doc = os.urandom(5 * 1024 * 1024 + 123)
    result, box = de.run({"op": "encrypt", "password": "correct horse"}, doc)
    assert result == {"op": "encrypt", "bytes": len(box)}
    assert box[5:8] == bytes([15, 8, 1])  # documented default scrypt parameters
    result, back = de.run({"op": "decrypt", "password": "correct horse"}, box)
    assert back == doc
    assert result["bytes"] == len(doc)


def test_encryption_is_randomised() -> None:
    assert de.encrypt(b"same", "pw", **FAST) != de.encrypt(b"same", "pw", **FAST)


def test_unicode_password_is_normalised() -> None:
    box = de.encrypt(b"doc", "caf\u00e9", **FAST)
    assert de.decrypt(box, "cafe\u0301") == b"doc"


def test_wrong_password_is_a_clean_value_error() -> None:
    box = de.encrypt(b"secret", "right", **FAST)
    with pytest.raises(ValueError, match=r"^wrong password$"):
        de.run({"op": "decrypt", "password": "wrong"}, box)


def test_truncation_at_a_chunk_boundary_is_detected() -> None:
    doc = os.urandom(3 * 1024 + 10)
    box = de.encrypt(doc, "pw", log2_chunk=10, **FAST)
    cut = de.HEADER_SIZE + 2 * (1024 + 16)
    with pytest.raises(ValueError, match="damaged or was modified"):
        de.decrypt(box[:cut], "pw")
    with pytest.raises(ValueError, match="damaged"):
        de.decrypt(box[:-1], "pw")
    with pytest.raises(ValueError, match="too short"):
        de.decrypt(box[:50], "pw")


def test_flipped_bits_anywhere_are_detected() -> None:
    box = bytearray(de.encrypt(os.urandom(5000), "pw", log2_chunk=10, **FAST))
    for pos in (9, 30, de.HEADER_SIZE, de.HEADER_SIZE + 1500, len(box) - 1):
        bad = bytearray(box)
        bad[pos] ^= 0x01
        with pytest.raises(ValueError, match=r"wrong password|damaged"):
            de.decrypt(bytes(bad), "pw")


def test_reordered_chunks_are_detected() -> None:
    box = de.encrypt(os.urandom(4096), "pw", log2_chunk=10, **FAST)
    h, n = de.HEADER_SIZE, 1024 + 16
    swapped = box[:h] + box[h + n : h + 2 * n] + box[h : h + n] + box[h + 2 * n :]
    with pytest.raises(ValueError, match="chunk 1 of"):
        de.decrypt(swapped, "pw")


def test_hostile_header_parameters_are_refused() -> None:
    box = bytearray(de.encrypt(b"x", "pw", **FAST))
    box[5] = 30  # N = 2**30: gigabytes of scrypt memory
    with pytest.raises(ValueError, match="out of range"):
        de.decrypt(bytes(box), "pw")
    with pytest.raises(ValueError, match="bad magic"):
        de.decrypt(b"PK\x03\x04" + bytes(100), "pw")
    header = struct.pack(">4sB", b"OGDE", 9) + bytes(100)
    with pytest.raises(ValueError, match="version 9"):
        de.decrypt(header, "pw")


@pytest.mark.parametrize(
    "params",
    [{"op": "compress", "password": "x"}, {"op": "encrypt"}, {"op": "encrypt", "password": ""}],
)
def test_bad_params_are_value_errors(params: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        de.run(params, b"doc")
