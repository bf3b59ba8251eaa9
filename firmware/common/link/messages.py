"""Typed messages carried by the framed session (sans-I/O, pure).

Theory of operation
-------------------
Every message kind in :class:`~firmware.common.link.kinds.Kind` has exactly
one frozen dataclass here.  The session moves opaque ``(kind, payload)``
pairs; this module turns a message object into that payload and back.

The payload is one CBOR map, the *envelope*::

    {"v": 2, "id": <corr id>, "re": <corr id answered, or null>, "body": {...}}

``v`` is the message format version, ``id`` the sender's correlation id for
this message, ``re`` the ``id`` of the request a reply answers (null in a
request) and ``body`` the message's fields by name.  The kind itself is not
repeated: it travels in every frame header, where the isolator can see it.

Decoding is strict, because the payload comes from the other side of a
security boundary: every field must be present, no field may be added, every
value must have its declared CBOR type and lie within its declared bounds
(lengths are capped per field), a reply must name the request it answers and
a request must not.  The payload must also be the *canonical* CBOR encoding
(definite lengths, shortest integer and float forms, map keys in length-first
order, no tags, nothing after the envelope), checked by re-encoding, so every
message has exactly one encoding.  Any violation raises
:class:`InvalidMessage` (a :class:`~firmware.common.errors.MessageError`);
decoding never raises anything else, whatever the bytes.

Constructing a message with a bad field value raises
:class:`~firmware.common.errors.LocalProtocolError`: that is a bug on the
sending side, caught before anything reaches the wire.

The field table of every message is in docs/wire-protocol.md, section 3.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

import cbor2

from firmware.common.errors import LocalProtocolError, MessageError
from firmware.common.link.kinds import Kind

#: Version of the envelope and of every body below.  A change to any field is
#: a new version; a decoder accepts exactly the version it was built for.
FORMAT_VERSION: Final = 2

#: Largest encoded message: the session's own cap (``SessionConfig.max_message``).
MAX_MESSAGE: Final = 64 * 2**20

#: Correlation ids are unsigned 32-bit numbers; senders count up and wrap.
MAX_CORR_ID: Final = 2**32 - 1

#: Integers in bodies are bounded to what every CBOR implementation (and the
#: isolator's MicroPython) handles natively: signed 64-bit.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

#: Nesting of a valid envelope: envelope -> body -> a map field -> scalar.
MAX_DEPTH: Final = 4

# Per-field caps.  Sealed objects: a compressed, sealed algorithm bundle is
# the largest thing on the link; it must fit one message, so it may use
# (almost) the whole 64 MiB.  Licences and sync data are signed records of a
# few KiB each: 16 MiB leaves room for thousands of them and still bounds a
# hostile peer.  Names and codes are short identifiers.
MAX_BUNDLE: Final = 64 * 2**20
MAX_SEALED: Final = 16 * 2**20
MAX_NAME: Final = 128  # service names, gateway ids (UTF-8 bytes)
MAX_CODE: Final = 64  # error codes
MAX_DETAIL: Final = 4096  # human-readable error detail
MAX_NONCE: Final = 64  # challenge and echo nonces
MAX_SIGNATURE: Final = 1024  # an Ed25519 signature is 64 bytes; room for others
MAX_STATUS_ENTRIES: Final = 256
MAX_STATUS_KEY: Final = 64
MAX_STATUS_TEXT: Final = 1024
#: One ServicePart: a relay forwards central's parts as they come, so the
#: cap bounds what one part may hold, not how a sender cuts a bundle.
MAX_PART: Final = 64 * 2**10
#: How the link cuts a Service bundle it streams (see :func:`split_service`):
#: small enough that a relay passes a part on a fraction of a second after
#: it arrived over a modem, large enough that the envelope (~30 bytes) is
#: under 1% of it.
PART_SIZE: Final = 4096
#: One LinkData chunk: the link test sends 64 KiB chunks; 16 MiB bounds a peer.
MAX_CHUNK: Final = 16 * 2**20
SHA256_SIZE: Final = 32
#: A retry hint beyond a year is a bug on the server, not a schedule.
MAX_RETRY_AFTER: Final = 366 * 86400.0

#: Error codes are stable identifiers programs match on, not prose.
ERROR_CODE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*")
#: Status keys are identifiers too (they become metric names).
STATUS_KEY_PATTERN: Final = re.compile(r"[a-z][a-z0-9_.]*")

_ENVELOPE_KEYS: Final = frozenset({"v", "id", "re", "body"})


class InvalidMessage(MessageError):
    """A payload failed strict decoding.

    ``corr_id`` and ``reply_to`` are filled in when the envelope itself was
    readable (so a server can answer the request with an error, or a client
    can fail the exchange the broken reply belongs to); otherwise None.
    """

    def __init__(
        self, reason: str, *, corr_id: int | None = None, reply_to: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.corr_id = corr_id
        self.reply_to = reply_to


# --------------------------------------------------------------------------
# field specifications


class _Spec:
    """How one field is typed and bounded.  ``problem`` returns None when fine."""

    optional = False

    def problem(self, value: object) -> str | None:
        raise NotImplementedError

    def coerce(self, value: object) -> object:
        """Return the value to store for a locally constructed message."""
        return value


@dataclass(frozen=True)
class _Bytes(_Spec):
    max: int
    min: int = 0

    def problem(self, value: object) -> str | None:
        if type(value) is not bytes:
            return f"expected bytes, got {type(value).__name__}"
        if not self.min <= len(value) <= self.max:
            return f"length {len(value)} outside {self.min}..{self.max}"
        return None


@dataclass(frozen=True)
class _Text(_Spec):
    max: int  # in UTF-8 bytes
    min: int = 1
    pattern: re.Pattern[str] | None = None

    def problem(self, value: object) -> str | None:
        if type(value) is not str:
            return f"expected text, got {type(value).__name__}"
        if len(value) > self.max:  # cheap bound before encoding
            return f"longer than {self.max} bytes"
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return "not encodable as UTF-8"
        if not self.min <= n <= self.max:
            return f"length {n} outside {self.min}..{self.max}"
        if self.pattern is not None and not self.pattern.fullmatch(value):
            return f"does not match {self.pattern.pattern}"
        return None


@dataclass(frozen=True)
class _Int(_Spec):
    min: int = INT64_MIN
    max: int = INT64_MAX
    optional: bool = False

    def problem(self, value: object) -> str | None:
        if value is None and self.optional:
            return None
        if type(value) is not int:
            return f"expected integer, got {type(value).__name__}"
        if not self.min <= value <= self.max:
            return f"{value} outside {self.min}..{self.max}"
        return None


@dataclass(frozen=True)
class _Float(_Spec):
    min: float = -math.inf
    max: float = math.inf
    optional: bool = False

    def problem(self, value: object) -> str | None:
        if value is None and self.optional:
            return None
        if type(value) is not float:
            return f"expected float, got {type(value).__name__}"
        if not math.isfinite(value):
            return "not finite"
        if not self.min <= value <= self.max:
            return f"{value} outside {self.min}..{self.max}"
        return None

    def coerce(self, value: object) -> object:
        # ``sent_at=5`` is a float to every Python reader; store it as one so
        # the encoding (and equality after a round trip) is the same.
        return float(value) if type(value) is int else value


@dataclass(frozen=True)
class _Bool(_Spec):
    def problem(self, value: object) -> str | None:
        return None if type(value) is bool else f"expected bool, got {type(value).__name__}"


@dataclass(frozen=True)
class _ScalarMap(_Spec):
    """Text keys to text, integer, float or bool values (a status summary)."""

    max_entries: int
    key: _Text
    text: _Text
    number: _Int = _Int()
    real: _Float = _Float()

    def problem(self, value: object) -> str | None:
        if type(value) is not dict:
            return f"expected map, got {type(value).__name__}"
        if len(value) > self.max_entries:
            return f"more than {self.max_entries} entries"
        for k, v in value.items():
            p = self.key.problem(k)
            if p is not None:
                return f"key {k!r}: {p}"
            if type(v) is bool:
                continue
            spec: _Spec
            if type(v) is str:
                spec = self.text
            elif type(v) is int:
                spec = self.number
            elif type(v) is float:
                spec = self.real
            else:
                return f"entry {k!r}: unsupported type {type(v).__name__}"
            p = spec.problem(v)
            if p is not None:
                return f"entry {k!r}: {p}"
        return None

    def coerce(self, value: object) -> object:
        # A private copy, so the caller cannot change a frozen message later.
        return dict(value) if isinstance(value, dict) else value


_REQUIRED: Final = object()


def _f(spec: _Spec, default: object = _REQUIRED) -> Any:
    """Declare a dataclass field checked by ``spec`` (required unless given a default)."""
    if default is _REQUIRED:
        return field(metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


# --------------------------------------------------------------------------
# the message classes


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message.  ``KIND`` is its kind; ``IS_REPLY`` whether it answers."""

    KIND: ClassVar[Kind]
    IS_REPLY: ClassVar[bool]

    def __post_init__(self) -> None:
        for name, spec in _specs(type(self)):
            value = spec.coerce(getattr(self, name))
            problem = spec.problem(value)
            if problem is not None:
                raise LocalProtocolError(f"{type(self).__name__}.{name}: {problem}")
            object.__setattr__(self, name, value)


