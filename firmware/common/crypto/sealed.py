"""Sealed objects: what central sends a gateway, signed by central and readable only by it.

Every bundle, licence set, sync metadata record and usage acknowledgement
travels as one *sealed object* (byte layout in ``docs/wire-protocol.md``,
section 4).  Theory of operation:

``seal`` (central, or tests)
    1. compress the payload (zlib or xz),
    2. build the *header*: format version, kind, subject, version counter,
       created / expires times, issuer and recipient key ids, HPKE suite,
       compression method and the exact uncompressed length, and encode it
       as canonical CBOR,
    3. HPKE-seal (RFC 9180 base mode) the compressed payload to the
       recipient's key, with ``info = HPKE_INFO_CONTEXT ‖ header``, so the
       ciphertext only decrypts under the very header it was made for,
    4. sign ``SIGNATURE_CONTEXT ‖ len(header) ‖ header ‖ ciphertext`` with
       the issuer's Ed25519 key,
    5. emit the CBOR array ``[header, ciphertext, signature]``.

``open_sealed`` (the inner module) undoes this in the order that exposes the
least code to an attacker: size cap, strict canonical CBOR, signature (so
nothing unauthenticated is parsed further), header fields, key ids, kind,
expiry and minimum version at the caller's *trusted* time, HPKE decryption,
then decompression bounded by the signed uncompressed length and by the
caller's ``max_payload_bytes`` (a zip bomb cannot make it allocate more).

Failures before the signature verifies raise the deliberately vague
:class:`InvalidObject`; an authentic but expired object raises
:class:`ExpiredObject` and an authentic but older one :class:`RollbackError`
(both subclasses), so callers can catch one error or tell them apart.

The outer module holds central's public key but no recipient key: with
:func:`verify_sealed` it can check that an object is central's, and read its
kind and version, before relaying it, while the payload stays opaque to it.

Pure: no I/O, no clock; ``now`` is an argument (Unix seconds, trusted time).
"""

from __future__ import annotations

import enum
import hashlib
import lzma
import struct
import zlib
from dataclasses import dataclass

import cbor2

from firmware.common.crypto.errors import (
    ExpiredObject,
    InvalidObject,
    InvalidSignature,
    RollbackError,
)
from firmware.common.crypto.keys import (
    ED25519_SIGNATURE_BYTES,
    KEY_ID_BYTES,
    HpkeSuite,
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    VerifyKey,
)


class Kind(enum.IntEnum):
    """What a sealed object carries (the number is on the wire)."""

    BUNDLE = 1  # a service's algorithm and manifest
    LICENCE_SET = 2  # every licence of one gateway, with revocations
    SYNC_METADATA = 3  # central's signed time and the current version of every object
    USAGE_ACK = 4  # central's acknowledgement of usage records


class Compression(enum.IntEnum):
    """How the payload was compressed before sealing (the number is on the wire)."""

    NONE = 0
    ZLIB = 1  # RFC 1950 stream: fast, small decoder memory
    XZ = 2  # xz container (LZMA2): ~20-30 % smaller bundles, more CPU


#: The only format this code writes and reads.
FORMAT_VERSION = 1

#: Domain separation: a signature over a sealed object can never be mistaken
#: for a signature over anything else the same key signs (usage records...).
SIGNATURE_CONTEXT = b"optogate sealed object v1 signature\x00"

#: Bound into HPKE's key schedule together with the header.
HPKE_INFO_CONTEXT = b"optogate sealed object v1 hpke info\x00"

#: Largest sealed object accepted: the link's largest message (64 MiB).
MAX_SEALED_BYTES = 64 * 1024 * 1024

#: Default bound on a decompressed payload; a Pi 3 has 1 GiB of RAM and the
#: largest reference bundle is a few MiB, so 64 MiB leaves ample room for both.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

#: A subject names an object ("licences", "bundle/dxf-convert"); 200 bytes is plenty.
MAX_SUBJECT_BYTES = 200

#: Version counters and times are unsigned and fit in 63 bits (JSON, SQL bigint).
MAX_COUNTER = 2**63 - 1

#: xz decoder memory cap: preset 6 needs ~9 MiB; nothing legitimate needs more.
XZ_MEMLIMIT = 32 * 1024 * 1024

_HEADER_FIELDS = 11
_XZ_PRESET = 6


