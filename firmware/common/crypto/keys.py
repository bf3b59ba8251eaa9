"""Keys of the trust model: what they are, how they are named, how they are stored.

Three kinds of key pair exist (see ``docs/security.md``):

* **Signing keys** (Ed25519): central signs sealed objects with one, each
  inner module signs usage records with its own, each outer module
  authenticates to central with its own.  :class:`SigningKey` /
  :class:`VerifyKey`.
* **Recipient keys** (HPKE, RFC 9180): each inner module has one, and central
  seals bundles and licences to it.  Either X25519 (the default) or the
  ML-KEM-768 + X25519 hybrid, which stays confidential even against an
  attacker who records today's traffic and owns a quantum computer later.
  :class:`RecipientKey` / :class:`RecipientPublicKey`.
* TLS keys for the LAN API live in :mod:`firmware.common.crypto.tls`.

**Key ids** name a public key: the first 16 bytes of SHA-256 over its raw
public bytes, written as 32 lowercase hex digits (see :func:`key_id_of`).
Sixteen bytes make an accidental collision between any two keys ever made
negligible (birthday bound 2^64), and an id is only a name: every use also
verifies a signature or a decryption with the full key.

**Files.**  Ed25519 and X25519 keys are standard PEM (PKCS#8 ``PRIVATE KEY``,
SubjectPublicKeyInfo ``PUBLIC KEY``), so ``openssl pkey`` reads them.  The
hybrid key has no standard file format yet, so it is PEM-armoured raw bytes:

* ``OPTOGATE MLKEM768X25519 PRIVATE KEY``: 64-byte ML-KEM-768 seed (d ‖ z,
  FIPS 203) followed by the 32-byte X25519 private key;
* ``OPTOGATE MLKEM768X25519 PUBLIC KEY``: the 1,184-byte ML-KEM-768
  encapsulation key followed by the 32-byte X25519 public key.

Private key files are written mode 0600 through
:func:`~firmware.common.store.atomic.atomic_write`; loading one that group or
others may read or write raises :class:`InsecureKeyFile` rather than trusting
a secret that may already have leaked.  Reprs never show secret material.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Self

from cryptography.exceptions import InvalidSignature as _HazmatInvalidSignature
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from firmware.common.crypto.errors import (
    InsecureKeyFile,
    InvalidObject,
    InvalidSignature,
    KeyFileError,
)
from firmware.common.store.atomic import PRIVATE_MODE, atomic_write

#: Bytes of SHA-256 kept in a key id: 128 bits, see the module docstring.
KEY_ID_BYTES = 16

#: Public key files are not secret; anyone may read them.
PUBLIC_MODE = 0o644

#: Key files are a few hundred bytes (a hybrid public key ~1.7 KB of PEM);
#: refusing anything larger keeps a wrong path from reading a disk image.
MAX_KEY_FILE_BYTES = 64 * 1024

#: Permission bits that must be clear on a private key file (group/other).
_INSECURE_BITS = stat.S_IRWXG | stat.S_IRWXO

ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
X25519_PUBLIC_BYTES = 32
MLKEM768_PUBLIC_BYTES = 1184
MLKEM768_SEED_BYTES = 64
HYBRID_PUBLIC_BYTES = MLKEM768_PUBLIC_BYTES + X25519_PUBLIC_BYTES
HYBRID_PRIVATE_BYTES = MLKEM768_SEED_BYTES + 32

_HYBRID_PRIVATE_LABEL = "OPTOGATE MLKEM768X25519 PRIVATE KEY"
_HYBRID_PUBLIC_LABEL = "OPTOGATE MLKEM768X25519 PUBLIC KEY"
_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END \1-----", re.DOTALL
)


class HpkeSuite(enum.IntEnum):
    """The HPKE cipher suites a recipient key can use (the number is on the wire).

    Both use HKDF-SHA256 and ChaCha20-Poly1305: ChaCha20 is fast in software
    on a Raspberry Pi without AES instructions (Pi 3/4), and constant-time.
    """

    X25519_HKDF_SHA256_CHACHA20POLY1305 = 1
    MLKEM768X25519_HKDF_SHA256_CHACHA20POLY1305 = 2

    def _suite(self) -> hpke.Suite:
        kem = (
            hpke.KEM.X25519
            if self is HpkeSuite.X25519_HKDF_SHA256_CHACHA20POLY1305
            else hpke.KEM.MLKEM768_X25519
        )
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def key_id_of(raw_public: bytes) -> str:
    """Return the key id of a raw public key: hex of SHA-256(raw)[:16], 32 characters."""
    return hashlib.sha256(raw_public).digest()[:KEY_ID_BYTES].hex()


# --------------------------------------------------------------------------- files


def _read_key_file(path: Path | str, *, private: bool) -> bytes:
    """Return the bytes of a key file; raise KeyFileError / InsecureKeyFile."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError as e:
        raise KeyFileError(f"no key file at {p}") from e
    except OSError as e:
        raise KeyFileError(f"cannot read key file {p}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{p} is not a regular file")
    if private and st.st_mode & _INSECURE_BITS:
        raise InsecureKeyFile(
            f"private key file {p} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"others may have read it: run chmod 600 {p} after checking it has not leaked"
        )
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{p} is too large to be a key file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read key file {p}: {e.strerror or e}") from e


