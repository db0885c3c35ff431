"""The upstream Prometheus HTTP API client: one pooled connection set, bounded time.

Speaks `/api/v1/query` of Prometheus and anything that mounts the same API under
a path prefix (Thanos, Mimir, Grafana Cloud, VictoriaMetrics). Every failure is
mapped to one error type (Prometheus' own errorType where it sent one), counted,
fed to the circuit breaker, and logged once per episode.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx

from app.common import tracing
from app.common.episodes import FailureEpisode
from app.common.secrets import SecretFile, SecretUnavailable, redact_url
from app.gateway import metrics as gm
from app.gateway.breaker import CircuitBreaker
from app.gateway.settings import GatewaySettings

_T = TypeVar("_T")

log = logging.getLogger("gateway.prometheus")

# Failures that say nothing about the upstream's health (the query was at fault).
QUERY_ERRORS = frozenset({"bad_data", "execution", "not_found", "too_large"})


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


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """One answer of the upstream's HTTP API, success or Prometheus error envelope.

    Error envelopes come back as answers, not exceptions, so a caller serving the
    Prometheus API can pass the upstream's errorType and HTTP status through as is.
    """

    status_code: int          # upstream HTTP status
    doc: dict[str, Any]       # the decoded envelope (status, data, errorType, error, warnings, infos)
    raw: bytes                # the body as received (for pass-through)

    @property
    def error_type(self) -> str | None:
        if self.doc.get("status") == "success":
            return None
        return str(self.doc.get("errorType") or ("server_error" if self.status_code >= 500 else "bad_response"))


def _api_answer(body: bytes, status: int) -> ApiAnswer:
    """Decode an API body; raise UpstreamError when it is not a Prometheus envelope."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        snippet = body[:80].decode("utf-8", "replace").replace("\n", " ")
        if status == 404:
            # An upstream without this endpoint (e.g. /status/flags on Prometheus' own
            # router says "404 page not found"): a designed answer, not a failure.
            return ApiAnswer(404, {"status": "error", "errorType": "not_found",
                                   "error": f"upstream: {snippet}"}, body)
        raise UpstreamError("bad_response", f"HTTP {status}, not JSON: {snippet!r}", status) from None
    if not isinstance(doc, dict) or doc.get("status") not in ("success", "error"):
        # JSON, but no envelope: what parse_answer calls it (a 5xx is the server's failure).
        etype = "server_error" if status >= 500 else "bad_response"
        raise UpstreamError(etype, f"HTTP {status}, not a Prometheus envelope", status)
    return ApiAnswer(status, doc, body)


def _value(raw: Any) -> float:
    # Prometheus sends values as strings so that NaN and +Inf survive JSON.
    return float(raw[1])


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
# Envelope -> data -> result -> each series: the depth at which a big answer is split.
_SPLIT_DEPTH = 3


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match is not None else pos


def _decode(text: str, pos: int, depth: int) -> tuple[Any, int]:
    """One JSON value at `pos`: objects and arrays down to `depth` member by member, the rest
    by the C decoder. Same result as json.loads, in small steps."""
    opener = text[pos:pos + 1]
    if depth <= 0 or opener not in ("{", "["):
        return _DECODER.raw_decode(text, pos)
    closer = "}" if opener == "{" else "]"
    obj: dict[str, Any] = {}
    arr: list[Any] = []
    pos = _skip(text, pos + 1)
    if text[pos:pos + 1] == closer:
        return (obj if opener == "{" else arr), pos + 1
    while True:
        if opener == "{":
            if text[pos:pos + 1] != '"':
                raise ValueError(f"expected a member name at {pos}")
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip(text, pos)
            if text[pos:pos + 1] != ":":
                raise ValueError(f"expected ':' at {pos}")
            obj[key], pos = _decode(text, _skip(text, pos + 1), depth - 1)
        else:
            value, pos = _decode(text, pos, depth - 1)
            arr.append(value)
        pos = _skip(text, pos)
        sep = text[pos:pos + 1]
        if sep == closer:
            return (obj if opener == "{" else arr), pos + 1
        if sep != ",":
            raise ValueError(f"expected ',' or {closer!r} at {pos}")
        pos = _skip(text, pos + 1)


