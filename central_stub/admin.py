"""Administrative operations: customers, gateways, services, licences, payments, keys.

Theory of operation
-------------------
Every operation is one call that (1) parses and checks its input, (2) opens
one repository transaction, (3) checks the input against stored state
(unknown ids, overlapping periods, versions), (4) writes the change *and* its
audit entry, and commits both at once.  Any error raises before the commit,
so an error always leaves the database exactly as it was.  The one
deliberate exception is a refused bundle (bad signature or manifest): the
refusal itself is audited, in a transaction of its own, because a tampered
bundle is a security event.

Time comes in as ``now`` (Unix seconds); ``actor`` names who acted (the
operator's login for the CLI).  Parsing helpers for dates, durations and
amounts live here too, so the CLI and tests share one definition.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from central_stub.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from central_stub.licensing import LICENCE_REVISION, applies_to, next_version
from central_stub.repository import (
    AuditEntry,
    BundleVersion,
    ClientKey,
    Customer,
    Gateway,
    LicenceRecord,
    Payment,
    Repository,
    Transaction,
    UsageRow,
)
from firmware.common.crypto.apikeys import generate_api_key
from firmware.common.crypto.errors import KeyFileError
from firmware.common.crypto.keys import HpkeSuite, RecipientPublicKey, VerifyKey
from firmware.common.errors import OptogateError
from provisioning.bundle import Bundle, BundleError, load_bundle

#: Ids are DNS-label-like: safe in file names, URLs, logs and sealed subjects.
ID_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: Display names: one line of readable text.
MAX_DISPLAY_NAME: Final = 200
#: A payment may not extend a licence by more than ten years at once (a typo guard).
MAX_EXTENSION: Final = 10 * 366 * 86400
#: Amounts are stored in minor units; a billion units is far beyond any licence price.
MAX_AMOUNT_MINOR: Final = 10**15
#: gateway.json written by ``optogate keys gateway`` has this format.
GATEWAY_JSON_FORMAT: Final = 1
#: gateway.json is a few KiB (its CA certificate included).
MAX_GATEWAY_JSON: Final = 256 * 1024

_DURATION_RE: Final = re.compile(r"([1-9][0-9]{0,5})([hdw])")
_DURATION_UNITS: Final = {"h": 3600, "d": 86400, "w": 7 * 86400}
_DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONTH_RE: Final = re.compile(r"(\d{4})-(\d{2})")
_CURRENCY_RE: Final = re.compile(r"[A-Z]{3}")


# ---------------------------------------------------------------------------- parsing


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid id; raise InvalidInput naming ``what`` otherwise."""
    if not ID_RE.fullmatch(value):
        raise InvalidInput(f"{what} {value!r} must be 1-63 of a-z, 0-9 and '-' (not at the ends)")
    return value


