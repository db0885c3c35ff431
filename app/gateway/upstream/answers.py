"""UpstreamError and the upstream's answers, decoded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from app.gateway import metrics as gm
from app.gateway.upstream.breaker import REFUSES_GATEWAY
from app.gateway.upstream.jsonsteps import loads_in_steps, paused_gc


class UpstreamError(Exception):
    """An upstream request that produced no data, with a Prometheus-style errorType."""

    def __init__(self, error_type: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Series:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class QueryAnswer:
    series: list[Series]
    warnings: tuple[str, ...]


class ApiAnswer:
    """One answer of the upstream's HTTP API, success or Prometheus error envelope.

    Error envelopes come back as answers, not exceptions, so a caller serving the
    Prometheus API can pass the upstream's errorType and HTTP status through as is.
    The envelope is checked when the answer arrives but decoded only when someone
    reads `doc`: a megabyte range answer is cut into extents from its bytes and
    handed on as it came, never turned into Python objects.
    """

    __slots__ = ("_doc", "_head", "raw", "status_code")

    def __init__(self, status_code: int, doc: dict[str, Any] | None, raw: bytes, head: object = None) -> None:
        self.status_code = status_code  # upstream HTTP status
        self._doc = doc
        self._head = doc.get("status") if doc is not None else head  # the envelope's status
        self.raw = raw  # the body as received (for pass-through)

    @property
    def doc(self) -> dict[str, Any]:
        """The decoded envelope (status, data, errorType, error, warnings, infos)."""
        if self._doc is None:
            self._doc = json.loads(self.raw)
        return self._doc

    @property
    def error_type(self) -> str | None:
        if self._head == "success":
            return None
        return error_type_of(self.doc, self.status_code)


class _Head(msgspec.Struct):
    """An envelope's status; the rest is validated as JSON but not built into objects."""

    status: object = None


_HEAD = msgspec.json.Decoder(_Head)


def error_type_of(doc: Mapping[str, Any] | None, status: int) -> str:
    """The one error typing of an upstream answer that is not a success: its own
    errorType, else the server's failure for a 5xx and a bad response otherwise."""
    given = doc.get("errorType") if doc is not None else None
    return str(given or ("server_error" if status >= 500 else "bad_response"))


# Prometheus' errorType for an HTTP status it sends without an envelope.
_STATUS_ERROR_TYPE = {404: "not_found", 406: "not_acceptable", 422: "execution"}


def _api_answer(body: bytes, status: int) -> ApiAnswer:
    """Check an API body is an envelope; raise UpstreamError when it is not one.

    A 204 (Prometheus' answer to an exemplar query without a selector) and a 4xx
    without an envelope are the upstream's answers to the caller: passed on as they came.
    """
    if status == 204:
        return ApiAnswer(204, {"status": "success", "data": None}, body)
    try:
        head: object = _HEAD.decode(body).status
        doc: dict[str, Any] | None = None
    except (msgspec.ValidationError, msgspec.DecodeError):
        try:  # not an object, not JSON, or what only Python's json reads (NaN, Infinity)
            loaded = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            snippet = body[:80].decode("utf-8", "replace").replace("\n", " ")
            if 400 <= status < 500 and status not in REFUSES_GATEWAY:
                # E.g. an upstream without this endpoint (/status/flags on Prometheus' own
                # router says "404 page not found"): a designed answer, not a failure.
                etype = _STATUS_ERROR_TYPE.get(status, "bad_data")
                return ApiAnswer(status, {"status": "error", "errorType": etype,
                                          "error": f"upstream: {snippet}"}, body)
            raise UpstreamError("bad_response", f"HTTP {status}, not JSON: {snippet!r}", status) from None
        doc = loaded if isinstance(loaded, dict) else None
        head = doc.get("status") if doc is not None else None
    if head not in ("success", "error"):
        # JSON, but no envelope: what parse_answer calls it (a 5xx is the server's failure).
        raise UpstreamError(error_type_of(None, status), f"HTTP {status}, not a Prometheus envelope", status)
    return ApiAnswer(status, doc, body, head)


def _value(raw: Any) -> float:
    # Prometheus sends values as strings so that NaN and +Inf survive JSON.
    return float(raw[1])


def _vector(result: Any, consume: bool) -> list[Series]:
    if not consume or not isinstance(result, list):
        return [Series(_labels(s.get("metric")), _value(s["value"])) for s in result]
    # Taken from the decoded list one by one, so each element is freed here, in this
    # thread, rather than all at once (a long stall) wherever the document is dropped.
    result.reverse()
    series = []
    while result:
        s = result.pop()
        series.append(Series(_labels(s.get("metric")), _value(s["value"])))
    return series


def _labels(metric: Any) -> dict[str, str]:
    return metric if type(metric) is dict else dict(metric or {})


def parse_answer(body: bytes, status: int, *, in_steps: bool = False) -> QueryAnswer:
    """Decode a Prometheus API envelope; raise UpstreamError for anything but success.

    `in_steps`: decode series by series (for big answers parsed in a worker thread).
    """
    try:
        doc = loads_in_steps(body) if in_steps else json.loads(body)
    except (ValueError, UnicodeDecodeError):
        snippet = body[:80].decode("utf-8", "replace").replace("\n", " ")
        raise UpstreamError("bad_response", f"HTTP {status}, not JSON: {snippet!r}", status) from None
    if not isinstance(doc, dict):
        raise UpstreamError("bad_response", f"HTTP {status}, JSON is not an object", status)
    if doc.get("status") != "success":
        raise UpstreamError(error_type_of(doc, status), str(doc.get("error") or f"HTTP {status}"), status)
    warnings = tuple(str(w) for w in (doc.get("warnings") or ()))
    warnings += tuple(f"info: {i}" for i in (doc.get("infos") or ()))
    try:
        data = doc["data"]
        rtype = data["resultType"]
        result = data["result"]
        if rtype == "vector":
            series = _vector(result, consume=in_steps)
        elif rtype == "scalar":
            series = [Series({}, _value(result))]
        else:
            raise UpstreamError("bad_response", f"unexpected resultType {rtype!r}", status)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise UpstreamError("bad_response", f"malformed result: {exc!r}", status) from None
    return QueryAnswer(series, warnings)


async def parse_off_loop(body: bytes, status: int, min_bytes: int) -> QueryAnswer:
    """parse_answer, in a worker thread (series by series) when `body` has `min_bytes` or more.

    Small answers stay on the loop: a thread hop costs more than parsing them.
    """
    if len(body) < min_bytes:
        return parse_answer(body, status)
    gm.offloaded("parse")
    return await asyncio.to_thread(_parse_big, body, status)


def _parse_big(body: bytes, status: int) -> QueryAnswer:
    with paused_gc():
        return parse_answer(body, status, in_steps=True)
