"""Licences and the pure decision "may this caller run this service now?".

A **licence** grants one customer the use of one service on one gateway from
``valid_from`` to ``valid_until`` (Unix seconds, both *inclusive*: a licence
valid until T still allows a call at exactly T and refuses one at T + 1) to
the callers whose API-key hashes it lists.  Each licence carries a version
that central increases on every change; the inner module's version registry
refuses to go back to an older one.

Central sends a gateway all its licences at once, as a **licence set**: the
payload of a sealed object of kind ``LICENCE_SET`` (so it is signed by
central and readable only by the gateway).  The set also lists **revoked**
licence ids: a revoked licence refuses even inside its paid period.

:func:`evaluate` is the S304/S305 decision, pure and total: it never raises
for any caller input, it takes trusted time as an argument, and it answers
with an :class:`Allow` or one of four typed refusals, each carrying its HTTP
status:

=====================  ======  ============================================
refusal                status  when
=====================  ======  ============================================
UnknownCredential      401     no licence on this gateway lists the key
NotLicensed            403     the key is known, but not for this service
Revoked                403     every licence that would apply was revoked
PaymentRequired        402     a licence exists but is expired or not yet
                               valid; carries its id, dates and what to renew
=====================  ======  ============================================

A key is found through :meth:`LicenceSet.holding`, an index of the set's
credential hashes built once per set: a call costs the same whether the
gateway knows one key or thousands.  The index is keyed by SHA-256 digests
of 256-bit keys, so the time a lookup takes depends only on the digest of
the key presented; learning from it which digests are stored would not
give anyone a key (that is a preimage of SHA-256), so no scan of every
candidate in constant time is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import cbor2

from firmware.common.crypto.apikeys import hash_api_key, is_key_hash
from firmware.common.crypto.errors import InvalidApiKey
from firmware.common.errors import MessageError

#: The licence-set payload format this code writes and reads.
LICENCE_FORMAT = 1

#: Bounds that keep a hostile or buggy payload from exhausting a Pi's memory;
#: a gateway serves a handful of services to at most hundreds of programs.
MAX_LICENCES = 10_000
MAX_CREDENTIALS_PER_LICENCE = 10_000
MAX_REVOKED = 100_000
MAX_NAME_CHARS = 200

#: Times and versions are unsigned 63-bit integers (JSON and SQL bigint safe).
MAX_INT = 2**63 - 1

#: Registry key prefix for a licence's version (see ``freshness.VersionRegistry``).
LICENCE_VERSION_PREFIX = "licence/"


class LicenceFormatError(MessageError):
    """A licence-set payload failed strict decoding."""


@dataclass(frozen=True)
class Licence:
    """One grant: ``customer`` may use ``service`` on ``gateway`` in [valid_from, valid_until]."""

    licence_id: str
    customer: str
    gateway: str
    service: str
    valid_from: int
    valid_until: int
    credentials: frozenset[str]
    version: int

    def is_valid_at(self, now: int) -> bool:
        """Return True if ``valid_from <= now <= valid_until``."""
        return self.valid_from <= now <= self.valid_until


@dataclass(frozen=True)
class LicenceSet:
    """Every licence of one gateway, and the ids central has revoked."""

    gateway: str
    licences: tuple[Licence, ...] = ()
    revoked: frozenset[str] = field(default_factory=frozenset)

    def holding(self, key_hash: str) -> tuple[Licence, ...]:
        """Return the licences of this set's gateway that list ``key_hash``, in set order."""
        return self._holders.get(key_hash, ())

    @cached_property
    def _holders(self) -> dict[str, tuple[Licence, ...]]:
        # Built on first use; the set is frozen, so it never goes stale.
        index: dict[str, list[Licence]] = {}
        for lic in self.licences:
            if lic.gateway == self.gateway:
                for credential in lic.credentials:
                    index.setdefault(credential, []).append(lic)
        return {credential: tuple(held) for credential, held in index.items()}

    def versions(self) -> dict[str, int]:
        """Return ``{"licence/<id>": version}`` for the version registry."""
        return {LICENCE_VERSION_PREFIX + lic.licence_id: lic.version for lic in self.licences}

    def to_payload(self) -> bytes:
        """Return the canonical CBOR payload (sorted, so equal sets encode equally)."""
        return cbor2.dumps(
            {
                "format": LICENCE_FORMAT,
                "gateway": self.gateway,
                "licences": [
                    {
                        "id": lic.licence_id,
                        "customer": lic.customer,
                        "gateway": lic.gateway,
                        "service": lic.service,
                        "valid_from": lic.valid_from,
                        "valid_until": lic.valid_until,
                        "credentials": sorted(lic.credentials),
                        "version": lic.version,
                    }
                    for lic in sorted(self.licences, key=lambda x: x.licence_id)
                ],
                "revoked": sorted(self.revoked),
            },
            canonical=True,
        )

    @classmethod
    def from_payload(cls, data: bytes) -> LicenceSet:
        """Return the licence set encoded in ``data``.

        Raises LicenceFormatError for anything but a well-formed payload:
        not CBOR, trailing bytes, missing or extra fields, wrong types,
        out-of-range numbers, ``valid_from > valid_until``, a malformed
        credential hash, duplicate licence ids, or a licence for another
        gateway than the set's.
        """
        try:
            item = cbor2.loads(data)
            canonical = cbor2.dumps(item, canonical=True)
        except Exception as e:  # cbor2 raises many types on hostile input
            raise LicenceFormatError("licence set is not CBOR") from e
        if canonical != data:
            raise LicenceFormatError("licence set is not canonical CBOR")
        top = _fields(item, {"format", "gateway", "licences", "revoked"}, "licence set")
        if top["format"] != LICENCE_FORMAT or type(top["format"]) is not int:
            raise LicenceFormatError("unknown licence set format")
        gateway = _name(top["gateway"], "gateway")
        raw_licences = _list(top["licences"], MAX_LICENCES, "licences")
        licences = tuple(_licence(raw) for raw in raw_licences)
        ids = [lic.licence_id for lic in licences]
        if len(set(ids)) != len(ids):
            raise LicenceFormatError("duplicate licence id")
        if any(lic.gateway != gateway for lic in licences):
            raise LicenceFormatError("licence for another gateway in this set")
        revoked = frozenset(
            _name(r, "revoked id") for r in _list(top["revoked"], MAX_REVOKED, "revoked")
        )
        return cls(gateway=gateway, licences=licences, revoked=revoked)