def parse_time(text: str, *, end_of_day: bool = False) -> int:
    """Return Unix seconds for ``YYYY-MM-DD`` (UTC) or an ISO 8601 time with a zone.

    A bare date means its first second, or its last (23:59:59) with
    ``end_of_day``, so ``--until 2026-12-31`` includes that whole day.
    Raises InvalidInput for anything else.
    """
    try:
        if _DATE_RE.fullmatch(text):
            day = datetime.date.fromisoformat(text)
            t = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
            if end_of_day:
                t += datetime.timedelta(days=1, seconds=-1)
        else:
            t = datetime.datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidInput(f"bad date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from e
    if t.tzinfo is None:
        raise InvalidInput(f"time {text!r} needs a zone (Z or +HH:MM)")
    seconds = int(t.timestamp())
    if seconds < 0:
        raise InvalidInput(f"date {text!r} is before 1970")
    return seconds


def format_time(seconds: int) -> str:
    """Return ``seconds`` as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_duration(text: str) -> int:
    """Return seconds for ``Nh``, ``Nd`` or ``Nw`` (e.g. ``30d``); raise InvalidInput."""
    m = _DURATION_RE.fullmatch(text)
    if m is None:
        raise InvalidInput(f"bad duration {text!r}: use a count and h, d or w, e.g. 30d")
    seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds > MAX_EXTENSION:
        raise InvalidInput(f"duration {text!r} is longer than ten years")
    return seconds


def parse_amount(text: str) -> int:
    """Return a positive amount with at most two decimals in minor units; raise InvalidInput."""
    try:
        value = Decimal(text)
    except InvalidOperation as e:
        raise InvalidInput(f"bad amount {text!r}") from e
    if not value.is_finite() or value <= 0:
        raise InvalidInput(f"amount {text!r} must be a positive number")
    minor = value * 100
    if minor != minor.to_integral_value() or minor > MAX_AMOUNT_MINOR:
        raise InvalidInput(f"amount {text!r} must have at most two decimals and be reasonable")
    return int(minor)


def parse_month(text: str) -> tuple[int, int]:
    """Return [start, end) Unix seconds of month ``YYYY-MM`` (UTC); raise InvalidInput."""
    m = _MONTH_RE.fullmatch(text)
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise InvalidInput(f"bad month {text!r}: use YYYY-MM")
    year, month = int(m.group(1)), int(m.group(2))
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    nxt = (year + 1, 1) if month == 12 else (year, month + 1)
    return start, calendar.timegm((nxt[0], nxt[1], 1, 0, 0, 0))


def _display_name(text: str) -> str:
    if not 0 < len(text) <= MAX_DISPLAY_NAME or not text.isprintable():
        raise InvalidInput(f"name must be 1-{MAX_DISPLAY_NAME} printable characters")
    return text


# ---------------------------------------------------------------------------- helpers


def _audit(tx: Transaction, now: int, actor: str, action: str, target: str, detail: str) -> None:
    tx.append_audit(AuditEntry(now, actor, action, target, True, detail))


def _bump_revision(tx: Transaction, now: int) -> int:
    value = next_version(tx.get_counter(LICENCE_REVISION), now)
    tx.set_counter(LICENCE_REVISION, value)
    return value


def _next_id(tx: Transaction, counter: str, prefix: str) -> str:
    value = tx.get_counter(counter) + 1
    tx.set_counter(counter, value)
    return f"{prefix}-{value:06d}"


def _customer(tx: Transaction, customer_id: str) -> Customer:
    c = tx.get_customer(customer_id)
    if c is None:
        raise NotFound(f"unknown customer {customer_id!r}")
    return c


def _licence(tx: Transaction, licence_id: str) -> LicenceRecord:
    lic = tx.get_licence(licence_id)
    if lic is None:
        raise NotFound(f"unknown licence {licence_id!r}")
    return lic


def _overlapping(
    tx: Transaction, candidate: LicenceRecord, ignore: str | None = None
) -> LicenceRecord | None:
    for other in tx.list_licences(candidate.customer_id):
        if other.licence_id == ignore or other.revoked is not None:
            continue
        if other.service != candidate.service:
            continue
        scopes_meet = (
            other.gateway_id is None
            or candidate.gateway_id is None
            or other.gateway_id == candidate.gateway_id
        )
        if (
            scopes_meet
            and other.valid_from <= candidate.valid_until
            and candidate.valid_from <= other.valid_until
        ):
            return other
    return None


def _touch_customer_licences(tx: Transaction, customer_id: str, now: int) -> None:
    """Bump the version of every licence of ``customer_id`` (its credentials changed)."""
    for lic in tx.list_licences(customer_id):
        tx.put_licence(replace(lic, version=next_version(lic.version, now)))


# ---------------------------------------------------------------------------- customers


def add_customer(
    repo: Repository, customer_id: str, name: str, *, now: int, actor: str
) -> Customer:
    """Create a customer; return it.  Raises InvalidInput, AlreadyExists."""
    check_id(customer_id, "customer id")
    name = _display_name(name)
    with repo.transaction() as tx:
        if tx.get_customer(customer_id) is not None:
            raise AlreadyExists(f"customer {customer_id!r} already exists")
        customer = Customer(customer_id, name, now)
        tx.add_customer(customer)
        _audit(tx, now, actor, "customer.add", customer_id, f"name={name!r}")
    return customer


# ---------------------------------------------------------------------------- gateways


def _b64_key(raw: object, what: str) -> bytes:
    if not isinstance(raw, str):
        raise InvalidInput(f"gateway.json: {what} must be base64 text")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"gateway.json: {what} is not base64") from e


def parse_gateway_json(data: bytes, central_key_id: str) -> dict[str, Any]:
    """Return the checked keys of a ``gateway.json``: gateway, outer/inner keys, suite.

    Raises InvalidInput if it is not the file ``optogate keys gateway``
    writes, if a key does not load or does not match its key id, or if it
    was provisioned for another central key.
    """
    if len(data) > MAX_GATEWAY_JSON:
        raise InvalidInput("gateway.json is too large")
    try:
        doc = json.loads(data)
        if doc["format"] != GATEWAY_JSON_FORMAT:
            raise InvalidInput(f"gateway.json format {doc['format']!r} is not supported")
        gateway = check_id(str(doc["gateway"]), "gateway name")
        if doc["central_key_id"] != central_key_id:
            raise InvalidInput(
                f"gateway {gateway!r} was provisioned for central key {doc['central_key_id']}, "
                f"not this central's {central_key_id}"
            )
        outer = doc["outer"]["signing"]
        inner_sign = doc["inner"]["signing"]
        hpke = doc["inner"]["hpke"]
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, InvalidInput):
            raise
        raise InvalidInput(f"not a gateway.json written by 'optogate keys gateway': {e}") from e
    try:
        outer_key = VerifyKey.from_raw(_b64_key(outer.get("public"), "outer signing key"))
        inner_key = VerifyKey.from_raw(_b64_key(inner_sign.get("public"), "inner signing key"))
        hpke_key = RecipientPublicKey.from_raw(_b64_key(hpke.get("public"), "inner HPKE key"))
    except (KeyFileError, AttributeError) as e:
        raise InvalidInput(f"gateway.json: a public key does not load: {e}") from e
    for key, entry, what in (
        (outer_key, outer, "outer signing"),
        (inner_key, inner_sign, "inner signing"),
        (hpke_key, hpke, "inner HPKE"),
    ):
        if entry.get("key_id") != key.key_id:
            raise InvalidInput(f"gateway.json: the {what} key does not match its key id")
    if hpke.get("suite") != hpke_key.suite.name:
        raise InvalidInput("gateway.json: the HPKE suite does not match the key")
    return {
        "gateway": gateway,
        "outer_signing": base64.b64encode(outer_key.raw).decode(),
        "inner_signing": base64.b64encode(inner_key.raw).decode(),
        "inner_hpke": base64.b64encode(hpke_key.raw).decode(),
        "hpke_suite": hpke_key.suite.name,
    }


def register_gateway(
    repo: Repository,
    gateway_json: bytes,
    customer_id: str,
    *,
    central_key_id: str,
    now: int,
    actor: str,
) -> Gateway:
    """Register the gateway described by ``gateway_json`` for ``customer_id``; return it.

    Re-registering the same keys is a no-op that returns the stored
    gateway.  Raises InvalidInput, NotFound (customer), AlreadyExists (the
    name is taken by other keys or by a revoked gateway).
    """
    keys = parse_gateway_json(gateway_json, central_key_id)
    with repo.transaction() as tx:
        _customer(tx, customer_id)
        existing = tx.get_gateway(keys["gateway"])
        if existing is not None:
            same = (
                existing.customer_id == customer_id
                and existing.outer_signing == keys["outer_signing"]
                and existing.inner_hpke == keys["inner_hpke"]
                and existing.inner_signing == keys["inner_signing"]
                and existing.revoked is None
            )
            if same:
                return existing
            raise AlreadyExists(f"gateway {keys['gateway']!r} is already registered")
        gateway = Gateway(
            gateway_id=keys["gateway"],
            customer_id=customer_id,
            outer_signing=keys["outer_signing"],
            inner_signing=keys["inner_signing"],
            inner_hpke=keys["inner_hpke"],
            hpke_suite=keys["hpke_suite"],
            registered=now,
        )
        tx.put_gateway(gateway)
        _bump_revision(tx, now)
        _audit(tx, now, actor, "gateway.register", gateway.gateway_id, f"customer={customer_id}")
    return gateway


def revoke_gateway(repo: Repository, gateway_id: str, *, now: int, actor: str) -> Gateway:
    """Revoke a gateway: central refuses its outer module from now on.  Return it.

    Raises NotFound, Conflict (already revoked).
    """
    with repo.transaction() as tx:
        gw = tx.get_gateway(gateway_id)
        if gw is None:
            raise NotFound(f"unknown gateway {gateway_id!r}")
        if gw.revoked is not None:
            raise Conflict(f"gateway {gateway_id!r} is already revoked")
        gw = replace(gw, revoked=now)
        tx.put_gateway(gw)
        _bump_revision(tx, now)
        _audit(tx, now, actor, "gateway.revoke", gateway_id, "")
    return gw


def gateway_keys(gateway: Gateway) -> tuple[VerifyKey, VerifyKey, RecipientPublicKey]:
    """Return (outer signing key, inner signing key, inner HPKE key) of a stored gateway."""
    outer = VerifyKey.from_raw(base64.b64decode(gateway.outer_signing))
    inner = VerifyKey.from_raw(base64.b64decode(gateway.inner_signing))
    hpke = RecipientPublicKey.from_raw(base64.b64decode(gateway.inner_hpke))
    if hpke.suite is not HpkeSuite[gateway.hpke_suite]:
        raise InvalidInput(f"gateway {gateway.gateway_id}: stored HPKE suite does not match")
    return outer, inner, hpke


# ---------------------------------------------------------------------------- services


def check_bundle(data: bytes, trusted: Iterable[VerifyKey]) -> tuple[Bundle, VerifyKey]:
    """Return the parsed bundle and the trusted key whose signature verified.

    Raises InvalidInput when the manifest, digest or encoding is wrong, the
    bundle is unsigned, or no trusted key verifies its signature.
    """
    try:
        bundle = load_bundle(data)
    except BundleError as e:
        raise InvalidInput(f"bundle refused: {e}") from e
    if bundle.signature is None:
        raise InvalidInput(f"bundle {bundle.manifest.name!r} is not signed")
    for key in trusted:
        if key.key_id == bundle.signature.key_id:
            try:
                bundle.verify(key)
            except BundleError as e:
                raise InvalidInput(f"bundle refused: {e}") from e
            return bundle, key
    raise InvalidInput(
        f"bundle {bundle.manifest.name!r} is signed by key {bundle.signature.key_id}, "
        "which is not a trusted publisher key"
    )


def publish_service(
    repo: Repository, data: bytes, trusted: Iterable[VerifyKey], *, now: int, actor: str
) -> tuple[BundleVersion, bool]:
    """Publish a bundle; return (its version record, True if newly published).

    The service is the manifest's name and the version its version, which
    must be above every published one (the same bytes again is a no-op).
    A refused bundle is audited.  Raises InvalidInput (bad manifest,
    digest, encoding or signature), Conflict (version not above the latest,
    or the same version with other content).
    """
    try:
        bundle, key = check_bundle(data, trusted)
    except InvalidInput as e:
        with repo.transaction() as tx:
            tx.append_audit(AuditEntry(now, actor, "service.publish", "-", False, str(e)))
        raise
    name, version = bundle.manifest.name, bundle.manifest.version
    blob = repo.blobs.put(data)  # before the reference: a crash leaves at most an orphan
    with repo.transaction() as tx:
        versions = tx.list_bundles(name)
        for b in versions:
            if b.version == version:
                if b.blob == blob:
                    return b, False
                raise Conflict(f"{name} version {version} is already published with other content")
        if versions and version < versions[-1].version:
            raise Conflict(
                f"{name} version {version} is older than the published {versions[-1].version}"
            )
        record = BundleVersion(name, version, blob, len(data), now, key.key_id)
        tx.add_bundle(record)
        _bump_revision(tx, now)
        _audit(tx, now, actor, "service.publish", name, f"version={version} sha256={blob}")
    return record, True


# ---------------------------------------------------------------------------- licences


def issue_licence(
    repo: Repository,
    *,
    customer_id: str,
    service: str,
    valid_from: int,
    valid_until: int,
    gateway_id: str | None,
    now: int,
    actor: str,
) -> LicenceRecord:
    """Issue a licence; return it.

    Raises InvalidInput (``valid_from > valid_until``), NotFound (customer,
    service, gateway), Conflict (the gateway is another customer's, or the
    period overlaps another live licence of the same customer and service).
    """
    if valid_from > valid_until:
        raise InvalidInput("--from is after --until")
    with repo.transaction() as tx:
        _customer(tx, customer_id)
        if not tx.list_bundles(service):
            raise NotFound(f"unknown service {service!r}: publish it first")
        if gateway_id is not None:
            gw = tx.get_gateway(gateway_id)
            if gw is None:
                raise NotFound(f"unknown gateway {gateway_id!r}")
            if gw.customer_id != customer_id:
                raise Conflict(f"gateway {gateway_id!r} belongs to customer {gw.customer_id!r}")
        licence = LicenceRecord(
            licence_id="",
            customer_id=customer_id,
            service=service,
            gateway_id=gateway_id,
            valid_from=valid_from,
            valid_until=valid_until,
            version=next_version(0, now),
            created=now,
        )
        clash = _overlapping(tx, licence)
        if clash is not None:
            raise Conflict(
                f"period overlaps licence {clash.licence_id} "
                f"({format_time(clash.valid_from)} .. {format_time(clash.valid_until)})"
            )
        licence = replace(licence, licence_id=_next_id(tx, "licence_ids", "lic"))
        tx.put_licence(licence)
        _bump_revision(tx, now)
        _audit(
            tx,
            now,
            actor,
            "licence.issue",
            licence.licence_id,
            f"customer={customer_id} service={service} gateway={gateway_id or '*'} "
            f"from={format_time(valid_from)} until={format_time(valid_until)}",
        )
    return licence


def record_payment(
    repo: Repository,
    *,
    licence_id: str,
    amount_minor: int,
    currency: str,
    extend_seconds: int,
    now: int,
    actor: str,
) -> tuple[Payment, LicenceRecord]:
    """Record a payment and extend the licence; return (payment, updated licence).

    The licence then ends ``extend_seconds`` after the later of its current
    end and ``now`` (paying for a lapsed licence buys time from today), and
    its version grows.  Raises InvalidInput (currency, non-positive values),
    NotFound, Conflict (revoked, or the extension would overlap another
    licence of the same customer and service).
    """
    if not _CURRENCY_RE.fullmatch(currency):
        raise InvalidInput(f"currency {currency!r} must be three capital letters")
    if amount_minor <= 0 or extend_seconds <= 0:
        raise InvalidInput("amount and extension must be positive")
    with repo.transaction() as tx:
        lic = _licence(tx, licence_id)
        if lic.revoked is not None:
            raise Conflict(f"licence {licence_id} is revoked")
        until = max(lic.valid_until, now) + extend_seconds
        updated = replace(lic, valid_until=until, version=next_version(lic.version, now))
        clash = _overlapping(tx, updated, ignore=licence_id)
        if clash is not None:
            raise Conflict(f"the extension would overlap licence {clash.licence_id}")
        payment = Payment(
            payment_id=_next_id(tx, "payment_ids", "pay"),
            licence_id=licence_id,
            amount_minor=amount_minor,
            currency=currency,
            extend_seconds=extend_seconds,
            at=now,
            new_valid_until=until,
        )
        tx.add_payment(payment)
        tx.put_licence(updated)
        _bump_revision(tx, now)
        _audit(
            tx,
            now,
            actor,
            "payment.record",
            licence_id,
            f"payment={payment.payment_id} amount={amount_minor / 100:.2f} {currency} "
            f"until={format_time(until)} version={updated.version}",
        )
    return payment, updated


def revoke_licence(repo: Repository, licence_id: str, *, now: int, actor: str) -> LicenceRecord:
    """Revoke a licence; return it.  Raises NotFound, Conflict (already revoked)."""
    with repo.transaction() as tx:
        lic = _licence(tx, licence_id)
        if lic.revoked is not None:
            raise Conflict(f"licence {licence_id} is already revoked")
        lic = replace(lic, revoked=now, version=next_version(lic.version, now))
        tx.put_licence(lic)
        _bump_revision(tx, now)
        _audit(tx, now, actor, "licence.revoke", licence_id, f"version={lic.version}")
    return lic


# ---------------------------------------------------------------------------- client keys


@dataclass(frozen=True)
class IssuedClientKey:
    """A newly issued client key: show ``secret`` once; only ``record.key_hash`` is stored."""

    record: ClientKey
    secret: str = ""

    def __repr__(self) -> str:
        return f"IssuedClientKey(record={self.record!r})"


def issue_client_key(
    repo: Repository, customer_id: str, label: str, *, now: int, actor: str
) -> IssuedClientKey:
    """Issue a client API key for ``customer_id``; return it (the secret is not stored).

    Every licence of the customer gets a new version, since its credentials
    change.  Raises NotFound, InvalidInput (label).
    """
    label = _display_name(label) if label else ""
    issued = generate_api_key()
    with repo.transaction() as tx:
        _customer(tx, customer_id)
        record = ClientKey(
            key_id=_next_id(tx, "client_key_ids", "key"),
            customer_id=customer_id,
            key_hash=issued.key_hash,
            label=label,
            created=now,
        )
        tx.add_client_key(record)
        _touch_customer_licences(tx, customer_id, now)
        _bump_revision(tx, now)
        _audit(tx, now, actor, "client_key.issue", record.key_id, f"customer={customer_id}")
    return IssuedClientKey(record, issued.secret)


def revoke_client_key(repo: Repository, key_id: str, *, now: int, actor: str) -> ClientKey:
    """Revoke a client API key: it leaves every licence of its customer.  Return it.

    Raises NotFound, Conflict (already revoked).
    """
    with repo.transaction() as tx:
        found = [k for k in tx.list_client_keys() if k.key_id == key_id]
        if not found:
            raise NotFound(f"unknown client key {key_id!r}")
        key = found[0]
        if key.revoked is not None:
            raise Conflict(f"client key {key_id} is already revoked")
        key = replace(key, revoked=now)
        tx.put_client_key(key)
        _touch_customer_licences(tx, key.customer_id, now)
        _bump_revision(tx, now)
        _audit(tx, now, actor, "client_key.revoke", key_id, f"customer={key.customer_id}")
    return key


# ---------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class UsageLine:
    """One line of a usage report: a service's calls, units and traffic in the month.

    ``failed`` counts the calls whose outcome was not "ok"; ``duration_ms``
    is the time all calls took; the bytes are request and answer bodies.
    """

    service: str
    licence_id: str
    gateway_id: str
    calls: int
    units: int
    failed: int = 0
    duration_ms: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def usage_report(repo: Repository, customer_id: str, month: str) -> list[UsageLine]:
    """Return the customer's usage in ``month`` (YYYY-MM), one line per service/licence/gateway.

    Raises InvalidInput (month), NotFound (customer).
    """
    start, end = parse_month(month)
    tx = repo.snapshot()
    _customer(tx, customer_id)
    totals: dict[tuple[str, str, str], list[int]] = {}
    rows: list[UsageRow] = tx.list_usage(customer_id, start, end)
    for row in rows:
        entry = totals.setdefault((row.service, row.licence_id, row.gateway_id), [0] * 6)
        entry[0] += 1
        entry[1] += row.units
        entry[2] += row.outcome != "ok"
        entry[3] += row.duration_ms
        entry[4] += row.bytes_in
        entry[5] += row.bytes_out
    return [
        UsageLine(service, licence, gateway, *counts)
        for (service, licence, gateway), counts in sorted(totals.items())
    ]


def licences_for(tx: Transaction, gateway: Gateway) -> list[LicenceRecord]:
    """Return the licences that apply to ``gateway``."""
    return [lic for lic in tx.list_licences(gateway.customer_id) if applies_to(lic, gateway)]


__all__ = [
    "IssuedClientKey",
    "OptogateError",
    "UsageLine",
    "add_customer",
    "check_bundle",
    "issue_client_key",
    "issue_licence",
    "parse_amount",
    "parse_duration",
    "parse_gateway_json",
    "parse_month",
    "parse_time",
    "publish_service",
    "record_payment",
    "register_gateway",
    "revoke_client_key",
    "revoke_gateway",
    "revoke_licence",
    "usage_report",
]