def body_of(msg: Message) -> dict[str, object]:
    """Return the body of ``msg``: field name -> value, in declaration order."""
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


_M = TypeVar("_M", bound=type[Message])
_REGISTRY: dict[Kind, type[Message]] = {}
_SPECS: dict[type[Message], tuple[tuple[str, _Spec], ...]] = {}


def _specs(cls: type[Message]) -> tuple[tuple[str, _Spec], ...]:
    try:
        return _SPECS[cls]
    except KeyError:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message") from None


def _message(kind: Kind, *, reply: bool) -> Callable[[_M], _M]:
    """Register a message class for ``kind`` (applied over ``@dataclass``)."""

    def register(cls: _M) -> _M:
        if kind in _REGISTRY:
            raise LocalProtocolError(f"kind {kind!r} registered twice")
        specs = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("spec")
            if not isinstance(spec, _Spec):
                raise LocalProtocolError(f"{cls.__name__}.{f.name} has no field spec")
            specs.append((f.name, spec))
        cls.KIND = kind
        cls.IS_REPLY = reply
        _SPECS[cls] = tuple(specs)
        _REGISTRY[kind] = cls
        return cls

    return register


# requests: client -> server


@_message(Kind.FETCH_SERVICE, reply=False)
@dataclass(frozen=True, slots=True)
class FetchService(Message):
    """Ask for the sealed bundle and licence of ``service``.

    ``have_version`` is the bundle version already installed (None: none), so
    the server can answer without resending an unchanged bundle.
    """

    service: str = _f(_Text(MAX_NAME))
    have_version: int | None = _f(_Int(0, INT64_MAX, optional=True), None)


