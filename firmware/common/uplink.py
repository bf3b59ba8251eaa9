"""The gateway protocol's shared formats: what the outer, the inner module and central agree on.

The uplink (outer module -> central) is the framed session of
``docs/wire-protocol.md`` with central in the SERVER role.  This module holds
the three byte formats both ends must compute identically, pure and without
I/O:

**Authentication transcript.**  The outer module sends ``AuthBegin(gateway_id)``;
central answers ``AuthChallenge(nonce)`` with a fresh random nonce; the outer
module answers ``AuthProof(signature)``, an Ed25519 signature by its
``outer/signing.key`` over::

    AUTH_CONTEXT ‖ uint16_be(len(gateway_id)) ‖ gateway_id (UTF-8)
                 ‖ uint8(len(nonce)) ‖ nonce ‖ central key id (16 raw bytes)

The context string keeps the signature from being valid as anything else the
key might sign; the length prefixes make the split unambiguous; the central
key id binds the proof to the central the outer module meant to talk to, so a
hostile server cannot relay a challenge from the real central.  Central
verifies with the key registered for that gateway and answers ``AuthOk``.

**Usage batch** (the ``batch`` of ``UsageReport``), made and signed by the
inner module's ``inner/signing.key``: the canonical CBOR array
``[body, signature]``, where ``body`` is the canonical CBOR of::

    {"format": 1, "gateway": tstr, "batch_id": tstr (1..128 bytes),
     "created": uint, "records": [record...]}
    record = {"at": uint (Unix s), "service": tstr, "licence": tstr,
              "credential": tstr (SHA-256 hex of the API key), "units": uint}

and ``signature = Ed25519(USAGE_CONTEXT ‖ body)``.  The outer module relays
it unchanged; it cannot forge records because it lacks the inner key.

**Usage acknowledgement**: the payload of a sealed object of kind
``USAGE_ACK`` (subject = gateway name), canonical CBOR
``{"format": 1, "gateway": tstr, "batch_id": tstr, "sha256": bstr(32), "records": uint}``,
where ``sha256`` is over the batch bytes as received.  The ``UsageAck``
reply carries it in ``sealed``; the inner module drops the batch only once
the sealed ack opens and names it.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Final

import cbor2

from firmware.common.crypto.errors import InvalidSignature
from firmware.common.crypto.keys import SigningKey, VerifyKey
from firmware.common.errors import CryptoError, MessageError

__all__ = [
    "AUTH_CONTEXT",
    "USAGE_CONTEXT",
    "InvalidUsageBatch",
    "UsageAckPayload",
    "UsageBatch",
    "UsageRecord",
    "auth_transcript",
    "decode_usage_ack",
    "encode_usage_ack",
    "sign_usage_batch",
    "verify_usage_batch",
]

#: Domain separation of the outer module's authentication signature.
AUTH_CONTEXT: Final = b"optogate uplink auth v1\x00"
#: Domain separation of the inner module's usage-batch signature.
USAGE_CONTEXT: Final = b"optogate usage batch v1\x00"
#: Format number of the usage batch body and of the usage ack payload
#: (2: records carry duration, outcome and bytes in and out).
USAGE_FORMAT: Final = 2
#: A batch id is a name on the wire (UsageAck.batch_id is text 1..128).
MAX_BATCH_ID: Final = 128
#: Names inside records (services, licence ids) are at most this many bytes.
MAX_NAME: Final = 200
#: A batch is at most 16 MiB on the wire; 100,000 records of ~150 bytes fit.
MAX_RECORDS: Final = 100_000
#: Largest integer in any field: signed-64-bit safe, as everywhere else.
MAX_INT: Final = 2**63 - 1
#: Nesting of a valid batch: array -> body map -> records -> record -> scalar.
_MAX_DEPTH: Final = 8

_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS: Final = frozenset(
    {
        "at",
        "service",
        "licence",
        "credential",
        "units",
        "duration_ms",
        "outcome",
        "bytes_in",
        "bytes_out",
    }
)
#: An outcome is a stable code: "ok" or the API's error code.
_OUTCOME_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_BODY_KEYS: Final = frozenset({"format", "gateway", "batch_id", "created", "records"})
_ACK_KEYS: Final = frozenset({"format", "gateway", "batch_id", "sha256", "records"})


def auth_transcript(gateway_id: str, nonce: bytes, central_key_id: str) -> bytes:
    """Return the bytes the outer module signs to answer ``nonce``.

    ``central_key_id`` is central's key id as 32 hex digits.  Raises
    ValueError for an empty or over-long gateway id or nonce, or a malformed
    key id.
    """
    gw = gateway_id.encode("utf-8")
    if not 0 < len(gw) <= 0xFFFF:
        raise ValueError("gateway id must be 1..65535 bytes of UTF-8")
    if not 0 < len(nonce) <= 0xFF:
        raise ValueError("nonce must be 1..255 bytes")
    key_id = bytes.fromhex(central_key_id)
    if len(key_id) != 16:
        raise ValueError("central key id must be 16 bytes (32 hex digits)")
    return AUTH_CONTEXT + struct.pack(">H", len(gw)) + gw + bytes([len(nonce)]) + nonce + key_id


class InvalidUsageBatch(MessageError):
    """A usage batch (or usage ack payload) is malformed or its signature does not verify."""


@dataclass(frozen=True)
class UsageRecord:
    """One metered call: when, which service under which licence, by which key, how much.

    ``units`` is what is billed (1 for a call that succeeded, else 0);
    ``outcome`` is "ok" or the API's error code; ``duration_ms`` the time
    from the request to the answer; ``bytes_in`` and ``bytes_out`` the
    request and answer bodies.
    """

    at: int
    service: str
    licence: str
    credential: str
    units: int
    duration_ms: int = 0
    outcome: str = "ok"
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class UsageBatch:
    """A verified usage batch.  ``digest`` is SHA-256 of the batch bytes as received."""

    gateway: str
    batch_id: str
    created: int
    records: tuple[UsageRecord, ...]
    digest: bytes


def _body(gateway: str, batch_id: str, created: int, records: list[UsageRecord]) -> bytes:
    return cbor2.dumps(
        {
            "format": USAGE_FORMAT,
            "gateway": gateway,
            "batch_id": batch_id,
            "created": created,
            "records": [
                {
                    "at": r.at,
                    "service": r.service,
                    "licence": r.licence,
                    "credential": r.credential,
                    "units": r.units,
                    "duration_ms": r.duration_ms,
                    "outcome": r.outcome,
                    "bytes_in": r.bytes_in,
                    "bytes_out": r.bytes_out,
                }
                for r in records
            ],
        },
        canonical=True,
    )


def sign_usage_batch(
    key: SigningKey, *, gateway: str, batch_id: str, created: int, records: list[UsageRecord]
) -> bytes:
    """Return the signed batch bytes (the inner module's side).

    Raises InvalidUsageBatch if the fields would not pass :func:`verify_usage_batch`.
    """
    body = _body(gateway, batch_id, created, records)
    data: bytes = cbor2.dumps([body, key.sign(USAGE_CONTEXT + body)], canonical=True)
    _parse_body(body)  # the same checks the receiver makes: fail here, not there
    return data


def _loads_canonical(data: bytes, what: str) -> object:
    try:
        obj = cbor2.loads(data, max_depth=_MAX_DEPTH, allow_indefinite=False)
        canonical = cbor2.dumps(obj, canonical=True)
    except Exception as e:  # hostile bytes make cbor2 raise many types
        raise InvalidUsageBatch(f"{what} is not valid CBOR") from e
    if canonical != data:
        raise InvalidUsageBatch(f"{what} is not canonical CBOR")
    return obj


def _text(value: object, what: str, limit: int = MAX_NAME) -> str:
    if type(value) is not str or not 0 < len(value.encode("utf-8", "replace")) <= limit:
        raise InvalidUsageBatch(f"{what} must be text of 1..{limit} bytes")
    return value


def _uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise InvalidUsageBatch(f"{what} must be an unsigned integer")
    return value


def _parse_body(body: bytes) -> tuple[str, str, int, tuple[UsageRecord, ...]]:
    doc = _loads_canonical(body, "usage batch body")
    if type(doc) is not dict or set(doc) != _BODY_KEYS:
        raise InvalidUsageBatch(f"usage batch body must have exactly {sorted(_BODY_KEYS)}")
    if doc["format"] != USAGE_FORMAT or type(doc["format"]) is not int:
        raise InvalidUsageBatch("unknown usage batch format")
    gateway = _text(doc["gateway"], "gateway")
    batch_id = _text(doc["batch_id"], "batch_id", MAX_BATCH_ID)
    created = _uint(doc["created"], "created")
    raw = doc["records"]
    if type(raw) is not list or len(raw) > MAX_RECORDS:
        raise InvalidUsageBatch(f"records must be a list of at most {MAX_RECORDS}")
    records = []
    for item in raw:
        if type(item) is not dict or set(item) != _RECORD_KEYS:
            raise InvalidUsageBatch(f"a usage record must have exactly {sorted(_RECORD_KEYS)}")
        credential = _text(item["credential"], "credential", 64)
        if not _HASH_RE.fullmatch(credential):
            raise InvalidUsageBatch("credential must be a SHA-256 hex digest")
        outcome = _text(item["outcome"], "outcome", 64)
        if not _OUTCOME_RE.fullmatch(outcome):
            raise InvalidUsageBatch("outcome must be a code such as ok or algorithm_timeout")
        records.append(
            UsageRecord(
                at=_uint(item["at"], "at"),
                service=_text(item["service"], "service"),
                licence=_text(item["licence"], "licence"),
                credential=credential,
                units=_uint(item["units"], "units"),
                duration_ms=_uint(item["duration_ms"], "duration_ms"),
                outcome=outcome,
                bytes_in=_uint(item["bytes_in"], "bytes_in"),
                bytes_out=_uint(item["bytes_out"], "bytes_out"),
            )
        )
    return gateway, batch_id, created, tuple(records)


def verify_usage_batch(data: bytes, key: VerifyKey) -> UsageBatch:
    """Return the batch in ``data`` after checking the inner module's signature.

    The signature is checked before the body is parsed.  Raises
    InvalidUsageBatch for anything malformed or a signature that does not
    verify under ``key``.
    """
    outer = _loads_canonical(data, "usage batch")
    if type(outer) is not list or len(outer) != 2 or not all(type(p) is bytes for p in outer):
        raise InvalidUsageBatch("usage batch must be an array of body and signature")
    body, signature = outer
    try:
        key.verify(signature, USAGE_CONTEXT + body)
    except (InvalidSignature, CryptoError) as e:
        raise InvalidUsageBatch("usage batch signature does not verify") from e
    gateway, batch_id, created, records = _parse_body(body)
    return UsageBatch(gateway, batch_id, created, records, hashlib.sha256(data).digest())


@dataclass(frozen=True)
class UsageAckPayload:
    """What central's sealed usage ack says: batch ``batch_id`` (this digest) is stored."""

    gateway: str
    batch_id: str
    sha256: bytes
    records: int


def encode_usage_ack(ack: UsageAckPayload) -> bytes:
    """Return the canonical CBOR payload of a usage ack."""
    return cbor2.dumps(
        {
            "format": USAGE_FORMAT,
            "gateway": ack.gateway,
            "batch_id": ack.batch_id,
            "sha256": ack.sha256,
            "records": ack.records,
        },
        canonical=True,
    )


def decode_usage_ack(data: bytes) -> UsageAckPayload:
    """Return the usage ack in ``data``; raise InvalidUsageBatch if malformed."""
    doc = _loads_canonical(data, "usage ack")
    if type(doc) is not dict or set(doc) != _ACK_KEYS or doc["format"] != USAGE_FORMAT:
        raise InvalidUsageBatch("not a usage ack payload")
    digest = doc["sha256"]
    if type(digest) is not bytes or len(digest) != 32:
        raise InvalidUsageBatch("usage ack sha256 must be 32 bytes")
    return UsageAckPayload(
        gateway=_text(doc["gateway"], "gateway"),
        batch_id=_text(doc["batch_id"], "batch_id", MAX_BATCH_ID),
        sha256=digest,
        records=_uint(doc["records"], "records"),
    )
