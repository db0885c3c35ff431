"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for it.

On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not ``true``, ``OTEL_TRACES_EXPORTER`` not ``none``). Then
the SDK exports OTLP over HTTP/protobuf in batches; ``OTEL_EXPORTER_OTLP_*`` (headers,
timeout, compression, certificates), ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``/``_ARG`` and ``OTEL_PROPAGATORS`` are read by the SDK itself,
so they mean what they mean everywhere else. Incoming ``traceparent`` (Grafana's) is
honoured by the server span; outgoing upstream requests carry it (httpx instrumentation),
so Prometheus' own spans join the trace.

Off, it costs nothing on the request path: the tracing SDK, exporter and instrumentations
are not even imported, no middleware is installed, no client is instrumented, and every helper here returns after one
module-global test (``span()`` hands back one shared null context).

Public surface: ``configure_from_env()`` (once per process, from the app factory),
``install_tracing(app, ...)`` (the server-span middleware), ``instrument_transport()``,
``span()`` (a hand span), ``note()`` (attributes of the request span), ``exemplar()``
(the current trace id for a histogram observation), ``current_ids()`` (for log lines).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from prometheus_client import Counter

from app.common.secrets import redact_url

if TYPE_CHECKING:
    import httpx
    from opentelemetry.sdk.trace import TracerProvider
    from starlette.types import Scope

log = logging.getLogger("gateway.tracing")

SPANS_EXPORTED = Counter(
    "metrics_gateway_trace_spans_exported_total",
    "Spans handed to the OTLP exporter, by outcome: exported, failed (dropped after the SDK's retries). "
    "Absent while tracing is off.",
    ["outcome"],
)

AttrValue = str | bool | int | float
SpanDetails = Callable[["Scope"], tuple[str, dict[str, Any]]]

INSTRUMENTATION = "metrics-gateway"
DEFAULT_SERVICE_NAME = "metrics-gateway"
PROTOCOLS = ("http/protobuf",)
UNTRACED_PATHS = ("/health", "/ready", "/metrics")

_NULL: AbstractContextManager[None] = nullcontext()
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


class _Request:
    """The server span of the request being handled, and its cache lookups so far."""

    __slots__ = ("lookups", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.lookups: dict[str, int] = {}


# Set by the middleware's hook, so code deep in the stack annotates the request rather
# than whichever child span is current (tasks the request spawns share the holder).
_request: ContextVar[_Request | None] = ContextVar("gateway_request_span", default=None)
_quiet: ContextVar[bool] = ContextVar("gateway_tracing_quiet", default=False)


def enabled() -> bool:
    return _tracer is not None


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the standard variables ask for trace export."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Start tracing when the environment asks for it (first call per process decides).

    A protocol other than HTTP/protobuf (``grpc``) is refused with one log line and
    tracing stays off: the gRPC exporter is not a dependency.
    """
    if _provider is not None:
        return True
    if not wanted(environ):
        return False
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol not in PROTOCOLS:
        log.error("tracing off: OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (use http/protobuf, "
                  "port 4318 on Tempo or an OpenTelemetry collector)", protocol)
        return False
    # Imported here: a process with tracing off never loads the tracing SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (default: parent-based, always on).
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_counted(OTLPSpanExporter(), _endpoint(environ))))
    # Not made the global provider: FastAPI (0.16x) turns its own native telemetry on
    # when one is set, a second server span and more per request (see fastapi_options).
    install(provider)
    log.info("tracing on: OTLP/HTTP to %s, sampler %s", _endpoint(environ), provider.sampler.get_description())
    return True


def _counted(exporter: Any, endpoint: str) -> Any:
    """`exporter`, with every batch counted and one log line per failure episode.

    The SDK retries a failed export with backoff (bounded by OTEL_EXPORTER_OTLP_TIMEOUT)
    in its background thread, then drops the batch; requests never wait for it. Its own
    logger would write a line per failed batch: it is raised to ERROR, and the episode
    says it once (and once more when export works again).
    """
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from app.common.episodes import FailureEpisode

    episode = FailureEpisode(f"trace export to {endpoint}", log)
    for name in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                 "opentelemetry.exporter.otlp.proto.http"):
        logging.getLogger(name).setLevel(logging.ERROR)

    class Counted(SpanExporter):
        def export(self, spans: Any) -> Any:
            try:
                result = exporter.export(spans)
            except Exception as exc:  # an exporter bug must not kill the export thread
                result, reason = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
            else:
                reason = "the endpoint refused or did not answer"
            ok = result is SpanExportResult.SUCCESS
            SPANS_EXPORTED.labels("exported" if ok else "failed").inc(len(spans))
            if ok:
                episode.success()
            else:
                episode.failure(reason)
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(exporter.force_flush(timeout_millis))

    return Counted()


def fastapi_options() -> dict[str, Any]:
    """``FastAPI(**fastapi_options())``: FastAPI's native telemetry off where it has one.

    The server span is ours (app/common/server_spans.py); FastAPI's would be a second
    one per request, with its own metrics and log export, whenever anything in the
    process sets a global tracer provider (or FASTAPI_OTEL_AUTO_CONFIGURE=true).
    """
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}}


def _endpoint(environ: Mapping[str, str]) -> str:
    url = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    return redact_url(url)


def install(provider: TracerProvider) -> None:
    """Trace with `provider` (tests: an SDK provider with an in-memory exporter)."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION)


def uninstall() -> None:
    """Back to off (tests). Spans already started end normally."""
    global _provider, _tracer
    _provider = _tracer = None


def install_tracing(app: Any, span_details: SpanDetails | None = None,
                    untraced: tuple[str, ...] = UNTRACED_PATHS) -> bool:
    """Add the server-span middleware (outermost: add it after every other middleware).

    `span_details(scope)`: the span name and extra attributes (the route template, so
    names stay bounded). `untraced`: paths that get no span (probes, scrapes). Nothing
    is added when tracing is off.
    """
    if _tracer is None:
        return False
    from app.common.server_spans import ServerSpans

    app.add_middleware(ServerSpans, tracer=_tracer, span_details=span_details, untraced=untraced,
                       on_start=_hold_request_span, on_end=_release_request_span)
    return True


def _hold_request_span(span: trace.Span) -> Token[_Request | None]:
    return _request.set(_Request(span))


def _release_request_span(token: Token[_Request | None]) -> None:
    _request.reset(token)


@contextmanager
def _quietly() -> Iterator[None]:
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    token = _quiet.set(True)
    try:
        with suppress_instrumentation():
            yield
    finally:
        _quiet.reset(token)


def quiet() -> AbstractContextManager[Any]:
    """No spans inside, hand or instrumented (readiness probes: a trace per probe would
    only be noise)."""
    if _tracer is None:
        return _NULL
    return _quietly()


def instrument_transport(transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
    """`transport` with a client span for every request and ``traceparent`` sent along
    (httpx's instrumentation, as a transport); `transport` itself when tracing is off."""
    if _provider is None:
        return transport
    from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport

    return AsyncOpenTelemetryTransport(transport, tracer_provider=_provider)


def span(name: str, attributes: Mapping[str, AttrValue] | None = None) -> AbstractContextManager[Any]:
    """A child span of whatever is current; a shared null context when tracing is off."""
    if _tracer is None or _quiet.get():
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


def note(attributes: Mapping[str, AttrValue]) -> None:
    """Set attributes on the request's server span (not on the current child span)."""
    if _tracer is None:
        return
    request = _request.get()
    if request is not None and request.span.is_recording():
        request.span.set_attributes(attributes)


def count_lookup(outcome: str, count: int = 1) -> None:
    """Count cache lookups on the request span: ``gateway.cache.<outcome>`` (hit, miss,
    coalesced, stale, memo) and ``gateway.cache_state``, the one outcome or ``mixed``."""
    if _tracer is None:
        return
    request = _request.get()
    if request is None or not request.span.is_recording() or count <= 0:
        return
    lookups = request.lookups
    lookups[outcome] = lookups.get(outcome, 0) + count
    request.span.set_attributes({f"gateway.cache.{outcome}": lookups[outcome],
                                 "gateway.cache_state": outcome if len(lookups) == 1 else "mixed"})


def query_hash(*parts: str) -> str:
    """A short, stable hash of a query (and its range): the same panel query, the same hash."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def exemplar() -> dict[str, str] | None:
    """``{"trace_id": ...}`` of the current sampled span, for a histogram exemplar."""
    if _tracer is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex, or None outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