@dataclass(frozen=True)
class Header:
    """The signed fields of a sealed object (``issuer`` and ``recipient`` are key ids)."""

    kind: Kind
    subject: str
    version: int
    created: int
    expires: int
    issuer: str
    recipient: str
    suite: HpkeSuite
    compression: Compression
    payload_length: int


@dataclass(frozen=True)
class Opened:
    """A sealed object that verified and decrypted.

    ``digest`` is SHA-256 of the whole sealed object as received: the name
    sync metadata uses for it (mix-and-match protection).
    """

    header: Header
    payload: bytes
    digest: bytes


def _invalid() -> InvalidObject:
    return InvalidObject("sealed object is not valid")


def _signed_message(header: bytes, ciphertext: bytes) -> bytes:
    return SIGNATURE_CONTEXT + struct.pack(">I", len(header)) + header + ciphertext


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNTER


def _loads_canonical(data: bytes) -> object:
    """Return the CBOR item in ``data`` if it is the canonical encoding; else raise."""
    try:
        item = cbor2.loads(data)
        canonical = cbor2.dumps(item)
    except Exception as e:  # cbor2 raises many types on hostile input
        raise _invalid() from e
    if canonical != data:
        raise _invalid()
    return item


def _encode_header(h: Header) -> bytes:
    return cbor2.dumps(
        [
            FORMAT_VERSION,
            int(h.kind),
            h.subject,
            h.version,
            h.created,
            h.expires,
            bytes.fromhex(h.issuer),
            bytes.fromhex(h.recipient),
            int(h.suite),
            int(h.compression),
            h.payload_length,
        ]
    )


def _decode_header(data: bytes) -> Header:
    fields = _loads_canonical(data)
    if not isinstance(fields, list) or len(fields) != _HEADER_FIELDS:
        raise _invalid()
    (fmt, kind, subject, version, created, expires, issuer, recipient, suite, comp, length) = fields
    if fmt != FORMAT_VERSION or type(fmt) is not int:
        raise _invalid()
    if not all(_is_uint(v) for v in (kind, version, created, expires, suite, comp, length)):
        raise _invalid()
    if not isinstance(subject, str) or not 0 < len(subject.encode()) <= MAX_SUBJECT_BYTES:
        raise _invalid()
    for key_id in (issuer, recipient):
        if not isinstance(key_id, bytes) or len(key_id) != KEY_ID_BYTES:
            raise _invalid()
    if expires <= created:
        raise _invalid()
    try:
        return Header(
            kind=Kind(kind),
            subject=subject,
            version=version,
            created=created,
            expires=expires,
            issuer=issuer.hex(),
            recipient=recipient.hex(),
            suite=HpkeSuite(suite),
            compression=Compression(comp),
            payload_length=length,
        )
    except ValueError as e:  # unknown kind, suite or compression
        raise _invalid() from e


def _compress(payload: bytes, method: Compression) -> bytes:
    if method is Compression.ZLIB:
        return zlib.compress(payload, level=9)
    if method is Compression.XZ:
        return lzma.compress(payload, format=lzma.FORMAT_XZ, preset=_XZ_PRESET)
    return payload


def _decompress(data: bytes, method: Compression, length: int) -> bytes:
    """Return exactly ``length`` bytes decompressed from ``data``, allocating at most length+1."""
    if method is Compression.NONE:
        out = data
    elif method is Compression.ZLIB:
        z = zlib.decompressobj()
        try:
            out = z.decompress(data, length + 1)
        except zlib.error as e:
            raise _invalid() from e
        if not z.eof or z.unused_data or z.unconsumed_tail:
            raise _invalid()
    else:
        x = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
        try:
            out = x.decompress(data, max_length=length + 1)
        except lzma.LZMAError as e:
            raise _invalid() from e
        if not x.eof or x.unused_data:
            raise _invalid()
    if len(out) != length:
        raise _invalid()
    return out


