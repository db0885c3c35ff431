"""The upstream Prometheus HTTP API client: one pooled connection set, bounded time.

Speaks `/api/v1/query` of Prometheus and anything that mounts the same API under
a path prefix (Thanos, Mimir, Grafana Cloud, VictoriaMetrics). Every failure is
mapped to one error type (Prometheus' own errorType where it sent one), counted,
fed to the circuit breaker, and logged once per episode.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import suppress
from typing import Any, TypeVar
from urllib.parse import quote_plus
from urllib.request import getproxies_environment, proxy_bypass

import httpx

from app.common import tracing
from app.common.episodes import FailureEpisode
from app.common.secrets import SecretFile, SecretUnavailable, redact_url
from app.gateway import metrics as gm
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import (
    ApiAnswer,
    QueryAnswer,
    UpstreamError,
    _api_answer,
    parse_off_loop,
)
from app.gateway.upstream.breaker import QUERY_ERRORS, CircuitBreaker, judge
from app.gateway.upstream.transport import LeanTransport

_T = TypeVar("_T")

log = logging.getLogger("gateway.prometheus")

# Categories whose expressions are a caller's (the query API), not the catalog's: what
# their queries cause is theirs, never the upstream's (app.gateway.upstream.breaker.judge).
CLIENT_CATEGORIES = frozenset({"api", "range", "instant"})

__all__ = ["CLIENT_CATEGORIES", "QUERY_ERRORS", "PrometheusClient"]




_LOCAL_SUFFIXES = (".local", ".internal", ".svc", ".cluster.local", ".localhost")


def on_local_network(url: str) -> bool:
    """Whether the upstream is on this host or its own network: a loopback, private or
    link-local address, or a name that only resolves inside one (no dot, .svc, .local, ...)."""
    host = (httpx.URL(url).host or "").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(_LOCAL_SUFFIXES)
    return address.is_loopback or address.is_private or address.is_link_local


def accept_encoding(settings: GatewaySettings) -> str:
    """PROMETHEUS_COMPRESSION as an Accept-Encoding: a local upstream spends more CPU gzipping
    megabyte answers than the bytes cost (benchmarks.md, week-long panels), a remote one less."""
    mode = settings.prometheus_compression
    if mode == "auto":
        mode = "identity" if on_local_network(settings.prometheus_url) else "gzip"
    return "identity" if mode == "identity" else "gzip, deflate"


class UpstreamHttp:
    """The pooled connections to the upstream: credentials, TLS, limits, client spans,
    one request within its time and the size cap, transport failures in the one error
    vocabulary.

    Requests are httpx's own types, sent straight to one transport chosen here: the lean
    one (upstream/transport.py), or httpx's when the environment names a proxy for the
    upstream. No httpx.AsyncClient in between: its per-request layers (merging, cookies,
    auth flows, redirects; none of which this client uses) cost about 0.1 ms of a cold
    figure request's few (docs/benchmarks.md, the figure path).
    """

    def __init__(self, settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        headers = httpx.Headers({"Accept": "application/json", "User-Agent": "metrics-gateway"})
        headers.update(settings.prometheus_headers)
        if "accept-encoding" not in headers:
            headers["Accept-Encoding"] = accept_encoding(settings)
        self._token_file: SecretFile | None = None
        if settings.prometheus_username is not None:
            password = settings.prometheus_password.get_secret_value() if settings.prometheus_password else ""
            basic = base64.b64encode(f"{settings.prometheus_username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        elif settings.prometheus_bearer_token is not None:
            headers["Authorization"] = f"Bearer {settings.prometheus_bearer_token.get_secret_value()}"
        elif settings.prometheus_bearer_token_file is not None:
            # read on every request through the one secret-file reader (rotation-safe)
            self._token_file = SecretFile(settings.prometheus_bearer_token_file, "upstream_bearer")
        self._headers = headers
        # client spans, traceparent sent upstream
        self._transport = tracing.instrument_transport(transport or _transport_for(settings))

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _request(self, method: str, url: str, params: Sequence[tuple[str, str]], timeout: float,
                 headers: Mapping[str, str] | None) -> httpx.Request:
        """POST bodies are encoded here, so repeated keys (`match[]`) and their order
        reach the upstream exactly as given."""
        merged = httpx.Headers(self._headers)
        if headers:
            merged.update(headers)  # case-insensitively: a tenant's X-Scope-OrgID replaces a configured one
        if self._token_file is not None:
            merged["Authorization"] = f"Bearer {self._token_file.read()}"
        connect = min(timeout, self.settings.connect_timeout_seconds)
        extensions = {"timeout": {"connect": connect, "read": timeout, "write": timeout, "pool": timeout}}
        if method == "POST":
            merged["Content-Type"] = "application/x-www-form-urlencoded"
            return httpx.Request(method, url, content=form(params).encode(), headers=merged,
                                 extensions=extensions)
        return httpx.Request(method, url, params=httpx.QueryParams(form(params)), headers=merged,
                             extensions=extensions)

    async def exchange(self, method: str, url: str, params: Sequence[tuple[str, str]],
                       timeout: float, headers: Mapping[str, str] | None,
                       max_bytes: int | None = None) -> tuple[int, bytes]:
        """One request within `timeout` seconds and the size cap (`max_bytes` when smaller):
        (HTTP status, body)."""
        timeout = max(timeout, 0.001)
        limit = self.settings.prometheus_max_response_bytes
        limit = min(limit, max_bytes or limit)
        request = self._request(method, url, params, timeout, headers)
        try:
            resp = await self._transport.handle_async_request(request)
            try:
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
            finally:
                await resp.aclose()
        except httpx.ConnectError as exc:
            raise UpstreamError("unreachable", f"cannot connect: {exc}") from None
        except httpx.ConnectTimeout:
            raise UpstreamError("unreachable", f"no connection within {timeout:.2f}s") from None
        except httpx.PoolTimeout:
            raise UpstreamError("pool", f"no free upstream connection within {timeout:.2f}s") from None
        except httpx.TimeoutException:
            raise UpstreamError("timeout", f"no answer within {timeout:.2f}s") from None
        except httpx.HTTPError as exc:
            raise UpstreamError("transport", f"{type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=256)
def _quoted(value: str) -> str:
    return quote_plus(value)


def form(params: Sequence[tuple[str, str]]) -> str:
    """`urlencode(params)`, byte for byte, with short values' quoting remembered: a figure
    batch sends the same few-kilobyte expression on every cold request, and quoting it
    character by character was 5% of the gateway's CPU on that request."""
    return "&".join(f"{_quoted(k)}={_quoted(v) if len(v) <= 16384 else quote_plus(v)}" for k, v in params)