def _fields(item: object, names: set[str], what: str) -> dict[str, object]:
    if not isinstance(item, dict) or set(item) != names:
        raise LicenceFormatError(f"{what}: expected exactly the fields {sorted(names)}")
    return {str(k): v for k, v in item.items()}


def _list(item: object, limit: int, what: str) -> list[object]:
    if not isinstance(item, list) or len(item) > limit:
        raise LicenceFormatError(f"{what}: expected a list of at most {limit}")
    return item


def _name(item: object, what: str) -> str:
    if not isinstance(item, str) or not 0 < len(item) <= MAX_NAME_CHARS:
        raise LicenceFormatError(f"{what}: expected 1..{MAX_NAME_CHARS} characters")
    return item


def _uint(item: object, what: str) -> int:
    if type(item) is not int or not 0 <= item <= MAX_INT:
        raise LicenceFormatError(f"{what}: expected an integer in 0..2**63-1")
    return item


_LICENCE_FIELDS = {
    "id",
    "customer",
    "gateway",
    "service",
    "valid_from",
    "valid_until",
    "credentials",
    "version",
}


def _licence(raw: object) -> Licence:
    f = _fields(raw, _LICENCE_FIELDS, "licence")
    creds = _list(f["credentials"], MAX_CREDENTIALS_PER_LICENCE, "credentials")
    for c in creds:
        if not isinstance(c, str) or not is_key_hash(c):
            raise LicenceFormatError("credentials: expected SHA-256 hex digests")
    lic = Licence(
        licence_id=_name(f["id"], "id"),
        customer=_name(f["customer"], "customer"),
        gateway=_name(f["gateway"], "gateway"),
        service=_name(f["service"], "service"),
        valid_from=_uint(f["valid_from"], "valid_from"),
        valid_until=_uint(f["valid_until"], "valid_until"),
        credentials=frozenset(str(c) for c in creds),
        version=_uint(f["version"], "version"),
    )
    if lic.valid_from > lic.valid_until:
        raise LicenceFormatError("licence: valid_from after valid_until")
    return lic


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Allow:
    """The call may run under ``licence_id``."""

    licence_id: str
    customer: str
    service: str
    valid_until: int
    status: ClassVar[int] = 200


