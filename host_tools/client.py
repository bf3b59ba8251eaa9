"""Client library for vendor programs: call a service on an optogate gateway.

A vendor embeds this in its program (or uses ``optogate call`` from any
language).  Both clients speak the LAN API of docs/api.md over HTTPS with the
gateway's own CA pinned, reuse one keep-alive connection, and turn every
error answer into a typed exception::

    from host_tools.client import Client, PaymentRequired

    with Client("https://gateway.lan:8443", api_key, "gateway-ca.pem") as gw:
        svg, result = gw.call("dxf2svg", {"units": "mm"}, data=dxf_bytes)

    async with AsyncClient(url, api_key, ca_file) as gw:
        result, data = await gw.call("doc-encrypt", {"op": "encrypt", "password": pw}, data=doc)

Binary input and output travel as raw bytes (``application/octet-stream``
with the parameters in the ``Optogate-Params`` header), never base64;
``call_stream`` sends a file-like input and writes the output to a file-like
sink in chunks, so large documents need not fit in memory.

Retries: a call is retried only when the gateway said so and nothing ran —
503 (the service is being fetched, or the outer module is unreachable) and
429 — honouring ``Retry-After`` up to ``max_wait`` seconds in total.
Connection failures before any byte was sent are retried too.  Nothing is
retried after the algorithm may have run (500, 504, or a connection lost
while waiting for the answer), since a service call is not assumed to be
idempotent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import httpx

from firmware.common.errors import OptogateError

PARAMS_HEADER: Final = "Optogate-Params"
RESULT_HEADER: Final = "Optogate-Result"
#: Chunk size for streamed bodies: large enough to keep TLS records full.
CHUNK: Final = 256 * 1024
#: Default bound on total waiting for retries of 503/429.
DEFAULT_MAX_WAIT: Final = 60.0
#: Default per-request timeout; a cold call may dial a modem and fetch a bundle.
DEFAULT_TIMEOUT: Final = 300.0


# -- errors ----------------------------------------------------------------------


class GatewayError(OptogateError):
    """The gateway answered with an error (or could not be reached).

    ``status`` is the HTTP status (0 when there was no answer), ``code`` the
    stable error code of docs/api.md, ``body`` the whole error object.
    """

    exit_code = 12

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "error",
        body: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = dict(body or {})
        self.retry_after = retry_after


class BadRequest(GatewayError):
    exit_code = 7


class Unauthorized(GatewayError):
    exit_code = 3


class Forbidden(GatewayError):
    exit_code = 4


class PaymentRequired(GatewayError):
    """The licence ran out (or has not started): ``licence``, ``valid_until``, ``renew``."""

    exit_code = 5

    @property
    def licence(self) -> str | None:
        value = self.body.get("licence")
        return str(value) if value is not None else None

    @property
    def valid_until(self) -> str | None:
        value = self.body.get("valid_until")
        return str(value) if value is not None else None

    @property
    def renew(self) -> dict[str, Any]:
        value = self.body.get("renew")
        return dict(value) if isinstance(value, Mapping) else {}


class NotFound(GatewayError):
    exit_code = 6


class InvalidParams(GatewayError):
    exit_code = 7


class TooLarge(GatewayError):
    exit_code = 7


class TooManyFailures(GatewayError):
    exit_code = 11


class AlgorithmCrashed(GatewayError):
    exit_code = 10


class Unavailable(GatewayError):
    """The service cannot be built now (outer module or central unreachable)."""

    exit_code = 8


class AlgorithmTimeout(GatewayError):
    exit_code = 9


class GatewayUnreachable(Unavailable):
    """No answer at all: the connection failed or timed out."""


_BY_STATUS: Final[dict[int, type[GatewayError]]] = {
    400: BadRequest,
    401: Unauthorized,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    413: TooLarge,
    415: BadRequest,
    422: InvalidParams,
    429: TooManyFailures,
    500: AlgorithmCrashed,
    503: Unavailable,
    504: AlgorithmTimeout,
}
_RETRYABLE: Final = {429, 503}


def error_from_response(status: int, content: bytes, headers: Mapping[str, str]) -> GatewayError:
    """Return the typed exception for an error answer of the LAN API."""
    body: dict[str, Any] = {}
    try:
        parsed = json.loads(content.decode("utf-8")) if content else {}
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            body = parsed["error"]
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    code = str(body.get("code", "error"))
    message = str(body.get("message") or f"gateway answered HTTP {status}")
    retry_after = _retry_after(headers)
    cls = _BY_STATUS.get(status, GatewayError)
    return cls(message, status=status, code=code, body=body, retry_after=retry_after)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# -- results ----------------------------------------------------------------------


@dataclass(frozen=True)
class CallResult:
    """What a call returned: the JSON result and the binary output."""

    result: dict[str, Any]
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _ssl_context(ca_file: str | Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "optogate-client/1"}


def _call_headers(params: Mapping[str, Any]) -> dict[str, str]:
    encoded = json.dumps(dict(params), separators=(",", ":"), ensure_ascii=True)
    return {"Content-Type": "application/octet-stream", PARAMS_HEADER: encoded}


def _result_from(headers: httpx.Headers) -> dict[str, Any]:
    raw = headers.get(RESULT_HEADER, "{}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise GatewayError(f"gateway sent an unreadable {RESULT_HEADER} header") from e
    if not isinstance(value, dict):
        raise GatewayError(f"gateway sent a {RESULT_HEADER} that is not an object")
    return value


def _checked(response: httpx.Response) -> httpx.Response:
    """Return ``response``, or raise its typed error when it is an error answer."""
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.content, response.headers)
    return response


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GatewayError("gateway answered with malformed JSON") from e
    if not isinstance(value, dict):
        raise GatewayError("gateway answered with something other than a JSON object")
    return value


def _service_path(service: str) -> str:
    if not service or "/" in service or service in {".", ".."}:
        raise ValueError(f"not a service name: {service!r}")
    return f"/v1/services/{service}/call"


class _Backoff:
    """Bounded waiting between retries of 503/429 answers."""

    def __init__(self, max_wait: float) -> None:
        self.deadline = time.monotonic() + max_wait
        self.attempt = 0

    def delay(self, error: GatewayError) -> float | None:
        """Return how long to wait before retrying, or None to give up."""
        if error.status not in _RETRYABLE and not isinstance(error, GatewayUnreachable):
            return None
        self.attempt += 1
        wait = (
            error.retry_after if error.retry_after is not None else min(8.0, 0.5 * 2**self.attempt)
        )
        if time.monotonic() + wait > self.deadline:
            return None
        return wait


def _transport_error(error: httpx.HTTPError) -> GatewayError:
    """Wrap a failure of the HTTP layer: unreachable before sending, or broken after."""
    if isinstance(error, httpx.ConnectError):
        return GatewayUnreachable(f"cannot reach the gateway: {error}")
    return GatewayError(f"request failed: {error}")


def _call_outcome(response: httpx.Response) -> CallResult:
    return CallResult(_result_from(response.headers), response.content, dict(response.headers))


# -- synchronous client -------------------------------------------------------------


class Client:
    """Synchronous client of one gateway.  Use as a context manager, or close()."""

    def __init__(
        self,
        url: str,
        api_key: str,
        ca_file: str | Path | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        self._http = httpx.Client(
            base_url=url,
            headers=_headers(api_key),
            verify=_ssl_context(ca_file),
            timeout=timeout,
        )
        self._max_wait = max_wait

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def auth(self) -> dict[str, Any]:
        """Check the key; return the customer and the services it may call."""
        return _json_object(self._request("POST", "/v1/auth"))

    def services(self) -> list[dict[str, Any]]:
        """Return the services the gateway knows, built or not."""
        services = _json_object(self._request("GET", "/v1/services")).get("services", [])
        return list(services) if isinstance(services, list) else []

    def health(self) -> dict[str, Any]:
        """Return the gateway's health (no key needed)."""
        return _json_object(self._request("GET", "/v1/health"))

    def call(
        self, service: str, params: Mapping[str, Any] | None = None, data: bytes = b""
    ) -> CallResult:
        """Run ``service``; return its result and binary output.

        Raises a GatewayError subclass for every error answer (PaymentRequired,
        InvalidParams, Unavailable, ...), after the retries the module
        docstring describes.
        """
        path, headers = _service_path(service), _call_headers(params or {})
        backoff = _Backoff(self._max_wait)
        while True:
            try:
                return _call_outcome(self._request("POST", path, content=data, headers=headers))
            except GatewayError as e:
                wait = backoff.delay(e)
                if wait is None:
                    raise
                time.sleep(wait)

    def call_stream(
        self,
        service: str,
        params: Mapping[str, Any] | None,
        source: IO[bytes],
        sink: IO[bytes],
    ) -> dict[str, Any]:
        """Run ``service`` on a file-like input, writing the output to ``sink``.

        Not retried: the input stream cannot be replayed.  Returns the result.
        """

        def chunks() -> Iterator[bytes]:
            while block := source.read(CHUNK):
                yield block

        request = self._http.build_request(
            "POST", _service_path(service), content=chunks(), headers=_call_headers(params or {})
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.HTTPError as e:
            raise _transport_error(e) from e
        try:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            for block in response.iter_bytes(CHUNK):
                sink.write(block)
            return _result_from(response.headers)
        finally:
            response.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise _transport_error(e) from e
        return _checked(response)


# -- asyncio client ------------------------------------------------------------------


class AsyncClient:
    """The asyncio twin of :class:`Client`, with the same methods as coroutines."""

    def __init__(
        self,
        url: str,
        api_key: str,
        ca_file: str | Path | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_connections: int = 16,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url,
            headers=_headers(api_key),
            verify=_ssl_context(ca_file),
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._max_wait = max_wait

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def auth(self) -> dict[str, Any]:
        """Check the key; return the customer and the services it may call."""
        return _json_object(await self._request("POST", "/v1/auth"))

    async def services(self) -> list[dict[str, Any]]:
        """Return the services the gateway knows, built or not."""
        services = _json_object(await self._request("GET", "/v1/services")).get("services", [])
        return list(services) if isinstance(services, list) else []

    async def health(self) -> dict[str, Any]:
        """Return the gateway's health (no key needed)."""
        return _json_object(await self._request("GET", "/v1/health"))

    async def call(
        self, service: str, params: Mapping[str, Any] | None = None, data: bytes = b""
    ) -> CallResult:
        """Run ``service``; see :meth:`Client.call`."""
        path, headers = _service_path(service), _call_headers(params or {})
        backoff = _Backoff(self._max_wait)
        while True:
            try:
                response = await self._request("POST", path, content=data, headers=headers)
                return _call_outcome(response)
            except GatewayError as e:
                wait = backoff.delay(e)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def call_stream(
        self,
        service: str,
        params: Mapping[str, Any] | None,
        source: AsyncIterator[bytes],
    ) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
        """Run ``service`` on streamed input; return (result, async iterator of output).

        The output iterator must be consumed (it closes the response at the end).
        """
        request = self._http.build_request(
            "POST", _service_path(service), content=source, headers=_call_headers(params or {})
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as e:
            raise _transport_error(e) from e
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            _checked(response)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for block in response.aiter_bytes(CHUNK):
                    yield block
            finally:
                await response.aclose()

        return _result_from(response.headers), body()

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise _transport_error(e) from e
        return _checked(response)
