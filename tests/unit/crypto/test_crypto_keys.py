"""Keys: signatures, key ids, file formats and modes, refusals."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from firmware.common.crypto.errors import InsecureKeyFile, InvalidSignature, KeyFileError
from firmware.common.crypto.keys import (
    HpkeSuite,
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    VerifyKey,
    key_id_of,
)
from firmware.common.errors import CryptoError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

VECTORS = Path(__file__).parents[2] / "vectors" / "sealed" / "sealed_vectors.json"

# RFC 8032 section 7.1, TEST 1 (empty message).
RFC8032_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC8032_SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_rfc8032_test_vector_1() -> None:
    key = SigningKey.from_seed(bytes.fromhex(RFC8032_SEED))
    assert key.public.raw.hex() == RFC8032_PUBLIC
    assert key.sign(b"").hex() == RFC8032_SIGNATURE
    key.public.verify(bytes.fromhex(RFC8032_SIGNATURE), b"")


def test_stored_signature_and_key_id_vectors() -> None:
    doc = json.loads(VECTORS.read_text())
    key = SigningKey.from_seed(bytes.fromhex(doc["issuer_seed_hex"]))
    assert key.public.raw.hex() == doc["issuer_public_hex"]
    assert key.key_id == doc["issuer_key_id"]
    msg = bytes.fromhex(doc["signature"]["message_hex"])
    assert key.sign(msg).hex() == doc["signature"]["signature_hex"]
    for rec in doc["recipients"].values():
        rkey = RecipientKey.from_raw(bytes.fromhex(rec["secret_hex"]))
        assert rkey.public.raw.hex() == rec["public_hex"]
        assert rkey.key_id == rec["key_id"]
        assert rkey.suite.name == rec["suite"]


def test_sign_verify_and_every_failure() -> None:
    key = SigningKey.generate()
    sig = key.sign(b"data")
    key.public.verify(sig, b"data")
    with pytest.raises(InvalidSignature):
        key.public.verify(sig, b"Data")
    with pytest.raises(InvalidSignature):
        key.public.verify(sig[:-1], b"data")
    with pytest.raises(InvalidSignature):
        key.public.verify(bytes([sig[0] ^ 1]) + sig[1:], b"data")
    with pytest.raises(InvalidSignature):
        SigningKey.generate().public.verify(sig, b"data")
    assert issubclass(InvalidSignature, CryptoError)


def test_key_id_is_truncated_sha256_of_raw_public_key() -> None:
    key = SigningKey.generate()
    assert key.key_id == hashlib.sha256(key.public.raw).hexdigest()[:32]
    assert key.key_id == key.public.key_id == key_id_of(key.public.raw)
    assert len(key.key_id) == 32
    assert VerifyKey.from_raw(key.public.raw) == key.public
    assert hash(VerifyKey.from_raw(key.public.raw)) == hash(key.public)


def test_verify_key_from_raw_rejects_wrong_length() -> None:
    with pytest.raises(KeyFileError):
        VerifyKey.from_raw(b"\x01" * 31)


@pytest.mark.parametrize("pq", [False, True])
def test_recipient_key_roundtrip_and_suite(tmp_path: Path, pq: bool) -> None:
    key = RecipientKey.generate(pq=pq)
    assert key.suite is (
        HpkeSuite.MLKEM768X25519_HKDF_SHA256_CHACHA20POLY1305
        if pq
        else HpkeSuite.X25519_HKDF_SHA256_CHACHA20POLY1305
    )
    key.save(tmp_path / "k")
    key.public.save(tmp_path / "k.pub")
    loaded = RecipientKey.load(tmp_path / "k")
    pub = RecipientPublicKey.load(tmp_path / "k.pub")
    assert loaded.key_id == key.key_id == pub.key_id
    assert RecipientPublicKey.from_raw(pub.raw) == pub
    sealed = pub.hpke_seal(b"secret", b"info")
    assert loaded.hpke_open(sealed, b"info") == b"secret"


def test_recipient_raw_lengths_checked() -> None:
    with pytest.raises(KeyFileError):
        RecipientKey.from_raw(b"\x00" * 33)
    with pytest.raises(KeyFileError):
        RecipientPublicKey.from_raw(b"\x00" * 33)


def test_signing_key_files_modes_and_roundtrip(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "c.key")
    key.public.save(tmp_path / "c.pub")
    assert (tmp_path / "c.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "c.pub").stat().st_mode & 0o777 == 0o644
    assert SigningKey.load(tmp_path / "c.key").key_id == key.key_id
    assert VerifyKey.load(tmp_path / "c.pub") == key.public
    assert (tmp_path / "c.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_missing_file_is_a_key_file_error(tmp_path: Path) -> None:
    for load in (SigningKey.load, VerifyKey.load, RecipientKey.load, RecipientPublicKey.load):
        with pytest.raises(KeyFileError, match="no key file"):
            load(tmp_path / "absent")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "k")
    os.chmod(tmp_path / "k", mode)
    with pytest.raises(InsecureKeyFile):
        SigningKey.load(tmp_path / "k")
    RecipientKey.generate().save(tmp_path / "r")
    os.chmod(tmp_path / "r", mode)
    with pytest.raises(InsecureKeyFile):
        RecipientKey.load(tmp_path / "r")


def test_wrong_key_type_is_a_key_file_error(tmp_path: Path) -> None:
    SigningKey.generate().save(tmp_path / "ed.key")
    SigningKey.generate().public.save(tmp_path / "ed.pub")
    RecipientKey.generate().save(tmp_path / "x.key")
    RecipientKey.generate().public.save(tmp_path / "x.pub")
    RecipientKey.generate(pq=True).save(tmp_path / "h.key")
    (tmp_path / "junk").write_bytes(b"not a key at all")
    os.chmod(tmp_path / "junk", 0o600)
    with pytest.raises(KeyFileError):
        SigningKey.load(tmp_path / "x.key")
    with pytest.raises(KeyFileError):
        SigningKey.load(tmp_path / "h.key")
    with pytest.raises(KeyFileError):
        RecipientKey.load(tmp_path / "ed.key")
    with pytest.raises(KeyFileError):
        VerifyKey.load(tmp_path / "x.pub")
    with pytest.raises(KeyFileError):
        RecipientPublicKey.load(tmp_path / "ed.pub")
    with pytest.raises(KeyFileError):
        VerifyKey.load(tmp_path / "ed.key")
    for load in (SigningKey.load, VerifyKey.load, RecipientKey.load, RecipientPublicKey.load):
        with pytest.raises(KeyFileError):
            load(tmp_path / "junk")
    with pytest.raises(KeyFileError):
        VerifyKey.load(tmp_path)  # a directory


def test_oversized_key_file_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.pub"
    big.write_bytes(b"A" * (64 * 1024 + 1))
    with pytest.raises(KeyFileError, match="too large"):
        VerifyKey.load(big)


def test_reprs_never_show_secrets() -> None:
    key = SigningKey.generate()
    rkey = RecipientKey.generate(pq=True)
    for obj, secret in ((key, key.to_pem()), (rkey, rkey.to_pem())):
        text = repr(obj)
        assert "key_id" in text
        body = b"".join(secret.splitlines()[1:-1]).decode()
        assert body[:16] not in text