@dataclass(frozen=True)
class UnknownCredential:
    """No licence on this gateway lists the presented key (or no key was presented)."""

    status: ClassVar[int] = 401


@dataclass(frozen=True)
class NotLicensed:
    """The key is known here, but no licence for it covers ``service``."""

    service: str
    status: ClassVar[int] = 403


@dataclass(frozen=True)
class Revoked:
    """Every licence for this key and service was revoked by central."""

    service: str
    licence_ids: tuple[str, ...]
    status: ClassVar[int] = 403


@dataclass(frozen=True)
class PaymentRequired:
    """A licence exists but is outside its period: renew ``renew`` (a service name).

    ``not_yet_valid`` tells apart a licence that starts later (``valid_from``
    in the future) from one that has expired (``valid_until`` in the past).
    """

    licence_id: str
    customer: str
    renew: str
    valid_from: int
    valid_until: int
    not_yet_valid: bool
    status: ClassVar[int] = 402


Refusal = UnknownCredential | NotLicensed | Revoked | PaymentRequired
Decision = Allow | Refusal


def evaluate(
    licences: LicenceSet,
    *,
    service: str,
    now: int,
    api_key: str | None = None,
    key_hash: str | None = None,
) -> Decision:
    """Return whether the caller may run ``service`` at trusted time ``now``.

    Pass the presented ``api_key`` or, if already hashed, its ``key_hash``.
    Never raises: a missing or malformed key is an :class:`UnknownCredential`.
    When several licences apply, the one valid longest wins; a refusal names
    the most relevant licence (the latest to expire, else the first to start).
    """
    if key_hash is None:
        if api_key is None:
            return UnknownCredential()
        try:
            key_hash = hash_api_key(api_key)
        except InvalidApiKey:
            return UnknownCredential()
    held = licences.holding(key_hash)
    if not held:
        return UnknownCredential()
    for_service = [lic for lic in held if lic.service == service]
    if not for_service:
        return NotLicensed(service=service)
    active = [lic for lic in for_service if lic.licence_id not in licences.revoked]
    if not active:
        return Revoked(
            service=service, licence_ids=tuple(sorted(x.licence_id for x in for_service))
        )
    valid = [lic for lic in active if lic.is_valid_at(now)]
    if valid:
        best = max(valid, key=lambda x: (x.valid_until, x.licence_id))
        return Allow(
            licence_id=best.licence_id,
            customer=best.customer,
            service=service,
            valid_until=best.valid_until,
        )
    expired = [lic for lic in active if lic.valid_until < now]
    if expired:
        chosen = max(expired, key=lambda x: (x.valid_until, x.licence_id))
    else:
        chosen = min(active, key=lambda x: (x.valid_from, x.licence_id))
    return PaymentRequired(
        licence_id=chosen.licence_id,
        customer=chosen.customer,
        renew=service,
        valid_from=chosen.valid_from,
        valid_until=chosen.valid_until,
        not_yet_valid=not expired,
    )


def decision_body(decision: Decision) -> Mapping[str, object]:
    """Return a JSON-ready description of ``decision`` for the LAN API's reply body."""
    if isinstance(decision, Allow):
        return {"allowed": True, "licence_id": decision.licence_id}
    if isinstance(decision, UnknownCredential):
        return {"error": "unknown_credential"}
    if isinstance(decision, NotLicensed):
        return {"error": "not_licensed", "service": decision.service}
    if isinstance(decision, Revoked):
        return {"error": "revoked", "service": decision.service}
    return {
        "error": "not_yet_valid" if decision.not_yet_valid else "licence_expired",
        "licence_id": decision.licence_id,
        "renew": decision.renew,
        "valid_from": decision.valid_from,
        "valid_until": decision.valid_until,
    }
