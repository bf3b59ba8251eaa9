"""API keys: how LAN callers authenticate to the inner module.

An API key looks like ``og_live_`` followed by 52 lowercase base32 characters
(32 random bytes, 256 bits, from the OS CSPRNG).  The prefix lets secret
scanners and humans recognise a leaked key; base32 survives copy-and-paste,
URLs and case-folding.

Central shows a key once, when it is issued, and from then on keeps only its
**hash**: ``sha256(key)`` as 64 hex digits.  Licences carry these hashes, so
neither central's database nor a gateway's licence set nor a stolen outer
module yields a usable key.  A plain SHA-256 is the right tool here, not a
slow password hash (scrypt, Argon2): those exist to make guessing low-entropy
passwords expensive, but a 256-bit random key cannot be guessed, and a slow
hash would cost the inner module CPU on every request.

A key checked against one hash is compared with :func:`hmac.compare_digest`
(:func:`api_key_matches`).  The inner module finds a key among many by
looking its hash up in an index (``LicenceSet.holding``): the lookup's time
depends only on the digest presented, and nothing it could reveal about the
stored digests yields a key, which would take a SHA-256 preimage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from firmware.common.crypto.errors import InvalidApiKey

#: Marks a production key (a test or sandbox prefix can be added beside it).
API_KEY_PREFIX = "og_live_"

#: 256 bits: beyond any guessing or birthday attack, and the size of the hash.
API_KEY_RANDOM_BYTES = 32

#: base32 of 32 bytes is 52 characters once the padding is stripped.
_BODY_CHARS = 52
_KEY_RE = re.compile(rf"^{API_KEY_PREFIX}[a-z2-7]{{{_BODY_CHARS}}}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class IssuedApiKey:
    """A freshly issued key: show ``secret`` once, store only ``key_hash``."""

    secret: str = field(repr=False)
    key_hash: str


def generate_api_key() -> IssuedApiKey:
    """Return a new random API key and its hash."""
    body = base64.b32encode(secrets.token_bytes(API_KEY_RANDOM_BYTES)).decode("ascii")
    secret = API_KEY_PREFIX + body.rstrip("=").lower()
    return IssuedApiKey(secret=secret, key_hash=hash_api_key(secret))


def is_api_key_shaped(candidate: str) -> bool:
    """Return True if ``candidate`` has the form of an API key (says nothing of validity)."""
    return bool(_KEY_RE.fullmatch(candidate))


def hash_api_key(key: str) -> str:
    """Return the stored form of ``key``: SHA-256 as 64 lowercase hex digits.

    Raises InvalidApiKey if ``key`` does not have the form of an API key.
    """
    if not isinstance(key, str) or not is_api_key_shaped(key):
        raise InvalidApiKey("not an optogate API key")
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def is_key_hash(value: str) -> bool:
    """Return True if ``value`` has the form of a stored key hash."""
    return isinstance(value, str) and bool(_HASH_RE.fullmatch(value))


def hashes_equal(a: str, b: str) -> bool:
    """Return True if two key hashes are equal, in time independent of where they differ."""
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))


def api_key_matches(key: str, key_hash: str) -> bool:
    """Return True if ``key`` hashes to ``key_hash`` (False for a malformed key)."""
    try:
        return hashes_equal(hash_api_key(key), key_hash)
    except InvalidApiKey:
        return False
