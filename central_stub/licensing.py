"""What a gateway is entitled to, derived from central's records (pure).

Theory of operation
-------------------
A gateway belongs to one customer.  Its **licence set** holds every licence
of that customer that applies to it (``gateway_id`` None, or this gateway),
each rendered for this gateway with the hashes of the customer's active
client API keys as its credentials; revoked licences stay listed and their
ids are also in ``revoked``, so the inner module answers "revoked" (403)
rather than "unknown key" (401).

The set's sealed-object **version** is central's ``licence_revision``
counter, which every administrative change that can alter any licence set
increases; each licence's own ``version`` grows whenever that licence
changes (dates, credentials, revocation).  Both only ever increase, which
is what the inner module's rollback registry demands, and both follow
:func:`next_version`, which keeps them increasing across a restore from
backup.

The gateway's **bundles** are the latest published version of every
service it holds a licence for that is not revoked.

Everything here reads a :class:`~central_stub.repository.Transaction` and
returns values; nothing writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from central_stub.repository import BundleVersion, Gateway, LicenceRecord, Transaction
from firmware.common.licence import Licence, LicenceSet

#: Counter bumped by every change that can alter a licence set.
LICENCE_REVISION: Final = "licence_revision"
#: Versions count in milliseconds of wall-clock time (see :func:`next_version`).
MS_PER_SECOND: Final = 1000


def next_version(previous: int, now: int) -> int:
    """Return the version that follows ``previous`` at ``now`` (Unix seconds).

    It is above ``previous`` and at least ``now`` in milliseconds, so after a
    database restored from an older backup central still never hands out a
    version a gateway has already seen (given a clock that moved forward):
    the gateway's rollback registry would refuse a reused one.
    """
    return max(previous + 1, now * MS_PER_SECOND)


@dataclass(frozen=True)
class Entitlement:
    """What one gateway gets: its licence set, its version, and its current bundles."""

    gateway: Gateway
    licence_set: LicenceSet
    revision: int
    bundles: tuple[BundleVersion, ...]


def applies_to(licence: LicenceRecord, gateway: Gateway) -> bool:
    """Return True if ``licence`` covers ``gateway`` (same customer, gateway scope matches)."""
    return licence.customer_id == gateway.customer_id and licence.gateway_id in (
        None,
        gateway.gateway_id,
    )


def latest_bundles(tx: Transaction) -> dict[str, BundleVersion]:
    """Return the latest published version of every service."""
    latest: dict[str, BundleVersion] = {}
    for b in tx.list_bundles():
        if b.service not in latest or b.version > latest[b.service].version:
            latest[b.service] = b
    return latest


def entitlement(tx: Transaction, gateway: Gateway) -> Entitlement:
    """Return what ``gateway`` is entitled to now (whatever its revocation state)."""
    credentials = frozenset(
        k.key_hash for k in tx.list_client_keys(gateway.customer_id) if k.revoked is None
    )
    records = [lic for lic in tx.list_licences(gateway.customer_id) if applies_to(lic, gateway)]
    licences = tuple(
        Licence(
            licence_id=r.licence_id,
            customer=r.customer_id,
            gateway=gateway.gateway_id,
            service=r.service,
            valid_from=r.valid_from,
            valid_until=r.valid_until,
            credentials=credentials,
            version=r.version,
        )
        for r in records
    )
    revoked = frozenset(r.licence_id for r in records if r.revoked is not None)
    latest = latest_bundles(tx)
    services = sorted({r.service for r in records if r.revoked is None})
    bundles = tuple(latest[s] for s in services if s in latest)
    return Entitlement(
        gateway=gateway,
        licence_set=LicenceSet(gateway=gateway.gateway_id, licences=licences, revoked=revoked),
        revision=max(1, tx.get_counter(LICENCE_REVISION)),
        bundles=bundles,
    )