def seal(
    payload: bytes,
    *,
    kind: Kind,
    subject: str,
    version: int,
    created: int,
    expires: int,
    issuer: SigningKey,
    recipient: RecipientPublicKey,
    compression: Compression = Compression.ZLIB,
) -> bytes:
    """Return ``payload`` compressed, sealed to ``recipient`` and signed by ``issuer``.

    The HPKE suite is the recipient key's (X25519 or the ML-KEM hybrid).
    Raises ValueError for arguments the format cannot carry (empty or long
    subject, negative counters, ``expires <= created``, payload too large).
    """
    if not 0 < len(subject.encode()) <= MAX_SUBJECT_BYTES:
        raise ValueError(f"subject must be 1..{MAX_SUBJECT_BYTES} bytes of UTF-8")
    for name, value in (("version", version), ("created", created), ("expires", expires)):
        if not _is_uint(value):
            raise ValueError(f"{name} must be an integer in 0..2**63-1")
    if expires <= created:
        raise ValueError("expires must be after created")
    if len(payload) > DEFAULT_MAX_PAYLOAD_BYTES:
        raise ValueError("payload too large for a sealed object")
    header = Header(
        kind=Kind(kind),
        subject=subject,
        version=version,
        created=created,
        expires=expires,
        issuer=issuer.key_id,
        recipient=recipient.key_id,
        suite=recipient.suite,
        compression=Compression(compression),
        payload_length=len(payload),
    )
    header_bytes = _encode_header(header)
    ciphertext = recipient.hpke_seal(
        _compress(payload, header.compression), HPKE_INFO_CONTEXT + header_bytes
    )
    signature = issuer.sign(_signed_message(header_bytes, ciphertext))
    sealed = cbor2.dumps([header_bytes, ciphertext, signature])
    if len(sealed) > MAX_SEALED_BYTES:
        raise ValueError("sealed object too large")
    return sealed


def _split_and_verify(data: bytes, issuer: VerifyKey) -> tuple[Header, bytes, bytes]:
    """Return (header, header bytes, ciphertext) of an object ``issuer`` signed."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_SEALED_BYTES:
        raise _invalid()
    outer = _loads_canonical(bytes(data))
    if not isinstance(outer, list) or len(outer) != 3:
        raise _invalid()
    header_bytes, ciphertext, signature = outer
    if not all(isinstance(part, bytes) for part in outer):
        raise _invalid()
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise _invalid()
    try:
        issuer.verify(signature, _signed_message(header_bytes, ciphertext))
    except InvalidSignature as e:  # stay vague
        raise _invalid() from e
    header = _decode_header(header_bytes)
    if header.issuer != issuer.key_id:
        raise _invalid()
    return header, header_bytes, ciphertext


def verify_sealed(data: bytes, issuer: VerifyKey) -> Header:
    """Return the header of a sealed object after checking ``issuer``'s signature.

    For relays (the outer module): no recipient key is needed and no payload
    is read.  No time or version check is made.  Raises InvalidObject.
    """
    header, _, _ = _split_and_verify(data, issuer)
    return header


def open_sealed(
    data: bytes,
    recipient: RecipientKey,
    issuer: VerifyKey,
    *,
    now: int,
    expected_kind: Kind,
    expected_subject: str | None = None,
    min_version: int = 0,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Opened:
    """Return the verified, decrypted and decompressed content of a sealed object.

    ``now`` is trusted time in Unix seconds; the object must satisfy
    ``now < expires``.  ``min_version`` is the highest version already
    accepted for this subject (equal is allowed: a re-delivery).

    Raises ExpiredObject (authentic but expired), RollbackError (authentic
    but ``version < min_version``) and InvalidObject for everything else:
    malformed, oversized, forged, another issuer, another recipient or
    suite, another kind or subject, undecryptable, or decompressing to
    anything but exactly the signed length (at most ``max_payload_bytes``).
    """
    header, header_bytes, ciphertext = _split_and_verify(data, issuer)
    if header.recipient != recipient.key_id or header.suite is not recipient.suite:
        raise _invalid()
    if header.kind is not expected_kind:
        raise InvalidObject(f"sealed object is a {header.kind.name}, not a {expected_kind.name}")
    if expected_subject is not None and header.subject != expected_subject:
        raise InvalidObject("sealed object is for another subject")
    if now >= header.expires:
        raise ExpiredObject(f"sealed {header.kind.name} expired at {header.expires}")
    if header.version < min_version:
        raise RollbackError(
            f"sealed {header.kind.name} {header.subject!r} version {header.version} "
            f"is older than accepted version {min_version}"
        )
    if header.payload_length > max_payload_bytes:
        raise _invalid()
    compressed = recipient.hpke_open(ciphertext, HPKE_INFO_CONTEXT + header_bytes)
    payload = _decompress(compressed, header.compression, header.payload_length)
    return Opened(header=header, payload=payload, digest=hashlib.sha256(data).digest())