@_message(Kind.SYNC, reply=False)
@dataclass(frozen=True, slots=True)
class Sync(Message):
    """Ask for fresh sync metadata and the licence set it lists.

    ``since_version`` is the version of the licence set the gateway holds (0:
    none); when that is the set the metadata lists, it is not resent.
    """

    since_version: int = _f(_Int(0, INT64_MAX))


@_message(Kind.USAGE_REPORT, reply=False)
@dataclass(frozen=True, slots=True)
class UsageReport(Message):
    """Deliver one signed batch of usage records."""

    batch: bytes = _f(_Bytes(MAX_SEALED, 1))


@_message(Kind.STATUS, reply=False)
@dataclass(frozen=True, slots=True)
class Status(Message):
    """Ask the server for its status summary."""


@_message(Kind.AUTH_BEGIN, reply=False)
@dataclass(frozen=True, slots=True)
class AuthBegin(Message):
    """Uplink: the gateway names itself and asks for a challenge."""

    gateway_id: str = _f(_Text(MAX_NAME))


@_message(Kind.AUTH_PROOF, reply=False)
@dataclass(frozen=True, slots=True)
class AuthProof(Message):
    """Uplink: the gateway's signature over the challenge."""

    signature: bytes = _f(_Bytes(MAX_SIGNATURE, 1))


# replies: server -> client


