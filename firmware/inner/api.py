"""The LAN API (docs/api.md): aiohttp handlers over the trust state, builder and meter.

Theory of operation
-------------------
Every route's handler runs inside :meth:`InnerApi._serve`, which

1. **authenticates**: every path but ``GET /v1/health`` needs
   ``Authorization: Bearer <key>`` naming a key some licence lists.
   Addresses with too many failures get 429 (:mod:`firmware.inner.limiter`).
   Unknown paths (a catch-all route) are authenticated first too, so nothing
   but health answers a stranger;
2. **answers errors**: every refusal becomes the JSON error body of
   docs/api.md (``{"error": {"code", "message", ...}}``) with its stable
   code, and any unexpected exception a 500 that reveals nothing (the
   operator's log gets the exception's type).

This is one coroutine around the handler rather than aiohttp middlewares:
each level of coroutines is paid again on every resumption of a call (the
worker's answer, the journal's commit), and at thousands of calls a second
on one core those levels were a measurable share of the daemon's CPU.  For
the same reason the common case of each step (key listed, licence valid,
body already received) is decided without awaiting anything; only the rare
cases (first sync, fresh sync before 402, a body still arriving) await.

A call (``POST /v1/services/{service}/call``) then goes: licence decision
(:meth:`GatewayTrust.decide` at trusted time; an expired licence or missing
sync first asks the outer module for a fresh sync, bounded) -> body in one
of three forms, size- and rate-limited -> service built or built now
(single flight, :mod:`firmware.inner.builder`) -> parameters against the
manifest's JSON Schema -> the runtime -> a usage record made durable ->
the answer.  Bodies are read with a per-chunk idle timeout and a minimum
average rate, so a slow client cannot hold a worker slot.

The handlers hold no state of their own beyond counters: the trust state,
builder and journal are passed in by the composition root (``app.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import cbor2
from aiohttp import web

from firmware.common.crypto.apikeys import hash_api_key, is_api_key_shaped
from firmware.common.crypto.sealed import Kind
from firmware.common.errors import OptogateError
from firmware.common.licence import (
    Allow,
    Decision,
    NotLicensed,
    PaymentRequired,
    Revoked,
    UnknownCredential,
)
from firmware.inner.builder import ServiceBuilder, ServiceUnavailable
from firmware.inner.config import ApiConfig, LinkConfig
from firmware.inner.limiter import FailureLimiter
from firmware.inner.metering import UsageEntry, UsageJournal
from firmware.inner.observe import PROMETHEUS_CONTENT_TYPE, EventLog, Metrics
from firmware.inner.runtimes.base import (
    AlgorithmError,
    AlgorithmTimeout,
    Invocation,
    ResultTooLarge,
    RuntimeFailure,
    RuntimeUnavailable,
)
from firmware.inner.trust import GatewayTrust, SyncRequired

JSON: Final = "application/json"
OCTETS: Final = "application/octet-stream"
CBOR: Final = "application/cbor"
PARAMS_HEADER: Final = "Optogate-Params"
RESULT_HEADER: Final = "Optogate-Result"
#: Service names as the bundle format allows them.
SERVICE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: CBOR and JSON bodies nest a parameters object; deeper is an attack.
MAX_NESTING: Final = 64
#: Where authentication leaves the caller's key hash for the handlers.
KEY_HASH: Final = web.RequestKey("key_hash", str)
#: A body shorter than this may take the whole idle timeout to arrive.
RATE_GRACE_BYTES: Final = 64 * 1024


class ApiError(OptogateError):
    """An answer other than 2xx, with its status and stable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        extra: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}
        self.retry_after = retry_after

    def response(self) -> web.Response:
        """Return the JSON error response."""
        body = {"error": {"code": self.code, "message": self.message, **self.extra}}
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(self.retry_after + 0.999)))
        if self.status in {408, 413}:
            headers["Connection"] = "close"
        return web.json_response(body, status=self.status, headers=headers)


