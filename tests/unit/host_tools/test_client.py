"""Client library and `optogate call`: error mapping, parameters, retry policy."""

from __future__ import annotations

import json

import pytest

from host_tools import call
from host_tools.client import (
    AlgorithmCrashed,
    AlgorithmTimeout,
    BadRequest,
    Forbidden,
    GatewayError,
    GatewayUnreachable,
    InvalidParams,
    NotFound,
    PaymentRequired,
    TooLarge,
    TooManyFailures,
    Unauthorized,
    Unavailable,
    _Backoff,
    _service_path,
    error_from_response,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

CASES = [
    (400, "bad_request", BadRequest, 7),
    (401, "unauthorized", Unauthorized, 3),
    (402, "payment_required", PaymentRequired, 5),
    (403, "forbidden", Forbidden, 4),
    (404, "not_found", NotFound, 6),
    (413, "too_large", TooLarge, 7),
    (415, "unsupported_media_type", BadRequest, 7),
    (422, "invalid_params", InvalidParams, 7),
    (429, "too_many_failures", TooManyFailures, 11),
    (500, "algorithm_crashed", AlgorithmCrashed, 10),
    (503, "unavailable", Unavailable, 8),
    (504, "algorithm_timeout", AlgorithmTimeout, 9),
    (418, "teapot", GatewayError, 12),
]


@pytest.mark.parametrize(("status", "code", "cls", "exit_code"), CASES)
def test_every_api_error_maps_to_its_exception_and_exit_code(
    status: int, code: str, cls: type, exit_code: int
) -> None:
    body = json.dumps({"error": {"code": code, "message": f"m{status}"}}).encode()
    err = error_from_response(status, body, {"retry-after": "7"})
    assert type(err) is cls
    assert (err.status, err.code, str(err), err.exit_code) == (
        status,
        code,
        f"m{status}",
        exit_code,
    )
    assert err.retry_after == 7.0


def test_payment_required_carries_licence_and_what_to_renew() -> None:
    body = {
        "error": {
            "code": "payment_required",
            "message": "expired",
            "licence": "L-17",
            "valid_until": "2026-11-30T00:00:00Z",
            "renew": {"service": "dxf2svg", "customer": "acme"},
        }
    }
    err = error_from_response(402, json.dumps(body).encode(), {})
    assert isinstance(err, PaymentRequired)
    assert err.licence == "L-17"
    assert err.valid_until == "2026-11-30T00:00:00Z"
    assert err.renew == {"service": "dxf2svg", "customer": "acme"}


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"not json", b"[1,2]", b'{"error": 3}'])
def test_unreadable_error_bodies_still_map_by_status(content: bytes) -> None:
    err = error_from_response(503, content, {"retry-after": "soon"})
    assert isinstance(err, Unavailable)
    assert err.code == "error"
    assert err.retry_after is None


def test_only_unavailable_and_rate_limits_are_retried_within_the_budget() -> None:
    backoff = _Backoff(max_wait=5.0)
    assert backoff.delay(Unavailable("x", status=503, retry_after=1.0)) == 1.0
    assert backoff.delay(TooManyFailures("x", status=429, retry_after=2.0)) == 2.0
    assert backoff.delay(GatewayUnreachable("x")) is not None
    assert backoff.delay(Unavailable("x", status=503, retry_after=60.0)) is None  # over budget
    for never in (AlgorithmCrashed("x", status=500), AlgorithmTimeout("x", status=504)):
        assert backoff.delay(never) is None  # the algorithm may have run


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_service_names_cannot_escape_the_path(bad: str) -> None:
    with pytest.raises(ValueError, match="service"):
        _service_path(bad)


def test_params_from_pairs_and_json() -> None:
    params = call.collect_params('{"a": 1, "b": "x"}', ["b=y", "n=3", "flag=true", "s=hello"])
    assert params == {"a": 1, "b": "y", "n": 3, "flag": True, "s": "hello"}
    with pytest.raises(call.UsageError):
        call.collect_params(None, ["novalue"])
    with pytest.raises(call.UsageError):
        call.collect_params("[1]", [])
    with pytest.raises(call.UsageError):
        call.collect_params("@/nonexistent/params.json", [])


def test_call_without_gateway_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = call.main(["echo", "--json", "--url", "", "--api-key", ""], "optogate call")
    assert code == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["code"] == "usage"


def test_unreachable_gateway_exits_8(capsys: pytest.CaptureFixture[str]) -> None:
    code = call.main(
        ["echo", "--json", "--url", "https://127.0.0.1:9", "--api-key", "k", "--max-wait", "0"],
        "optogate call",
    )
    assert code == 8
    assert json.loads(capsys.readouterr().out)["ok"] is False