def _pem_armour(label: str, body: bytes) -> bytes:
    text = base64.encodebytes(body).decode("ascii")
    return f"-----BEGIN {label}-----\n{text}-----END {label}-----\n".encode("ascii")


def _pem_unarmour(data: bytes, label: str, what: str) -> bytes:
    m = _PEM_RE.search(data)
    if m is None or m.group(1).decode("ascii") != label:
        raise KeyFileError(f"not {what} (expected a PEM block labelled {label!r})")
    try:
        return base64.b64decode(b"".join(m.group(2).split()), validate=True)
    except binascii.Error as e:
        raise KeyFileError(f"not {what}: bad base64") from e


def _load_pem_private(data: bytes, what: str) -> object:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"not {what}: {e}") from e


def _load_pem_public(data: bytes, what: str) -> object:
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"not {what}: {e}") from e


# --------------------------------------------------------------------------- signing


class VerifyKey:
    """An Ed25519 public key: verifies signatures, has a key id."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: ed25519.Ed25519PublicKey) -> None:
        self._key = key
        self._raw = key.public_bytes_raw()

    @classmethod
    def from_raw(cls, raw: bytes) -> Self:
        """Return the key for 32 raw bytes; raise KeyFileError if they are not one."""
        if len(raw) != ED25519_PUBLIC_BYTES:
            raise KeyFileError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        try:
            return cls(ed25519.Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as e:
            raise KeyFileError("not an Ed25519 public key") from e

    @classmethod
    def from_pem(cls, data: bytes) -> Self:
        """Return the key in SubjectPublicKeyInfo PEM; raise KeyFileError."""
        key = _load_pem_public(data, "an Ed25519 public key")
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise KeyFileError(f"not an Ed25519 public key but {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Return the key stored at ``path``; raise KeyFileError if missing or wrong."""
        return cls.from_pem(_read_key_file(path, private=False))

    def to_pem(self) -> bytes:
        """Return the SubjectPublicKeyInfo PEM encoding."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, path: Path | str) -> None:
        """Write the key as PEM (mode 0644) atomically; raise StorageError on failure."""
        atomic_write(path, self.to_pem(), PUBLIC_MODE)

    @property
    def raw(self) -> bytes:
        """The 32 raw public key bytes."""
        return self._raw

    @property
    def key_id(self) -> str:
        """This key's id (:func:`key_id_of` the raw bytes)."""
        return key_id_of(self._raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return None if ``signature`` is this key's signature of ``data``.

        Raises InvalidSignature otherwise (including a signature of the wrong length).
        """
        if len(signature) != ED25519_SIGNATURE_BYTES:
            raise InvalidSignature("signature does not verify")
        try:
            self._key.verify(signature, data)
        except _HazmatInvalidSignature as e:
            raise InvalidSignature("signature does not verify") from e

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self.key_id!r})"


class SigningKey:
    """An Ed25519 private key.  Its repr shows only the key id."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self._public = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> Self:
        """Return a new random key (from the OS CSPRNG)."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Self:
        """Return the key for a 32-byte RFC 8032 seed (test vectors); raise KeyFileError."""
        if len(seed) != 32:
            raise KeyFileError("an Ed25519 seed is 32 bytes")
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> Self:
        """Return the key in PKCS#8 PEM; raise KeyFileError."""
        key = _load_pem_private(data, "an Ed25519 private key")
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"not an Ed25519 private key but {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Return the key stored at ``path``.

        Raises KeyFileError if missing or not an Ed25519 private key, and
        InsecureKeyFile if group or others have access to the file.
        """
        return cls.from_pem(_read_key_file(path, private=True))

    def to_pem(self) -> bytes:
        """Return the unencrypted PKCS#8 PEM encoding (secret!)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: Path | str) -> None:
        """Write the key as PEM, mode 0600, atomically; raise StorageError on failure."""
        atomic_write(path, self.to_pem(), PRIVATE_MODE)

    @property
    def public(self) -> VerifyKey:
        """The matching public key."""
        return self._public

    @property
    def key_id(self) -> str:
        """The key id of the public key."""
        return self._public.key_id

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data`` (deterministic)."""
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


# --------------------------------------------------------------------------- HPKE


class RecipientPublicKey:
    """The public half of an HPKE recipient key: X25519 or ML-KEM-768 + X25519."""

    __slots__ = ("_key", "_raw", "_suite")

    def __init__(
        self, key: x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey, raw: bytes
    ) -> None:
        self._key = key
        self._raw = raw
        self._suite = (
            HpkeSuite.X25519_HKDF_SHA256_CHACHA20POLY1305
            if isinstance(key, x25519.X25519PublicKey)
            else HpkeSuite.MLKEM768X25519_HKDF_SHA256_CHACHA20POLY1305
        )

    @classmethod
    def from_raw(cls, raw: bytes) -> Self:
        """Return the key for its raw bytes (32: X25519, 1,216: hybrid); raise KeyFileError."""
        try:
            if len(raw) == X25519_PUBLIC_BYTES:
                return cls(x25519.X25519PublicKey.from_public_bytes(raw), raw)
            if len(raw) == HYBRID_PUBLIC_BYTES:
                pq = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:MLKEM768_PUBLIC_BYTES])
                classic = x25519.X25519PublicKey.from_public_bytes(raw[MLKEM768_PUBLIC_BYTES:])
                return cls(hpke.MLKEM768X25519PublicKey(pq, classic), raw)
        except ValueError as e:
            raise KeyFileError("not an HPKE recipient public key") from e
        raise KeyFileError(f"an HPKE recipient public key is 32 or 1216 bytes, not {len(raw)}")

    @classmethod
    def from_pem(cls, data: bytes) -> Self:
        """Return the key from its PEM file content; raise KeyFileError."""
        if f"BEGIN {_HYBRID_PUBLIC_LABEL}".encode() in data:
            return cls.from_raw(_pem_unarmour(data, _HYBRID_PUBLIC_LABEL, "a hybrid public key"))
        key = _load_pem_public(data, "an X25519 public key")
        if not isinstance(key, x25519.X25519PublicKey):
            raise KeyFileError(f"not an X25519 public key but {type(key).__name__}")
        return cls(key, key.public_bytes_raw())

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Return the key stored at ``path``; raise KeyFileError if missing or wrong."""
        return cls.from_pem(_read_key_file(path, private=False))

    def to_pem(self) -> bytes:
        """Return the PEM encoding (standard for X25519, armoured raw for the hybrid)."""
        if isinstance(self._key, x25519.X25519PublicKey):
            return self._key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return _pem_armour(_HYBRID_PUBLIC_LABEL, self._raw)

    def save(self, path: Path | str) -> None:
        """Write the key as PEM (mode 0644) atomically; raise StorageError on failure."""
        atomic_write(path, self.to_pem(), PUBLIC_MODE)

    @property
    def raw(self) -> bytes:
        """The raw public bytes (X25519: 32; hybrid: ML-KEM-768 key ‖ X25519 key)."""
        return self._raw

    @property
    def key_id(self) -> str:
        """This key's id (:func:`key_id_of` the raw bytes)."""
        return key_id_of(self._raw)

    @property
    def suite(self) -> HpkeSuite:
        """The HPKE suite objects sealed to this key use."""
        return self._suite

    def hpke_seal(self, plaintext: bytes, info: bytes) -> bytes:
        """Return HPKE base-mode ``enc ‖ ciphertext`` of ``plaintext`` bound to ``info``."""
        return self._suite._suite().encrypt(plaintext, self._key, info=info)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipientPublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"RecipientPublicKey(key_id={self.key_id!r}, suite={self._suite.name})"


class RecipientKey:
    """An HPKE recipient private key (X25519, or ML-KEM-768 + X25519 when ``pq``)."""

    __slots__ = ("_key", "_public", "_secret")

    def __init__(
        self,
        key: x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey,
        public: RecipientPublicKey,
        secret: bytes,
    ) -> None:
        self._key = key
        self._public = public
        self._secret = secret

    @classmethod
    def generate(cls, *, pq: bool = False) -> Self:
        """Return a new random key; ``pq`` selects the ML-KEM-768 + X25519 hybrid."""
        if pq:
            return cls.from_raw(os.urandom(HYBRID_PRIVATE_BYTES))
        return cls.from_raw(os.urandom(32))

    @classmethod
    def from_raw(cls, secret: bytes) -> Self:
        """Return the key for raw secret bytes (32: X25519, 96: hybrid seed ‖ X25519).

        Raises KeyFileError for any other length.
        """
        if len(secret) == 32:
            classic = x25519.X25519PrivateKey.from_private_bytes(secret)
            pub = classic.public_key()
            return cls(classic, RecipientPublicKey(pub, pub.public_bytes_raw()), secret)
        if len(secret) == HYBRID_PRIVATE_BYTES:
            pq = mlkem.MLKEM768PrivateKey.from_seed_bytes(secret[:MLKEM768_SEED_BYTES])
            classic = x25519.X25519PrivateKey.from_private_bytes(secret[MLKEM768_SEED_BYTES:])
            raw_pub = pq.public_key().public_bytes_raw() + classic.public_key().public_bytes_raw()
            key = hpke.MLKEM768X25519PrivateKey(pq, classic)
            return cls(key, RecipientPublicKey(key.public_key(), raw_pub), secret)
        raise KeyFileError(f"an HPKE recipient private key is 32 or 96 bytes, not {len(secret)}")

    @classmethod
    def from_pem(cls, data: bytes) -> Self:
        """Return the key from its PEM file content; raise KeyFileError."""
        if f"BEGIN {_HYBRID_PRIVATE_LABEL}".encode() in data:
            secret = _pem_unarmour(data, _HYBRID_PRIVATE_LABEL, "a hybrid private key")
            if len(secret) != HYBRID_PRIVATE_BYTES:
                raise KeyFileError("not a hybrid private key: wrong length")
            return cls.from_raw(secret)
        key = _load_pem_private(data, "an X25519 private key")
        if not isinstance(key, x25519.X25519PrivateKey):
            raise KeyFileError(f"not an X25519 private key but {type(key).__name__}")
        return cls.from_raw(key.private_bytes_raw())

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Return the key stored at ``path``.

        Raises KeyFileError if missing or not a recipient key, and
        InsecureKeyFile if group or others have access to the file.
        """
        return cls.from_pem(_read_key_file(path, private=True))

    def to_pem(self) -> bytes:
        """Return the PEM encoding (secret!)."""
        if isinstance(self._key, x25519.X25519PrivateKey):
            return self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        return _pem_armour(_HYBRID_PRIVATE_LABEL, self._secret)

    def save(self, path: Path | str) -> None:
        """Write the key as PEM, mode 0600, atomically; raise StorageError on failure."""
        atomic_write(path, self.to_pem(), PRIVATE_MODE)

    @property
    def public(self) -> RecipientPublicKey:
        """The matching public key."""
        return self._public

    @property
    def key_id(self) -> str:
        """The key id of the public key."""
        return self._public.key_id

    @property
    def suite(self) -> HpkeSuite:
        """The HPKE suite of this key."""
        return self._public.suite

    def hpke_open(self, sealed: bytes, info: bytes) -> bytes:
        """Return the plaintext of HPKE ``enc ‖ ciphertext`` bound to ``info``.

        Raises InvalidObject if it does not decrypt (wrong key, wrong info, tampered).
        """
        try:
            return self.suite._suite().decrypt(sealed, self._key, info=info)
        except (InvalidTag, ValueError) as e:
            raise InvalidObject("sealed object is not valid") from e

    def __repr__(self) -> str:
        return f"RecipientKey(key_id={self.key_id!r}, suite={self.suite.name})"