def loads_in_steps(body: bytes) -> Any:
    """json.loads for big answers, one series at a time.

    json.loads holds the GIL for the whole document (74 ms for 50k series, 0.56 s
    for 160k on the reference machine), so even in a worker thread it stalls the
    event loop that long. Decoded series by series, the interpreter can switch
    back to the loop between any two of them.
    """
    text = body.decode("utf-8")
    value, end = _decode(text, _skip(text, 0), _SPLIT_DEPTH)
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data at {end}")
    return value


_gc_lock = threading.Lock()
_gc_pausers = 0


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a big answer is turned into objects.

    Hundreds of thousands of new containers make the collector run full
    collections over and over, each walking the whole heap with the GIL held:
    200k series took 6 s to parse and stalled the event loop 0.5 s at a time with
    it, 1.1 s and 0.1 s without. The answer's objects are acyclic (refcounting frees
    them); the collector runs again once the last big answer is done.
    """
    global _gc_pausers
    with _gc_lock:
        _gc_pausers += 1
        if _gc_pausers == 1:
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0:
                gc.enable()


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
        etype = str(doc.get("errorType") or ("server_error" if status >= 500 else "bad_response"))
        raise UpstreamError(etype, str(doc.get("error") or f"HTTP {status}"), status)
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


class BearerFileAuth(httpx.Auth):
    """A bearer token read from a file through the one secret-file reader (rotation-safe)."""

    def __init__(self, path: Path) -> None:
        self.source = SecretFile(path, "upstream_bearer")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.source.read()}"
        yield request


class PrometheusClient:
    """One pooled httpx.AsyncClient for the life of the app."""

    def __init__(self, settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None,
                 breaker: CircuitBreaker | None = None) -> None:
        self.settings = settings
        self.query_url = f"{settings.prometheus_url}/api/v1/query"
        headers = {"Accept": "application/json", **settings.prometheus_headers}
        auth: httpx.Auth | None = None
        if settings.prometheus_bearer_token is not None:
            headers["Authorization"] = f"Bearer {settings.prometheus_bearer_token.get_secret_value()}"
        elif settings.prometheus_bearer_token_file is not None:
            auth = BearerFileAuth(settings.prometheus_bearer_token_file)
        if settings.prometheus_username is not None:
            password = settings.prometheus_password.get_secret_value() if settings.prometheus_password else ""
            auth = httpx.BasicAuth(settings.prometheus_username, password)
        verify: bool | str = settings.prometheus_verify_tls
        if verify and settings.prometheus_ca_file is not None:
            verify = str(settings.prometheus_ca_file)
        limits = httpx.Limits(max_connections=settings.prometheus_max_connections,
                              max_keepalive_connections=settings.prometheus_max_connections)
        self._http = httpx.AsyncClient(
            headers=headers, auth=auth, verify=verify, limits=limits, transport=transport,
            timeout=httpx.Timeout(settings.request_deadline_seconds,
                                  connect=settings.connect_timeout_seconds),
        )
        tracing.instrument_client(self._http)  # client spans, traceparent sent upstream
        self.breaker = breaker or CircuitBreaker(settings.breaker_failure_threshold,
                                                 settings.breaker_reset_seconds)
        self.episode = FailureEpisode(f"upstream Prometheus {redact_url(settings.prometheus_url)}", log)
        self.up: bool | None = None  # unknown until the first request
        self.last_success: float | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def query(self, expr: str, *, timeout: float, category: str,
                    headers: Mapping[str, str] | None = None) -> QueryAnswer:
        """Evaluate one instant query within `timeout` seconds (also sent upstream).

        `headers`: extra upstream headers for this request (a tenant's X-Scope-OrgID).
        """
        async def exchange() -> tuple[int, bytes]:
            body, status = await self._read(expr, timeout, headers)
            return status, body

        async def decode(status: int, body: bytes) -> QueryAnswer:
            # Parsed outside the timeout: the upstream has answered in time, and what a
            # big answer costs to parse is the gateway's time (the engine's deadline
            # bounds the request), not an upstream failure for the breaker.
            return await parse_off_loop(body, status, self.settings.offload_min_bytes)

        return await self._guarded(category, timeout, exchange, decode, lambda _: None)

    async def _guarded(self, category: str, timeout: float,
                       exchange: Callable[[], Awaitable[tuple[int, bytes]]],
                       decode: Callable[[int, bytes], Awaitable[_T]],
                       verdict: Callable[[_T], UpstreamError | None]) -> _T:
        """_attempt in a span of its own: breaker, HTTP exchange (the client span) and decoding."""
        with tracing.span("upstream", {"gateway.category": category, "gateway.timeout_seconds": timeout}):
            return await self._attempt(category, timeout, exchange, decode, verdict)

    async def _attempt(self, category: str, timeout: float,
                       exchange: Callable[[], Awaitable[tuple[int, bytes]]],
                       decode: Callable[[int, bytes], Awaitable[_T]],
                       verdict: Callable[[_T], UpstreamError | None]) -> _T:
        """One upstream exchange under the breaker and a total deadline (not per read).

        Every outcome is recorded once, so the breaker, the metrics and the episode log
        see it; `verdict` says whether a decoded answer is an upstream error. Our own
        missing credentials are a local error, never counted against the upstream.
        """
        if not self.breaker.allow():
            raise UpstreamError(
                "circuit_open",
                f"upstream failing; next probe in {self.breaker.retry_after():.1f}s",
            )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                status, body = await exchange()
            result = await decode(status, body)
        except UpstreamError as exc:
            self._record(category, started, exc)
            raise
        except SecretUnavailable as exc:
            raise UpstreamError("credentials_unavailable", str(exc)) from None
        except TimeoutError:
            timed_out = UpstreamError("timeout", f"no complete answer within {timeout:.2f}s")
            self._record(category, started, timed_out)
            raise timed_out from None
        except Exception as unexpected:  # the breaker must see every outcome
            odd = UpstreamError("bad_response", f"{type(unexpected).__name__}: {unexpected}")
            self._record(category, started, odd)
            raise odd from None
        self._record(category, started, verdict(result))
        return result

    async def _post(self, expr: str, timeout: float, headers: Mapping[str, str] | None = None) -> QueryAnswer:
        return parse_answer(*await self._read(expr, timeout, headers))

    async def _read(self, expr: str, timeout: float,
                    headers: Mapping[str, str] | None = None) -> tuple[bytes, int]:
        """POST one query; the raw answer body (within the byte cap) and its HTTP status."""
        timeout = max(timeout, 0.001)
        # Ask Prometheus to give up slightly before we do, so it reports its own timeout.
        upstream_timeout = max(timeout * 0.9, 0.001)
        # Prometheus durations take no fractions: whole milliseconds.
        form = [("query", expr), ("timeout", f"{max(1, int(upstream_timeout * 1000))}ms")]
        status, body = await self._exchange("POST", self.query_url, form, timeout, headers)
        return body, status

    async def _exchange(self, method: str, url: str, params: Sequence[tuple[str, str]],
                        timeout: float, headers: Mapping[str, str] | None) -> tuple[int, bytes]:
        """One request within `timeout` seconds and the size cap: (HTTP status, body).

        POST bodies are encoded here, not by httpx, so repeated keys (`match[]`) and
        their order reach the upstream exactly as given.
        """
        timeout = max(timeout, 0.001)
        limit = self.settings.prometheus_max_response_bytes
        extra: dict[str, str] = dict(headers or {})
        content: bytes | None = None
        query: httpx.QueryParams | None = None
        if method == "POST":
            content = urlencode(list(params)).encode()
            extra["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            query = httpx.QueryParams(urlencode(list(params)))
        try:
            async with self._http.stream(
                method, url, params=query, content=content, headers=extra,
                timeout=httpx.Timeout(timeout, connect=min(timeout, self.settings.connect_timeout_seconds)),
            ) as resp:
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise UpstreamError("too_large", f"answer of {declared} bytes exceeds {limit}", resp.status_code)
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise UpstreamError("too_large", f"answer exceeds {limit} bytes", resp.status_code)
                    chunks.append(chunk)
                return resp.status_code, b"".join(chunks)
        except httpx.ConnectError as exc:
            raise UpstreamError("unreachable", f"cannot connect: {exc}") from None
        except httpx.TimeoutException:
            raise UpstreamError("timeout", f"no answer within {timeout:.2f}s") from None
        except httpx.HTTPError as exc:
            raise UpstreamError("transport", f"{type(exc).__name__}: {exc}") from None

    async def api(self, method: str, path: str, params: Sequence[tuple[str, str]], *,
                  timeout: float, category: str = "api",
                  headers: Mapping[str, str] | None = None) -> ApiAnswer:
        """One request to the upstream's HTTP API (`path` relative to PROMETHEUS_URL).

        Same rules as the figures: breaker first (open: fail at once), `timeout` as
        the total deadline, the size cap, one error vocabulary. Only the caller's
        params go upstream (a `timeout` param only when the caller includes one).
        An upstream error envelope is returned, not raised; transport failures,
        non-envelope bodies and our own missing credentials raise UpstreamError.
        """
        if method not in ("GET", "POST"):
            raise ValueError(f"method {method!r}: GET or POST")
        url = f"{self.settings.prometheus_url}{path}"

        async def exchange() -> tuple[int, bytes]:
            return await self._exchange(method, url, params, timeout, headers)

        async def decode(status: int, body: bytes) -> ApiAnswer:
            return _api_answer(body, status)

        def verdict(answer: ApiAnswer) -> UpstreamError | None:
            etype = answer.error_type
            return None if etype is None else UpstreamError(etype, str(answer.doc.get("error") or ""),
                                                             answer.status_code)

        return await self._guarded(category, timeout, exchange, decode, verdict)

    async def api_get(self, path: str, params: Sequence[tuple[str, str]], *, timeout: float) -> Any:
        """GET another endpoint of the HTTP API (`/api/v1/metadata`, `/api/v1/series`, ...):
        the decoded `data` of a success envelope, UpstreamError otherwise.

        A thin wrapper over api() (same pool, credentials, path prefix, size cap, total
        deadline, breaker), counted under the category "doctor".
        """
        answer = await self.api("GET", path, params, timeout=timeout, category="doctor")
        if answer.error_type is not None:
            raise UpstreamError(answer.error_type, str(answer.doc.get("error") or f"HTTP {answer.status_code}"),
                                answer.status_code)
        return answer.doc.get("data")

    def _record(self, category: str, started: float, exc: UpstreamError | None) -> None:
        seconds = time.perf_counter() - started
        answered = exc is None or exc.error_type in QUERY_ERRORS
        if answered:
            # The upstream answered: healthy, even if this query was at fault.
            self.breaker.success()
            self.up = True
            self.last_success = time.time()
            self.episode.success()
        elif exc is not None:
            self.breaker.failure()
            self.up = False
            self.episode.failure(f"{exc.error_type}: {exc.message}")
        gm.observe_upstream(category, seconds, None if exc is None else exc.error_type, answered)

    async def ready(self) -> tuple[bool, str]:
        """Readiness: can the query API evaluate `vector(1)`? Works under any API prefix."""
        try:
            with tracing.quiet():
                await self._post("vector(1)", 1.5)
        except UpstreamError as exc:
            return False, exc.error_type
        return True, "ready"