def iso(ts: int) -> str:
    """Return Unix seconds as an RFC 3339 UTC string."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads or json.dumps with an option builds a decoder or
# an encoder on every call.
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants)
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Metric labels of the routes (anything else is "other").
_PATH_LABELS: Final = frozenset({"call", "/v1/health", "/v1/auth", "/v1/services", "/metrics"})


def parse_json(data: bytes, what: str) -> Any:
    """Return the JSON document in ``data``; raise ApiError 400 for anything malformed."""
    try:
        text = data.decode("utf-8")
        return _DECODER.decode(text)
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", f"{what} is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", f"{what} is not valid JSON") from None


def parse_cbor(data: bytes) -> tuple[Any, bytes]:
    """Return ``(params, data)`` from a CBOR call body; raise ApiError 400 if malformed."""
    try:
        doc = cbor2.loads(data, max_depth=MAX_NESTING)
    except Exception:  # hostile bytes make cbor2 raise many types
        raise ApiError(400, "bad_request", "the body is not valid CBOR") from None
    if not isinstance(doc, dict) or "params" not in doc or not set(doc) <= {"params", "data"}:
        raise ApiError(400, "bad_request", 'a CBOR body is {"params": {...}, "data": bytes}')
    blob = doc.get("data", b"")
    if not isinstance(blob, bytes):
        raise ApiError(400, "bad_request", "CBOR data must be a byte string")
    return doc["params"], blob


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class Body:
    """A parsed call: params, binary input, the request's form and the answer's."""

    params: Any
    data: bytes
    size: int
    answer: str


class InnerApi:
    """The LAN API; :meth:`app` returns the aiohttp application."""

    def __init__(
        self,
        *,
        config: ApiConfig,
        link: LinkConfig,
        trust: GatewayTrust,
        builder: ServiceBuilder,
        journal: UsageJournal,
        refresh: Callable[[float], Awaitable[bool]],
        metrics: Metrics,
        log: EventLog,
        health: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = config
        self._link = link
        self._trust = trust
        self._builder = builder
        self._journal = journal
        self._refresh = refresh
        self._metrics = metrics
        self._log = log
        self._health = health
        self._clock = clock
        self._limiter = FailureLimiter(
            config.max_auth_failures, config.auth_window_s, config.auth_block_s
        )
        self.accepting = True
        self.in_flight = 0
        # Counters bumped on every request, by label set (see Metrics.counter).
        self._http_counters: dict[tuple[str, int], Callable[[float], None]] = {}
        self._call_counters: dict[tuple[str, str], tuple[Callable[[float], None], ...]] = {}
        for name, kind, text in (
            ("optogate_inner_http_requests_total", "counter", "HTTP answers by path and status"),
            ("optogate_inner_calls_total", "counter", "service calls by service and outcome"),
            ("optogate_inner_auth_failures_total", "counter", "failed authentications"),
            ("optogate_inner_call_seconds_total", "counter", "time spent in calls"),
            ("optogate_inner_bytes_in_total", "counter", "call input bytes"),
            ("optogate_inner_bytes_out_total", "counter", "call output bytes"),
        ):
            metrics.describe(name, kind, text)

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        """Return the application with its routes (every handler inside :meth:`_serve`)."""
        app = web.Application(
            client_max_size=self._cfg.max_body_bytes,
            handler_args={"max_field_size": self._cfg.max_header_bytes * 2},
        )
        app.router.add_get("/v1/health", partial(self._serve, handler=self.health, public=True))
        app.router.add_post("/v1/auth", partial(self._serve, handler=self.auth))
        app.router.add_get("/v1/services", partial(self._serve, handler=self.services))
        app.router.add_post("/v1/services/{service}/call", partial(self._serve, handler=self.call))
        app.router.add_get("/metrics", partial(self._serve, handler=self.metrics))
        # Last: any other path or method, authenticated like the rest.
        self._unrouted_resource = app.router.add_route(
            "*", "/{tail:.*}", partial(self._serve, handler=self._unrouted)
        ).resource
        return app

    # ------------------------------------------------------------------ around every handler

    async def _serve(
        self, request: web.Request, *, handler: Handler, public: bool = False
    ) -> web.StreamResponse:
        """Authenticate (unless ``public``), run ``handler``, answer errors as JSON."""
        path = "call" if request.path.endswith("/call") else request.path
        try:
            if not public:
                key_hash, listed = self._admit(request)
                if not listed:
                    await self._admit_after_sync(request, key_hash)
                request[KEY_HASH] = key_hash
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except web.HTTPException as e:
            response = self._http_error(e).response()
        except Exception as e:  # never leak internals to the caller
            self._log("internal_error", path=path, error=type(e).__name__)
            response = ApiError(500, "internal_error", "internal error").response()
        label = (path if path in _PATH_LABELS else "other", response.status)
        count = self._http_counters.get(label)
        if count is None:
            count = self._http_counters[label] = self._metrics.counter(
                "optogate_inner_http_requests_total", {"path": label[0], "status": str(label[1])}
            )
        count(1)
        return response

    def _count_call(
        self, service: str, outcome: str, duration: float, bytes_in: int, bytes_out: int
    ) -> None:
        counters = self._call_counters.get((service, outcome))
        if counters is None:
            # Services are those a licence names, outcomes a fixed few: bounded.
            by_service = {"service": service}
            counters = self._call_counters[(service, outcome)] = (
                self._metrics.counter(
                    "optogate_inner_calls_total", {"service": service, "outcome": outcome}
                ),
                self._metrics.counter("optogate_inner_call_seconds_total", by_service),
                self._metrics.counter("optogate_inner_bytes_in_total", by_service),
                self._metrics.counter("optogate_inner_bytes_out_total", by_service),
            )
        calls, seconds, into, out = counters
        calls(1)
        seconds(duration)
        into(bytes_in)
        out(bytes_out)

    @staticmethod
    def _http_error(e: web.HTTPException) -> ApiError:
        if e.status == 413:
            return ApiError(413, "too_large", "the request body is too large")
        if e.status == 404:
            return ApiError(404, "not_found", "no such path")
        if e.status == 405:
            return ApiError(405, "method_not_allowed", "method not allowed on this path")
        return ApiError(e.status if e.status >= 400 else 400, "bad_request", "bad request")

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        """Any path no route serves (404), or a route's path with another method (405)."""
        for resource in request.app.router.resources():
            if resource is not self._unrouted_resource:
                _, allowed = await resource.resolve(request)
                if allowed:
                    raise ApiError(405, "method_not_allowed", "method not allowed on this path")
        raise ApiError(404, "not_found", "no such path")

    def _admit(self, request: web.Request) -> tuple[str, bool]:
        """Return (the key's hash, whether a licence lists it); raise ApiError to refuse.

        Not listed is returned (rather than refused) only before the first
        sync, when there is no licence set to look in yet.
        """
        if not self.accepting:
            raise ApiError(503, "unavailable", "the gateway is shutting down", retry_after=5)
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > self._cfg.max_header_bytes:
            raise ApiError(413, "too_large", f"headers over {self._cfg.max_header_bytes} bytes")
        addr = request.remote or "?"
        now = self._clock()
        wait = self._limiter.retry_after(addr, now)
        if wait is not None:
            raise ApiError(
                429, "too_many_failures", "too many failed authentications", retry_after=wait
            )
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not is_api_key_shaped(key):
            raise self._unauthorized(addr, now)
        key_hash = hash_api_key(key)
        if self._key_listed(key_hash):
            return key_hash, True
        if self._trust.licences is not None:
            raise self._unauthorized(addr, now)
        return key_hash, False

    async def _admit_after_sync(self, request: web.Request, key_hash: str) -> None:
        """First start, nothing synced yet: ask central (bounded wait), then look again."""
        await self._refresh(self._link.payment_sync_wait_s)
        if self._trust.licences is None:
            raise ApiError(
                503,
                "unavailable",
                "the gateway has not reached central yet",
                retry_after=self._link.retry_after_s,
            )
        if not self._key_listed(key_hash):
            raise self._unauthorized(request.remote or "?", self._clock())

    def _unauthorized(self, addr: str, now: float) -> ApiError:
        """Count a failed authentication from ``addr``; return the 401 to raise."""
        self._metrics.inc("optogate_inner_auth_failures_total")
        blocked = self._limiter.failed(addr, now)
        if blocked is not None:
            self._log("auth_blocked", address=addr, seconds=blocked)
        return ApiError(401, "unauthorized", "a valid API key is required")

    def _key_listed(self, key_hash: str) -> bool:
        licences = self._trust.licences
        return licences is not None and bool(licences.holding(key_hash))

    # ------------------------------------------------------------------ handlers

    async def health(self, request: web.Request) -> web.Response:
        """``GET /v1/health``: liveness and a summary, no authentication."""
        return web.json_response(self._health())

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text format."""
        return web.Response(
            body=self._metrics.render().encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )

    async def auth(self, request: web.Request) -> web.Response:
        """``POST /v1/auth``: the key's customer and the services it may call."""
        key_hash = request[KEY_HASH]
        licences = self._trust.licences
        assert licences is not None  # authentication found the key in it
        now = self._trust.now(self._clock())
        mine = [lic for lic in licences.holding(key_hash) if lic.licence_id not in licences.revoked]
        customer = mine[0].customer if mine else ""
        services = [
            {
                "service": lic.service,
                "valid_until": iso(lic.valid_until),
                "valid": lic.is_valid_at(now),
            }
            for lic in sorted(mine, key=lambda x: (x.service, x.licence_id))
        ]
        return web.json_response({"customer": customer, "services": services})

    async def services(self, request: web.Request) -> web.Response:
        """``GET /v1/services``: every service this key is licensed for, built or not."""
        key_hash = request[KEY_HASH]
        licences = self._trust.licences
        assert licences is not None
        meta = self._trust.verifier.metadata
        now = self._trust.now(self._clock())
        by_service: dict[str, Any] = {}
        for lic in licences.holding(key_hash):
            if lic.licence_id in licences.revoked:
                continue
            prev = by_service.get(lic.service)
            if prev is None or lic.valid_until > prev.valid_until:
                by_service[lic.service] = lic
        out = []
        for name, lic in sorted(by_service.items()):
            loaded = self._builder.loaded.get(name)
            ref = meta.find(Kind.BUNDLE, name) if meta is not None else None
            out.append(
                {
                    "service": name,
                    "built": loaded is not None,
                    "version": loaded.version if loaded else (ref.version if ref else None),
                    "licence": lic.licence_id,
                    "valid_until": iso(lic.valid_until),
                    "valid": lic.is_valid_at(now),
                    "description": loaded.manifest.description if loaded else None,
                }
            )
        return web.json_response({"services": out})

    # ------------------------------------------------------------------ calls

    async def call(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/services/{service}/call``: see the module docstring."""
        service = request.match_info["service"]
        if not SERVICE_RE.fullmatch(service):
            raise ApiError(404, "not_found", "no such service")
        key_hash = request[KEY_HASH]
        allow = self._allowed(service, key_hash) or await self._allowed_after_sync(
            service, key_hash
        )
        ctype, answer = self._call_form(request)
        raw = self._body_now(request)
        if raw is None:
            raw = await self._read_body(request)
        body = self._parse_call(request, ctype, answer, raw)
        svc = self._builder.loaded.get(service)  # built: no wait, no timer
        try:
            if svc is None:
                async with asyncio.timeout(self._link.build_wait_s):
                    svc = await self._builder.get(service)
        except ServiceUnavailable as e:
            raise ApiError(503, "unavailable", str(e), retry_after=e.retry_after) from None
        except TimeoutError:  # the build goes on; the caller comes back
            raise ApiError(
                503,
                "unavailable",
                f"service {service} is being built",
                retry_after=self._link.retry_after_s,
            ) from None
        outcome, error = "ok", None
        problem = (
            svc.param_errors(body.params)
            if isinstance(body.params, dict)
            else "the parameters must be a JSON object"
        )
        if problem is not None:
            outcome, error = "invalid_params", ApiError(422, "invalid_params", problem)
        started = self._clock()
        result: dict[str, Any] = {}
        data_out = b""
        if error is None:
            self.in_flight += 1
            try:
                with svc as runtime:  # this version stays open until the call ends
                    out = await runtime.invoke(Invocation(body.params, body.data))
                result, data_out = out.result, out.data
            except RuntimeFailure as e:
                outcome, error = self._failure(service, e)
            finally:
                self.in_flight -= 1
        duration = self._clock() - started
        entry = UsageEntry(
            at=self._trust.now(self._clock()),
            customer=allow.customer,
            service=service,
            licence=allow.licence_id,
            credential=request[KEY_HASH],
            duration_ms=int(duration * 1000),
            outcome=outcome,
            bytes_in=body.size,
            bytes_out=len(data_out),
        )
        try:
            await self._journal.append(entry)  # durable before the answer leaves
        except OptogateError as e:
            self._log("usage_append_failed", error=type(e).__name__)
            raise ApiError(503, "unavailable", "usage cannot be recorded", retry_after=5) from e
        self._count_call(service, outcome, duration, body.size, len(data_out))
        if error is not None:
            raise error
        return self._answer(body.answer, result, data_out)

    def _failure(self, service: str, e: RuntimeFailure) -> tuple[str, ApiError]:
        if isinstance(e, AlgorithmError):
            return "invalid_params", ApiError(422, "invalid_params", e.message)
        if isinstance(e, AlgorithmTimeout):
            return "algorithm_timeout", ApiError(
                504, "algorithm_timeout", "the algorithm ran too long"
            )
        if isinstance(e, ResultTooLarge):
            return "too_large", ApiError(500, "algorithm_crashed", "the result was too large")
        if isinstance(e, RuntimeUnavailable):
            return "unavailable", ApiError(
                503,
                "unavailable",
                "the service cannot run now",
                retry_after=self._link.retry_after_s,
            )
        self._log("algorithm_crashed", service=service, error=type(e).__name__)
        return "algorithm_crashed", ApiError(500, "algorithm_crashed", "the algorithm crashed")

    def _allowed(self, service: str, key_hash: str) -> Allow | None:
        """Return the licence decision if it allows the call now; None if central must
        be asked first (expired or not yet synced); raise ApiError for a refusal."""
        decision = self._trust.decide(service=service, key_hash=key_hash, mono=self._clock())
        if isinstance(decision, Allow):
            return decision
        if isinstance(decision, SyncRequired | PaymentRequired):
            return None
        raise self._refusal(service, decision)

    async def _allowed_after_sync(self, service: str, key_hash: str) -> Allow:
        """Pay, then call again: ask central before refusing (bounded wait)."""
        await self._refresh(self._link.payment_sync_wait_s)
        decision = self._trust.decide(service=service, key_hash=key_hash, mono=self._clock())
        if isinstance(decision, Allow):
            return decision
        raise self._refusal(service, decision)

    def _refusal(self, service: str, decision: Decision | SyncRequired) -> ApiError:
        """Return the error answering a decision that does not allow the call."""
        if isinstance(decision, SyncRequired):
            return ApiError(
                503,
                "unavailable",
                "the gateway must reach central first",
                retry_after=self._link.retry_after_s,
            )
        if isinstance(decision, PaymentRequired):
            word = "starts" if decision.not_yet_valid else "expired"
            when = decision.valid_from if decision.not_yet_valid else decision.valid_until
            return ApiError(
                402,
                "payment_required",
                f"licence {decision.licence_id} for {service} {word} at {iso(when)}",
                extra={
                    "licence": decision.licence_id,
                    "valid_from": iso(decision.valid_from),
                    "valid_until": iso(decision.valid_until),
                    "renew": {"service": decision.renew, "customer": decision.customer},
                },
            )
        if isinstance(decision, NotLicensed) and not self._known_service(service):
            return ApiError(404, "not_found", f"no service {service}")
        if isinstance(decision, NotLicensed | Revoked):
            why = "revoked" if isinstance(decision, Revoked) else "not licensed for this key"
            return ApiError(403, "forbidden", f"service {service}: {why}")
        assert isinstance(decision, UnknownCredential)
        return ApiError(401, "unauthorized", "a valid API key is required")

    def _known_service(self, service: str) -> bool:
        meta = self._trust.verifier.metadata
        if meta is not None and meta.find(Kind.BUNDLE, service) is not None:
            return True
        licences = self._trust.licences
        return licences is not None and any(lic.service == service for lic in licences.licences)

    @staticmethod
    def _call_form(request: web.Request) -> tuple[str, str]:
        """Return the call's (content type, answer's content type); raise 415."""
        ctype = _media_type(request.headers.get("Content-Type", JSON))
        if ctype not in {JSON, OCTETS, CBOR}:
            raise ApiError(415, "unsupported_media_type", f"content type {ctype!r} is not served")
        accept = _media_type(request.headers.get("Accept", ""))
        return ctype, accept if accept in {JSON, OCTETS, CBOR} else ctype

    def _parse_call(self, request: web.Request, ctype: str, answer: str, raw: bytes) -> Body:
        """Return the call's parameters and input from its body (and params header)."""
        if ctype == JSON:
            params = parse_json(raw, "the body") if raw else {}
            return Body(params, b"", len(raw), answer)
        if ctype == CBOR:
            params, blob = parse_cbor(raw)
            return Body(params, blob, len(raw), answer)
        header = request.headers.get(PARAMS_HEADER, "{}")
        if len(header) > self._cfg.max_header_bytes:
            raise ApiError(413, "too_large", f"{PARAMS_HEADER} over its limit")
        try:
            header_bytes = header.encode("latin-1")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_request", f"{PARAMS_HEADER} is not valid") from None
        return Body(parse_json(header_bytes, PARAMS_HEADER), raw, len(raw), answer)

    def _body_now(self, request: web.Request) -> bytes | None:
        """Return the body if it came whole with the headers (no waiting), else None."""
        limit = self._cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "too_large", f"the body is over {limit} bytes")
        if not request.content.is_eof():
            return None
        data = request.content.read_nowait()
        if len(data) > limit:
            raise ApiError(413, "too_large", f"the body is over {limit} bytes")
        return data

    async def _read_body(self, request: web.Request) -> bytes:
        """Read a body still arriving, with the idle timeout and minimum rate."""
        limit = self._cfg.max_body_bytes
        chunks = []
        total = 0
        start = self._clock()
        idle = self._cfg.body_idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise ApiError(408, "too_slow", "the body stalled") from None
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "too_large", f"the body is over {limit} bytes")
            chunks.append(chunk)
            elapsed = self._clock() - start
            if (
                total > RATE_GRACE_BYTES
                and elapsed > idle
                and total / elapsed < self._cfg.min_body_rate
            ):
                raise ApiError(408, "too_slow", "the body arrives too slowly")
        return b"".join(chunks)

    @staticmethod
    def _answer(form: str, result: dict[str, Any], data: bytes) -> web.Response:
        if form == OCTETS:
            header = _COMPACT.encode(result)
            return web.Response(body=data, headers={"Content-Type": OCTETS, RESULT_HEADER: header})
        if form == CBOR:
            return web.Response(
                body=cbor2.dumps({"result": result, "data": data}),
                headers={"Content-Type": CBOR},
            )
        doc: dict[str, Any] = {"result": result}
        if data:
            doc["data_base64"] = base64.b64encode(data).decode("ascii")
        return web.json_response(doc)