def _transport_for(settings: GatewaySettings) -> httpx.AsyncBaseTransport:
    """The lean transport; httpx's own when the environment names a proxy for the upstream
    (HTTP(S)_PROXY / ALL_PROXY, minus NO_PROXY, as httpx itself would honour them)."""
    verify: bool | str = settings.prometheus_verify_tls
    if verify and settings.prometheus_ca_file is not None:
        verify = str(settings.prometheus_ca_file)
    limits = httpx.Limits(max_connections=settings.prometheus_max_connections,
                          max_keepalive_connections=settings.prometheus_max_connections)
    url = httpx.URL(settings.prometheus_url)
    proxies = getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(url.host):
        return httpx.AsyncHTTPTransport(verify=verify, limits=limits, proxy=proxy)
    return LeanTransport(verify=verify, limits=limits)


class PrometheusClient:
    """The one upstream client, for the life of the app: instant queries and the HTTP API
    under the breaker and a total deadline, over one pool (UpstreamHttp), every outcome
    recorded once (UpstreamHealth)."""

    def __init__(self, settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None,
                 breaker: CircuitBreaker | None = None) -> None:
        self.settings = settings
        self.query_url = f"{settings.prometheus_url}/api/v1/query"
        self.http = UpstreamHttp(settings, transport)
        self.health = UpstreamHealth(settings, breaker or CircuitBreaker(settings.breaker_failure_threshold,
                                                                         settings.breaker_reset_seconds),
                                     self._probe_once)
        self.breaker = self.health.breaker
        self.episode = self.health.episode

    @property
    def up(self) -> bool | None:
        """Did the upstream answer the last request (None: unknown until the first)?"""
        return self.health.up

    @property
    def last_success(self) -> float | None:
        return self.health.last_success

    async def _probe_once(self) -> None:
        """`vector(1)`, whose outcome the breaker does count (see UpstreamHealth)."""
        with suppress(UpstreamError):
            await self.query("vector(1)", timeout=min(2.0, self.settings.request_deadline_seconds),
                             category="probe")

    async def aclose(self) -> None:
        await self.health.aclose()
        await self.http.aclose()

    async def query(self, expr: str, *, timeout: float, category: str,
                    headers: Mapping[str, str] | None = None) -> QueryAnswer:
        """Evaluate one instant query within `timeout` seconds (also sent upstream).

        `headers`: extra upstream headers for this request (a tenant's X-Scope-OrgID).
        """
        async def exchange() -> tuple[int, bytes]:
            return await self._read(expr, timeout, headers)

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
            self.health.record(category, started, exc)
            raise
        except SecretUnavailable as exc:
            raise UpstreamError("credentials_unavailable", str(exc)) from None
        except TimeoutError:
            timed_out = UpstreamError("timeout", f"no complete answer within {timeout:.2f}s")
            self.health.record(category, started, timed_out)
            raise timed_out from None
        except Exception as unexpected:  # the breaker must see every outcome
            odd = UpstreamError("bad_response", f"{type(unexpected).__name__}: {unexpected}")
            self.health.record(category, started, odd)
            raise odd from None
        self.health.record(category, started, verdict(result))
        return result

    async def _read(self, expr: str, timeout: float,
                    headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """POST one query: (HTTP status, the raw answer body within the byte cap)."""
        timeout = max(timeout, 0.001)
        # Ask Prometheus to give up slightly before we do, so it reports its own timeout.
        upstream_timeout = max(timeout * 0.9, 0.001)
        # Prometheus durations take no fractions: whole milliseconds.
        form = [("query", expr), ("timeout", f"{max(1, int(upstream_timeout * 1000))}ms")]
        return await self.http.exchange("POST", self.query_url, form, timeout, headers)

    async def api(self, method: str, path: str, params: Sequence[tuple[str, str]], *,
                  timeout: float, category: str = "api",
                  headers: Mapping[str, str] | None = None, max_bytes: int | None = None) -> ApiAnswer:
        """One request to the upstream's HTTP API (`path` relative to PROMETHEUS_URL).

        Same rules as the figures: breaker first (open: fail at once), `timeout` as
        the total deadline, the size cap, one error vocabulary. Only the caller's
        params go upstream (a `timeout` param only when the caller includes one).
        An upstream error envelope is returned, not raised; transport failures,
        non-envelope bodies and our own missing credentials raise UpstreamError.
        `max_bytes`: a smaller size cap (the caller's limit).
        """
        if method not in ("GET", "POST"):
            raise ValueError(f"method {method!r}: GET or POST")
        url = f"{self.settings.prometheus_url}{path}"

        async def exchange() -> tuple[int, bytes]:
            return await self.http.exchange(method, url, params, timeout, headers, max_bytes)

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


class UpstreamHealth:
    """What the outcomes say about the upstream: the breaker fed by their verdict
    (app.gateway.upstream.breaker.judge), whether it is up and when it last answered,
    one log line per episode, the metrics; and, when a caller's query ran out of time
    (which says nothing about the upstream), a probe of its own (`probe`, one at a time)
    whose outcome the breaker does count."""

    def __init__(self, settings: GatewaySettings, breaker: CircuitBreaker,
                 probe: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.breaker = breaker
        self.episode = FailureEpisode(f"upstream Prometheus {redact_url(settings.prometheus_url)}", log)
        self.up: bool | None = None  # unknown until the first request
        self.last_success: float | None = None
        self._probe_work = probe
        self._probe: asyncio.Task[None] | None = None

    def _ask_upstream(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_work())

    async def aclose(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with suppress(asyncio.CancelledError, UpstreamError):
                await self._probe

    def record(self, category: str, started: float, exc: UpstreamError | None) -> None:
        """Count one outcome, and feed the breaker what it says about the upstream
        (app.gateway.upstream.breaker.judge): what a caller's query caused never counts against it."""
        seconds = time.perf_counter() - started
        client_query = category in CLIENT_CATEGORIES
        verdict = judge(None if exc is None else exc.error_type, None if exc is None else exc.status,
                        client_query=client_query)
        self.breaker.record(verdict)
        if verdict == "up":
            # The upstream answered: healthy, even if this query was at fault.
            self.up = True
            self.last_success = time.time()
            self.episode.success()
        elif verdict == "down" and exc is not None:
            self.up = False
            self.episode.failure(f"{exc.error_type}: {exc.message}")
        elif client_query:
            self._ask_upstream()
        gm.observe_upstream(category, seconds, None if exc is None else exc.error_type, verdict == "up")