@_message(Kind.SERVICE, reply=True)
@dataclass(frozen=True, slots=True)
class Service(Message):
    """The sealed bundle and the sealed licence/authentication data of a service.

    ``streamed`` is 0 when ``sealed_bundle`` is carried here (empty: the
    holder's version is current).  Otherwise the bundle went ahead in
    ``streamed`` bytes of :class:`ServicePart` replies to the same request,
    and ``sealed_bundle`` is empty; the receiving link joins the parts and
    hands its caller a Service with the whole bundle and ``streamed`` 0.
    """

    sealed_bundle: bytes = _f(_Bytes(MAX_BUNDLE))
    sealed_licence: bytes = _f(_Bytes(MAX_SEALED, 1))
    streamed: int = _f(_Int(0, MAX_BUNDLE), 0)

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if self.streamed and self.sealed_bundle:
            raise LocalProtocolError("Service: a streamed bundle is not also carried inline")


@_message(Kind.SERVICE_PART, reply=True)
@dataclass(frozen=True, slots=True)
class ServicePart(Message):
    """``data`` is the bundle's bytes at ``offset`` of a streamed :class:`Service` reply.

    Parts of one reply may arrive in any order (bulk messages share the line),
    before or after the Service that ends it.
    """

    offset: int = _f(_Int(0, MAX_BUNDLE - 1))
    data: bytes = _f(_Bytes(MAX_PART, 1))


@_message(Kind.SYNC_DATA, reply=True)
@dataclass(frozen=True, slots=True)
class SyncData(Message):
    """Sealed sync data answering :class:`Sync`.

    ``sealed`` is the sync metadata (kind 3: central's signed time and the
    current version of every object); ``sealed_licences`` the gateway's
    licence set (kind 2) that metadata lists, empty only if none is sent.
    """

    sealed: bytes = _f(_Bytes(MAX_SEALED, 1))
    sealed_licences: bytes = _f(_Bytes(MAX_SEALED), b"")


@_message(Kind.USAGE_ACK, reply=True)
@dataclass(frozen=True, slots=True)
class UsageAck(Message):
    """The server has stored the usage batch ``batch_id``; the client may drop it.

    ``sealed_ack`` is central's signed acknowledgement (a sealed object of
    kind 4, see ``firmware/common/uplink.py``), empty only from a server
    that does not sign acks.
    """

    batch_id: str = _f(_Text(MAX_NAME))
    sealed_ack: bytes = _f(_Bytes(MAX_SEALED), b"")


_STATUS_FIELDS: Final = _ScalarMap(
    MAX_STATUS_ENTRIES,
    key=_Text(MAX_STATUS_KEY, pattern=STATUS_KEY_PATTERN),
    text=_Text(MAX_STATUS_TEXT, min=0),
)


@_message(Kind.STATUS_REPORT, reply=True)
@dataclass(frozen=True, slots=True)
class StatusReport(Message):
    """The server's status summary: identifier keys to scalar values."""

    # _f returns a dataclasses.field(), not a shared mutable default
    fields: dict[str, str | int | float | bool] = _f(_STATUS_FIELDS)  # noqa: RUF009


@_message(Kind.AUTH_CHALLENGE, reply=True)
@dataclass(frozen=True, slots=True)
class AuthChallenge(Message):
    """Uplink: a fresh nonce for the gateway to sign."""

    nonce: bytes = _f(_Bytes(MAX_NONCE, 16))


@_message(Kind.AUTH_OK, reply=True)
@dataclass(frozen=True, slots=True)
class AuthOk(Message):
    """Uplink: the gateway is authenticated."""


