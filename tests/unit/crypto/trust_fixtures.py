"""Keys for the trust-layer tests, and a second, independent writer of the sealed format.

``forge`` builds a sealed object from the byte layout in docs/wire-protocol.md
section 4 (not from ``seal``'s internals), so tests can make objects that lie
(a false length, a bomb, a swapped field) and still carry a valid signature.
"""

from __future__ import annotations

import struct

import cbor2

from firmware.common.crypto.freshness import SyncMetadata
from firmware.common.crypto.keys import RecipientPublicKey, SigningKey
from firmware.common.crypto.sealed import (
    HPKE_INFO_CONTEXT,
    SIGNATURE_CONTEXT,
    Kind,
    seal,
)

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86_400


def header_fields(
    *,
    kind: int = 1,
    subject: str = "dxf-convert",
    version: int = 1,
    created: int = NOW,
    expires: int = NOW + DAY,
    issuer: SigningKey,
    recipient: RecipientPublicKey,
    compression: int = 0,
    payload_length: int,
) -> list[object]:
    """Return the 11 header fields in wire order."""
    return [
        1,
        kind,
        subject,
        version,
        created,
        expires,
        bytes.fromhex(issuer.key_id),
        bytes.fromhex(recipient.key_id),
        int(recipient.suite),
        compression,
        payload_length,
    ]


def forge(
    fields: list[object],
    body: bytes,
    *,
    issuer: SigningKey,
    recipient: RecipientPublicKey,
    info_fields: list[object] | None = None,
) -> bytes:
    """Return a sealed object with header ``fields`` and compressed ``body``, validly signed.

    ``info_fields`` (default: ``fields``) is the header bound into HPKE, so a
    test can make the signed header and the encryption header disagree.
    """
    header = cbor2.dumps(fields)
    info = HPKE_INFO_CONTEXT + cbor2.dumps(info_fields if info_fields is not None else fields)
    ciphertext = recipient.hpke_seal(body, info)
    return resign(header, ciphertext, issuer)


def resign(header: bytes, ciphertext: bytes, issuer: SigningKey) -> bytes:
    """Return ``[header, ciphertext, signature]`` with a fresh valid signature."""
    message = SIGNATURE_CONTEXT + struct.pack(">I", len(header)) + header + ciphertext
    return cbor2.dumps([header, ciphertext, issuer.sign(message)])


class Publisher:
    """Central in miniature: seals objects and the sync metadata listing them."""

    def __init__(self, central: SigningKey, recipient: RecipientPublicKey, gateway: str) -> None:
        self.central = central
        self.recipient = recipient
        self.gateway = gateway
        self.meta_version = 0

    def object(
        self,
        kind: Kind,
        subject: str,
        version: int,
        payload: bytes,
        *,
        created: int = NOW,
        expires: int = NOW + 3650 * DAY,
    ) -> bytes:
        return seal(
            payload,
            kind=kind,
            subject=subject,
            version=version,
            created=created,
            expires=expires,
            issuer=self.central,
            recipient=self.recipient,
        )

    def metadata(self, objects: list[bytes], *, created: int, lifetime: int = 7 * DAY) -> bytes:
        """Return the next sync metadata version listing exactly ``objects``."""
        self.meta_version += 1
        return seal(
            SyncMetadata.listing(self.gateway, objects, self.central.public).to_payload(),
            kind=Kind.SYNC_METADATA,
            subject=self.gateway,
            version=self.meta_version,
            created=created,
            expires=created + lifetime,
            issuer=self.central,
            recipient=self.recipient,
        )
