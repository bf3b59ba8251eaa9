"""A reference client of the gateway protocol: what an outer module does, in a few lines.

Used by the benchmark and the tests, and a model for the outer module's
uplink: connect (TLS, pinning central's CA), run a Link in the CLIENT role
with ``baud=None``, authenticate with the outer module's Ed25519 key, then
make requests.  Every request is idempotent, so a caller that loses the
connection mid-request simply reconnects and asks again.
"""

from __future__ import annotations

from firmware.common.crypto.keys import SigningKey
from firmware.common.link import messages
from firmware.common.link.link import Link
from firmware.common.uplink import auth_transcript

#: Bound of one uplink exchange over TCP (a bundle over a modem needs its own).
DEFAULT_TIMEOUT = 30.0


async def authenticate(
    link: Link,
    gateway_id: str,
    key: SigningKey,
    central_key_id: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - an exchange bound, not a scope
) -> None:
    """Run AuthBegin -> AuthChallenge -> AuthProof -> AuthOk; return None once authenticated.

    Raises RemoteError with central's code (``unknown_gateway``,
    ``gateway_revoked``, ``bad_signature``...), or the link's errors.
    """
    challenge = await link.request(
        messages.AuthBegin(gateway_id=gateway_id), timeout=timeout, expect=messages.AuthChallenge
    )
    signature = key.sign(auth_transcript(gateway_id, challenge.nonce, central_key_id))
    await link.request(messages.AuthProof(signature=signature), timeout=timeout)
