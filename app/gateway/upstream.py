"""The upstream Prometheus HTTP API client: one pooled connection set, bounded time.

Speaks `/api/v1/query` of Prometheus and anything that mounts the same API under
a path prefix (Thanos, Mimir, Grafana Cloud, VictoriaMetrics). Every failure is
mapped to one error type (Prometheus' own errorType where it sent one), counted,
fed to the circuit breaker, and logged once per episode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.common.episodes import FailureEpisode
from app.common.secrets import SecretFile, SecretUnavailable, redact_url
from app.gateway import metrics as gm
from app.gateway.breaker import CircuitBreaker
from app.gateway.settings import GatewaySettings

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


def _value(raw: Any) -> float:
    # Prometheus sends values as strings so that NaN and +Inf survive JSON.
    return float(raw[1])


def parse_answer(body: bytes, status: int) -> QueryAnswer:
    """Decode a Prometheus API envelope; raise UpstreamError for anything but success."""
    try:
        doc = json.loads(body)
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
            series = [Series(dict(s.get("metric") or {}), _value(s["value"])) for s in result]
        elif rtype == "scalar":
            series = [Series({}, _value(result))]
        else:
            raise UpstreamError("bad_response", f"unexpected resultType {rtype!r}", status)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise UpstreamError("bad_response", f"malformed result: {exc!r}", status) from None
    return QueryAnswer(series, warnings)


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
        self.breaker = breaker or CircuitBreaker(settings.breaker_failure_threshold,
                                                 settings.breaker_reset_seconds)
        self.episode = FailureEpisode(f"upstream Prometheus {redact_url(settings.prometheus_url)}", log)
        self.up: bool | None = None  # unknown until the first request
        self.last_success: float | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def query(self, expr: str, *, timeout: float, category: str) -> QueryAnswer:
        """Evaluate one instant query within `timeout` seconds (also sent upstream)."""
        if not self.breaker.allow():
            raise UpstreamError(
                "circuit_open",
                f"upstream failing; next probe in {self.breaker.retry_after():.1f}s",
            )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(timeout, 0.001)):  # total, not per read
                answer = await self._post(expr, timeout)
        except UpstreamError as exc:
            self._record(category, started, exc)
            raise
        except SecretUnavailable as exc:
            # Our own credentials are missing: a local error, not the upstream's.
            raise UpstreamError("credentials_unavailable", str(exc)) from None
        except TimeoutError:
            timed_out = UpstreamError("timeout", f"no complete answer within {timeout:.2f}s")
            self._record(category, started, timed_out)
            raise timed_out from None
        except Exception as unexpected:  # the breaker must see every outcome
            odd = UpstreamError("bad_response", f"{type(unexpected).__name__}: {unexpected}")
            self._record(category, started, odd)
            raise odd from None
        self._record(category, started, None)
        return answer

    async def _post(self, expr: str, timeout: float) -> QueryAnswer:
        timeout = max(timeout, 0.001)
        # Ask Prometheus to give up slightly before we do, so it reports its own timeout.
        upstream_timeout = max(timeout * 0.9, 0.001)
        # Prometheus durations take no fractions: whole milliseconds.
        form = {"query": expr, "timeout": f"{max(1, int(upstream_timeout * 1000))}ms"}
        limit = self.settings.prometheus_max_response_bytes
        try:
            async with self._http.stream(
                "POST", self.query_url, data=form,
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
                return parse_answer(b"".join(chunks), resp.status_code)
        except httpx.ConnectError as exc:
            raise UpstreamError("unreachable", f"cannot connect: {exc}") from None
        except httpx.TimeoutException:
            raise UpstreamError("timeout", f"no answer within {timeout:.2f}s") from None
        except httpx.HTTPError as exc:
            raise UpstreamError("transport", f"{type(exc).__name__}: {exc}") from None

    async def api_get(self, path: str, params: list[tuple[str, str]], *, timeout: float) -> Any:
        """GET another endpoint of the HTTP API (`/api/v1/metadata`, `/api/v1/series`, ...).

        Returns the decoded `data` of a success envelope (an object or a list,
        depending on the endpoint); raises UpstreamError otherwise. Same pool,
        credentials, path prefix and size limit as queries, bounded by `timeout`
        in total; not counted as figure traffic (no breaker, no query metrics).
        """
        timeout = max(timeout, 0.001)
        limit = self.settings.prometheus_max_response_bytes
        status = 0
        body = bytearray()
        try:
            async with asyncio.timeout(timeout), self._http.stream(
                "GET", f"{self.settings.prometheus_url}{path}", params=tuple(params),
                timeout=httpx.Timeout(timeout, connect=min(timeout, self.settings.connect_timeout_seconds)),
            ) as resp:
                status = resp.status_code
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise UpstreamError("too_large", f"answer exceeds {limit} bytes", status)
        except SecretUnavailable as exc:
            raise UpstreamError("credentials_unavailable", str(exc)) from None
        except (TimeoutError, httpx.TimeoutException):
            raise UpstreamError("timeout", f"no answer within {timeout:.2f}s") from None
        except httpx.ConnectError as exc:
            raise UpstreamError("unreachable", f"cannot connect: {exc}") from None
        except httpx.HTTPError as exc:
            raise UpstreamError("transport", f"{type(exc).__name__}: {exc}") from None
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise UpstreamError("bad_response", f"HTTP {status}, not JSON", status) from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            doc = doc if isinstance(doc, dict) else {}
            etype = str(doc.get("errorType") or ("server_error" if status >= 500 else "bad_response"))
            raise UpstreamError(etype, str(doc.get("error") or f"HTTP {status}"), status)
        return doc.get("data")

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
            await self._post("vector(1)", 1.5)
        except UpstreamError as exc:
            return False, exc.error_type
        return True, "ready"
