"""Signed statements: a payload signed, not encrypted, for a named purpose.

Sealed objects carry what central sends a gateway.  The other direction needs
only authenticity: the inner module signs usage records for central, and the
outer module proves its identity to central by signing a challenge.  Both use
one small format, so no caller invents its own signature input:

    statement = CBOR [context: tstr, signer: bstr(16), created: uint,
                      payload: bstr, signature: bstr(64)]
    signature = Ed25519(signer key,
                        "optogate signed statement v1" 0x00
                        ‖ CBOR [context, signer, created, payload])

``context`` names the purpose (``"usage-records"``, ``"outer-auth"``...): a
signature made for one purpose never verifies for another, and never as a
sealed object (a different context string prefixes those).  ``signer`` is the
key id, so a verifier holding many keys (central) can pick the right one.

Pure: no clock; ``created`` is the caller's (trusted) time, and judging its
age is the caller's policy.  Failures are the vague :class:`InvalidObject`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from firmware.common.crypto.errors import InvalidObject, InvalidSignature
from firmware.common.crypto.keys import (
    ED25519_SIGNATURE_BYTES,
    KEY_ID_BYTES,
    SigningKey,
    VerifyKey,
)

#: Domain separation from every other signature the same key makes.
STATEMENT_CONTEXT = b"optogate signed statement v1\x00"

#: A usage batch or a challenge is small; 16 MiB bounds a hostile one.
DEFAULT_MAX_STATEMENT_BYTES = 16 * 1024 * 1024

#: Purpose names are short identifiers.
MAX_CONTEXT_CHARS = 64

_MAX_UINT = 2**63 - 1


@dataclass(frozen=True)
class Statement:
    """A statement whose signature verified."""

    context: str
    signer: str
    created: int
    payload: bytes


def _signed_input(context: str, signer: bytes, created: int, payload: bytes) -> bytes:
    return STATEMENT_CONTEXT + cbor2.dumps([context, signer, created, payload])


def sign_statement(key: SigningKey, *, context: str, created: int, payload: bytes) -> bytes:
    """Return ``payload`` signed by ``key`` for ``context`` at time ``created``.

    Raises ValueError for an empty or over-long context, or a negative time.
    """
    if not 0 < len(context) <= MAX_CONTEXT_CHARS:
        raise ValueError(f"context must be 1..{MAX_CONTEXT_CHARS} characters")
    if type(created) is not int or not 0 <= created <= _MAX_UINT:
        raise ValueError("created must be an integer in 0..2**63-1")
    signer = bytes.fromhex(key.key_id)
    signature = key.sign(_signed_input(context, signer, created, payload))
    return cbor2.dumps([context, signer, created, payload, signature])


def statement_signer(data: bytes) -> str:
    """Return the key id a statement claims to be signed by (unverified!); raise InvalidObject.

    For a verifier that must choose among many keys before calling
    :func:`verify_statement`.
    """
    return _parse(data, DEFAULT_MAX_STATEMENT_BYTES)[1].hex()


def _parse(data: bytes, max_bytes: int) -> tuple[str, bytes, int, bytes, bytes]:
    if len(data) > max_bytes:
        raise InvalidObject("signed statement is not valid")
    try:
        item = cbor2.loads(data)
        canonical = cbor2.dumps(item)
    except Exception as e:  # cbor2 raises many types on hostile input
        raise InvalidObject("signed statement is not valid") from e
    if canonical != data or not isinstance(item, list) or len(item) != 5:
        raise InvalidObject("signed statement is not valid")
    context, signer, created, payload, signature = item
    if not (
        isinstance(context, str)
        and 0 < len(context) <= MAX_CONTEXT_CHARS
        and isinstance(signer, bytes)
        and len(signer) == KEY_ID_BYTES
        and type(created) is int
        and 0 <= created <= _MAX_UINT
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
        and len(signature) == ED25519_SIGNATURE_BYTES
    ):
        raise InvalidObject("signed statement is not valid")
    return context, signer, created, payload, signature


def verify_statement(
    data: bytes,
    key: VerifyKey,
    *,
    context: str,
    max_bytes: int = DEFAULT_MAX_STATEMENT_BYTES,
) -> Statement:
    """Return the statement if ``key`` signed it for ``context``.

    Raises InvalidObject if it is malformed, larger than ``max_bytes``,
    made for another context, claims another signer, or does not verify.
    """
    ctx, signer, created, payload, signature = _parse(data, max_bytes)
    if ctx != context or signer.hex() != key.key_id:
        raise InvalidObject("signed statement is not valid")
    try:
        key.verify(signature, _signed_input(ctx, signer, created, payload))
    except InvalidSignature as e:
        raise InvalidObject("signed statement is not valid") from e
    return Statement(context=ctx, signer=signer.hex(), created=created, payload=payload)
