"""Prometheus' envelope: ApiError, pass-through and rebuilt answers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from fastapi import Response

from app.gateway.engines.limits import too_large
from app.gateway.engines.scheduler import Rejected, current, throttled
from app.gateway.result import Lookup
from app.gateway.upstream.answers import UpstreamError

JSON = "application/json"


FORM = "application/x-www-form-urlencoded"


# Prometheus' errorType -> HTTP status (web/api/v1 respondError), for the errors
# this router makes itself; upstream error envelopes keep the upstream's status.
ERROR_STATUS: dict[str, int] = {
    "bad_data": 400,
    "execution": 422,
    "canceled": 503,
    "timeout": 503,
    "internal": 500,
    "unavailable": 503,
    "not_found": 404,
    "not_acceptable": 406,
}


# Our upstream failure vocabulary -> Prometheus errorType.
_UPSTREAM_ERROR_TYPE = {"timeout": "timeout", "too_large": "execution"}


class ApiError(Exception):
    """An answer in Prometheus' error envelope."""

    def __init__(self, error_type: str, message: str, headers: Mapping[str, str] | None = None, *,
                 upstream: bool = False, status: int | None = None) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})
        self.upstream = upstream  # the upstream failed (not the request)
        self.status = status or ERROR_STATUS.get(error_type, 500)


def bad_data(message: str) -> ApiError:
    return ApiError("bad_data", message)


def invalid_param(name: str, message: str) -> ApiError:
    return ApiError("bad_data", f'invalid parameter "{name}": {message}')


def error_response(exc: ApiError, cache_header: bool = False) -> Response:
    """Prometheus' error envelope; on the query routes an upstream failure says `X-Gateway-Cache: failed`."""
    body = json.dumps({"status": "error", "errorType": exc.error_type, "error": exc.message})
    headers = dict(exc.headers)
    if cache_header and exc.upstream:
        headers["X-Gateway-Cache"] = str(Lookup.FAILED)
    return Response(body, status_code=exc.status, media_type=JSON, headers=headers)


def from_upstream(exc: UpstreamError) -> ApiError:
    """A transport-level upstream failure as Prometheus' envelope: never a 500 of ours.
    No turn for the request (its client's queue full, or its deadline passed waiting): 429.
    An answer over the size cap is the client's: said in its words, counted against it."""
    if exc.error_type == "timeout" and (paced := current()) is not None and paced.throttled:
        # Its deadline went on the turns its client was paced to (it keeps the upstream busy
        # while others ask): the gateway's choice, so "not now", not an upstream failure.
        exc = throttled(paced)
    if isinstance(exc, Rejected):
        return ApiError("unavailable", f"too many queries: {exc.message}",
                        {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}, status=429)
    if exc.error_type == "too_large" and (ticket := current()) is not None:
        return ApiError("execution", too_large(ticket, exc.message))
    if exc.error_type == "circuit_open":
        return ApiError("unavailable", f"upstream Prometheus: {exc.message}",
                        {"Retry-After": "1"}, upstream=True)
    etype = _UPSTREAM_ERROR_TYPE.get(exc.error_type, "unavailable")
    return ApiError(etype, f"upstream Prometheus: {exc.error_type}: {exc.message}", upstream=True)
