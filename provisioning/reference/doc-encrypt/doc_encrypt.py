"""Reference service ``doc-encrypt``: password-based encryption of a document.

Theory of operation
-------------------
The password is normalised (Unicode NFC, so the same password typed on two
keyboards gives the same key) and stretched with **scrypt** into 48 bytes: a
256-bit AES key and a 128-bit *password verifier*.  The document is cut into
chunks of 64 KiB, each sealed with **AES-256-GCM** under its own nonce; the
construction is the STREAM scheme (Hoang, Reyhanitabar, Rogaway, Vizar 2015),
which lets arbitrarily large files be processed chunk by chunk and makes
truncation, reordering and splicing detectable:

    nonce(chunk i) = prefix (7 random bytes) | i (uint32, big-endian) | final (1 byte)

``final`` is 1 on the last chunk only, so dropping whole chunks from the end
leaves a last chunk sealed with final = 0, which fails to open.  Every chunk
authenticates the whole header as associated data, so changing a parameter,
the salt or the verifier is detected too.

Container, version 1 (all integers big-endian)::

    off size field
      0    4 magic         b"OGDE"
      4    1 version       1
      5    1 log2_n        scrypt cost N = 2**log2_n      (default 15)
      6    1 r             scrypt block size               (default 8)
      7    1 p             scrypt parallelism              (default 1)
      8    1 log2_chunk    plaintext chunk size 2**k bytes (default 16: 64 KiB)
      9   16 salt          random, per document
     25    7 nonce prefix  random, per document
     32   16 verifier      scrypt output bytes 32..47
     48    . chunks        ciphertext | 16-byte GCM tag, each chunk but the last
                           exactly 2**log2_chunk + 16 bytes; the last 16..that

An empty document is one empty final chunk (16 bytes: the tag).  The scrypt
defaults (N = 2**15, r = 8, p = 1: 32 MiB, about 0.1 s on a desktop) follow
the figures RFC 7914 and current guidance give for interactive logins.

Decryption compares the verifier first (constant time): a mismatch means a
wrong password, reported as such; a verifier that matches with a chunk that
fails to open means the container was damaged or altered.  Both are
ValueErrors with a short message for the user; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import unicodedata
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"OGDE"
VERSION = 1
HEADER = struct.Struct(">4sBBBBB16s7s16s")
HEADER_SIZE = HEADER.size  # 48
TAG_SIZE = 16
KEY_SIZE = 32
VERIFIER_SIZE = 16

DEFAULT_LOG2_N = 15
DEFAULT_R = 8
DEFAULT_P = 1
DEFAULT_LOG2_CHUNK = 16

#: Bounds accepted when decrypting, so a hostile header cannot make scrypt
#: allocate gigabytes or spin for minutes: 128 * r * N bytes at most 256 MiB.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
LOG2_N_RANGE = range(10, 21)
R_RANGE = range(1, 33)
P_RANGE = range(1, 17)
LOG2_CHUNK_RANGE = range(10, 25)
#: The chunk counter is 32 bits; the last value is never reached in practice.
MAX_CHUNKS = 2**32 - 1


def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    n = 1 << log2_n
    need = 128 * r * n
    if need > MAX_SCRYPT_MEMORY:
        raise ValueError("the container asks for more scrypt memory than allowed")
    out = hashlib.scrypt(
        unicodedata.normalize("NFC", password).encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=2 * need + 1024 * 1024,
        dklen=KEY_SIZE + VERIFIER_SIZE,
    )
    return out[:KEY_SIZE], out[KEY_SIZE:]


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def encrypt(
    document: bytes,
    password: str,
    *,
    log2_n: int = DEFAULT_LOG2_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    log2_chunk: int = DEFAULT_LOG2_CHUNK,
) -> bytes:
    """Return the version-1 container holding ``document`` sealed under ``password``.

    Raises ValueError for an empty password or parameters out of range.
    """
    if not password:
        raise ValueError("the password must not be empty")
    _check_params(log2_n, r, p, log2_chunk)
    salt = os.urandom(16)
    prefix = os.urandom(7)
    key, verifier = _derive(password, salt, log2_n, r, p)
    header = HEADER.pack(MAGIC, VERSION, log2_n, r, p, log2_chunk, salt, prefix, verifier)
    aead = AESGCM(key)
    size = 1 << log2_chunk
    view = memoryview(document)
    count = max(1, -(-len(document) // size))
    if count > MAX_CHUNKS:
        raise ValueError("the document is too large for this container")
    out = [header]
    for i in range(count):
        chunk = view[i * size : (i + 1) * size]
        out.append(aead.encrypt(_nonce(prefix, i, i == count - 1), bytes(chunk), header))
    return b"".join(out)


def decrypt(container: bytes, password: str) -> bytes:
    """Return the document sealed in ``container``.

    Raises ValueError: "wrong password" when the verifier does not match, a
    message saying the container is damaged when a chunk fails to open or
    the container is truncated, and a message naming the problem for a
    container that is not one (bad magic, unknown version, bad parameters).
    """
    if len(container) < HEADER_SIZE + TAG_SIZE:
        raise ValueError("not an encrypted document: too short")
    magic, version, log2_n, r, p, log2_chunk, salt, prefix, verifier = HEADER.unpack_from(container)
    if magic != MAGIC:
        raise ValueError("not an encrypted document (bad magic)")
    if version != VERSION:
        raise ValueError(f"unsupported container version {version}")
    _check_params(log2_n, r, p, log2_chunk)
    key, expected = _derive(password, salt, log2_n, r, p)
    if not hmac.compare_digest(expected, verifier):
        raise ValueError("wrong password")
    header = bytes(container[:HEADER_SIZE])
    aead = AESGCM(key)
    sealed = 1 << log2_chunk
    sealed += TAG_SIZE
    body = memoryview(container)[HEADER_SIZE:]
    count = max(1, -(-len(body) // sealed))
    if len(body) - (count - 1) * sealed < TAG_SIZE:
        raise ValueError("the encrypted document is damaged (truncated)")
    out = []
    for i in range(count):
        chunk = bytes(body[i * sealed : (i + 1) * sealed])
        try:
            out.append(aead.decrypt(_nonce(prefix, i, i == count - 1), chunk, header))
        except InvalidTag:
            raise ValueError(
                "the encrypted document is damaged or was modified "
                f"(chunk {i + 1} of {count} fails authentication)"
            ) from None
    return b"".join(out)


def _check_params(log2_n: int, r: int, p: int, log2_chunk: int) -> None:
    if log2_n not in LOG2_N_RANGE or r not in R_RANGE or p not in P_RANGE:
        raise ValueError(f"scrypt parameters out of range (log2 N={log2_n}, r={r}, p={p})")
    if log2_chunk not in LOG2_CHUNK_RANGE:
        raise ValueError(f"chunk size 2**{log2_chunk} out of range")


def run(params: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    """Service entry point: ``params = {"op": "encrypt"|"decrypt", "password": str}``.

    Returns ``({"op": op, "bytes": len(output)}, output)``.  Raises ValueError
    with a message for the user on bad parameters, a wrong password or a
    damaged container.
    """
    op = params.get("op")
    password = params.get("password")
    if not isinstance(password, str) or not password:
        raise ValueError("password must be a non-empty string")
    if op == "encrypt":
        out = encrypt(data, password)
    elif op == "decrypt":
        out = decrypt(data, password)
    else:
        raise ValueError("op must be 'encrypt' or 'decrypt'")
    return {"op": op, "bytes": len(out)}, out