@_message(Kind.ERROR, reply=True)
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A typed error answering any request.

    ``code`` is a stable identifier (``[a-z][a-z0-9_]*``), ``detail`` prose for
    people, ``retry_after`` a hint in seconds (None: do not retry on a timer).
    """

    code: str = _f(_Text(MAX_CODE, pattern=ERROR_CODE_PATTERN))
    detail: str = _f(_Text(MAX_DETAIL, min=0))
    retry_after: float | None = _f(_Float(0.0, MAX_RETRY_AFTER, optional=True), None)


# link maintenance: either direction


@_message(Kind.LINK_ECHO, reply=False)
@dataclass(frozen=True, slots=True)
class LinkEcho(Message):
    """Round-trip probe; the far end answers with :class:`LinkEchoReply`."""

    nonce: bytes = _f(_Bytes(MAX_NONCE, 1))
    sent_at: float = _f(_Float())


@_message(Kind.LINK_ECHO_REPLY, reply=True)
@dataclass(frozen=True, slots=True)
class LinkEchoReply(Message):
    """Answer to :class:`LinkEcho`: its nonce and timestamp, unchanged."""

    nonce: bytes = _f(_Bytes(MAX_NONCE, 1))
    sent_at: float = _f(_Float())


@_message(Kind.LINK_DATA, reply=False)
@dataclass(frozen=True, slots=True)
class LinkData(Message):
    """One chunk of bulk test transfer ``transfer``; the chunk with ``last`` set
    is answered by :class:`LinkDigest` over all its chunks in ``index`` order."""

    chunk: bytes = _f(_Bytes(MAX_CHUNK))
    index: int = _f(_Int(0, MAX_CORR_ID))
    last: bool = _f(_Bool())
    #: Random per transfer, so the far end never mixes chunks of two tests.
    transfer: int = _f(_Int(0, MAX_CORR_ID), 0)


@_message(Kind.LINK_DIGEST, reply=True)
@dataclass(frozen=True, slots=True)
class LinkDigest(Message):
    """SHA-256 and length of every chunk of a bulk test transfer, in index order."""

    sha256: bytes = _f(_Bytes(SHA256_SIZE, SHA256_SIZE))
    nbytes: int = _f(_Int(0, INT64_MAX))


#: kind -> message class, for every kind in :class:`Kind`.
MESSAGE_TYPES: Final[Mapping[Kind, type[Message]]] = _REGISTRY


#: request kind -> the kind of its normal reply (any request may instead get Error).
REPLY_KIND: Final[Mapping[Kind, Kind]] = {
    Kind.FETCH_SERVICE: Kind.SERVICE,
    Kind.SYNC: Kind.SYNC_DATA,
    Kind.USAGE_REPORT: Kind.USAGE_ACK,
    Kind.STATUS: Kind.STATUS_REPORT,
    Kind.AUTH_BEGIN: Kind.AUTH_CHALLENGE,
    Kind.AUTH_PROOF: Kind.AUTH_OK,
    Kind.LINK_ECHO: Kind.LINK_ECHO_REPLY,
    Kind.LINK_DATA: Kind.LINK_DIGEST,
}


#: request kind -> the kind of the parts its reply may be streamed in.
PART_KIND: Final[Mapping[Kind, Kind]] = {Kind.FETCH_SERVICE: Kind.SERVICE_PART}


def split_service(reply: Service, part_size: int = PART_SIZE) -> Iterator[Message]:
    """Yield ``reply`` as streamed: its bundle in ServiceParts, then the Service that ends it.

    A reply whose bundle fits one part (or is already streamed) is yielded
    unchanged, alone.  Raises LocalProtocolError for a part size outside
    1..MAX_PART.
    """
    if not 1 <= part_size <= MAX_PART:
        raise LocalProtocolError(f"part size {part_size} outside 1..{MAX_PART}")
    bundle = reply.sealed_bundle
    if len(bundle) <= part_size:
        yield reply
        return
    view = memoryview(bundle)
    for offset in range(0, len(bundle), part_size):
        yield ServicePart(offset=offset, data=bytes(view[offset : offset + part_size]))
    yield Service(sealed_bundle=b"", sealed_licence=reply.sealed_licence, streamed=len(bundle))


def message_type(kind: int) -> type[Message]:
    """Return the message class for ``kind``.  Raises InvalidMessage for an unknown kind."""
    try:
        return _REGISTRY[Kind(kind)]
    except (ValueError, KeyError):
        raise InvalidMessage(f"unknown message kind {kind:#04x}") from None


# --------------------------------------------------------------------------
# envelope


def encode(msg: Message, corr_id: int, reply_to: int | None = None) -> bytes:
    """Return the canonical CBOR payload for ``msg`` (its kind is ``msg.KIND``).

    ``corr_id`` identifies this message; ``reply_to`` is the ``corr_id`` of the
    request a reply answers and must be None for a request.  Raises
    LocalProtocolError for an unregistered message, ids out of range, a reply
    without ``reply_to`` (or a request with one) or a result over MAX_MESSAGE.
    """
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "KIND", None)) is not cls:  # type: ignore[arg-type]
        raise LocalProtocolError(f"{cls.__name__} is not a registered message")
    _check_id("corr_id", corr_id)
    if cls.IS_REPLY:
        if reply_to is None:
            raise LocalProtocolError(f"{cls.__name__} is a reply: reply_to is required")
        _check_id("reply_to", reply_to)
    elif reply_to is not None:
        raise LocalProtocolError(f"{cls.__name__} is a request: reply_to must be None")
    envelope = {"v": FORMAT_VERSION, "id": corr_id, "re": reply_to, "body": body_of(msg)}
    data: bytes = cbor2.dumps(envelope, canonical=True)
    if len(data) > MAX_MESSAGE:
        raise LocalProtocolError(f"encoded message of {len(data)} bytes > {MAX_MESSAGE}")
    return data


def _check_id(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_CORR_ID:
        raise LocalProtocolError(f"{name} must be an integer in 0..{MAX_CORR_ID}")


class _RejectEveryTag(Mapping[int, Callable[..., object]]):
    """A semantic-decoder table that claims every tag and rejects it.

    Messages use no CBOR tags; refusing them while decoding (rather than after)
    keeps cbor2 from building dates, big numbers or regular expressions out of
    hostile input at all.
    """

    def __getitem__(self, tag: int) -> Callable[..., object]:
        return _reject_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _reject_tag(*_: object) -> object:
    raise InvalidMessage("CBOR tags are not allowed")


_NO_TAGS: Final = _RejectEveryTag()


def decode(kind: int, data: bytes) -> tuple[Message, int, int | None]:
    """Parse a payload received with ``kind``.

    Returns ``(message, corr_id, reply_to)``; ``reply_to`` is None for a
    request.  Raises InvalidMessage (a MessageError) for an unknown kind,
    malformed or non-canonical CBOR, a wrong format version, a missing or
    extra field, a value of the wrong type or out of bounds, or a reply
    without ``re`` / a request with one.  Never raises anything else.
    """
    cls = message_type(kind)
    if len(data) > MAX_MESSAGE:
        raise InvalidMessage(f"message of {len(data)} bytes > {MAX_MESSAGE}")
    try:
        obj = cbor2.loads(
            data,
            tag_hook=_reject_tag,
            semantic_decoders=_NO_TAGS,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
    except Exception as e:  # hostile bytes may make a decoder raise anything
        raise InvalidMessage(f"not valid CBOR: {e}") from e
    if type(obj) is not dict or set(obj) != _ENVELOPE_KEYS:
        raise InvalidMessage("envelope must be a map with exactly v, id, re, body")
    version, corr_id, reply_to, body = obj["v"], obj["id"], obj["re"], obj["body"]
    if version != FORMAT_VERSION or type(version) is not int:
        raise InvalidMessage(f"unsupported format version {version!r}")
    if type(corr_id) is not int or not 0 <= corr_id <= MAX_CORR_ID:
        raise InvalidMessage("id must be an integer in 0..2**32-1")
    if reply_to is not None and (type(reply_to) is not int or not 0 <= reply_to <= MAX_CORR_ID):
        raise InvalidMessage("re must be null or an integer in 0..2**32-1", corr_id=corr_id)
    ids = {"corr_id": corr_id, "reply_to": reply_to}
    if cls.IS_REPLY and reply_to is None:
        raise InvalidMessage(f"{cls.__name__} is a reply but names no request", **ids)
    if not cls.IS_REPLY and reply_to is not None:
        raise InvalidMessage(f"{cls.__name__} is a request but carries re", **ids)
    if type(body) is not dict:
        raise InvalidMessage("body must be a map", **ids)
    specs = _specs(cls)
    names = {name for name, _ in specs}
    missing = sorted(names - body.keys())
    if missing:
        raise InvalidMessage(f"{cls.__name__}: missing field {missing[0]}", **ids)
    extra = [k for k in body if k not in names]
    if extra:
        raise InvalidMessage(f"{cls.__name__}: unexpected field {extra[0]!r}", **ids)
    for name, spec in specs:
        problem = spec.problem(body[name])
        if problem is not None:
            raise InvalidMessage(f"{cls.__name__}.{name}: {problem}", **ids)
    if cbor2.dumps(obj, canonical=True) != data:
        raise InvalidMessage("not the canonical encoding (or trailing bytes)", **ids)
    try:
        msg = cls(**body)
    except LocalProtocolError as e:  # a rule across fields (e.g. Service.streamed)
        raise InvalidMessage(str(e), **ids) from e
    return msg, corr_id, reply_to
