"""The trust layer: the only package that imports ``cryptography.hazmat``.

A small, safe recipe layer in the spirit of ``cryptography.fernet``:

* :mod:`.keys`       Ed25519 signing keys, HPKE recipient keys, key ids, key files
* :mod:`.sealed`     signed, HPKE-sealed, compressed objects from central
* :mod:`.freshness`  anti-rollback registry, expiring sync metadata (TUF attacks)
* :mod:`.signed`     signed statements: usage records, challenges (gateway to central)
* :mod:`.apikeys`    API keys: issued once, stored as hashes, found by their hash
* :mod:`.tls`        the per-gateway CA and the LAN API's server certificate
* :mod:`.errors`     the error tree (under ``CryptoError``)

The threat model and key file layout are in ``docs/security.md``; the byte
layout of sealed objects in ``docs/wire-protocol.md`` section 4.  The most
used names are re-exported here.
"""

from __future__ import annotations

from firmware.common.crypto.errors import (
    ExpiredObject,
    InsecureKeyFile,
    InvalidApiKey,
    InvalidObject,
    InvalidSignature,
    KeyFileError,
    RollbackError,
    StaleMetadata,
)
from firmware.common.crypto.keys import (
    HpkeSuite,
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    VerifyKey,
    key_id_of,
)
from firmware.common.crypto.sealed import Compression, Header, Kind, Opened, open_sealed, seal

__all__ = [
    "Compression",
    "ExpiredObject",
    "Header",
    "HpkeSuite",
    "InsecureKeyFile",
    "InvalidApiKey",
    "InvalidObject",
    "InvalidSignature",
    "KeyFileError",
    "Kind",
    "Opened",
    "RecipientKey",
    "RecipientPublicKey",
    "RollbackError",
    "SigningKey",
    "StaleMetadata",
    "VerifyKey",
    "key_id_of",
    "open_sealed",
    "seal",
]
