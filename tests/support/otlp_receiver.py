"""A test OTLP/HTTP trace receiver on loopback: decodes the real protobuf, keeps the spans.

Both the gateway (the Python SDK's OTLP/HTTP exporter) and Prometheus (``tracing:`` with
``client_type: http``) POST ``ExportTraceServiceRequest`` messages to ``/v1/traces`` as
``application/x-protobuf``, gzip-compressed when configured. Each is decoded with the
official generated classes (opentelemetry-proto) into flat `Span` records; anything
else (a JSON body, a body that does not decode) is answered 400 and counted in
`rejected`, so a test sees an exporter that speaks something else.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

PATH = "/v1/traces"
MAX_BODY = 32 * 1024 * 1024


@dataclass(frozen=True)
class Span:
    service: str            # the resource's service.name
    scope: str              # the instrumentation scope's name
    trace_id: str           # hex
    span_id: str            # hex
    parent_id: str          # hex, "" for a root span
    name: str
    kind: int               # opentelemetry.proto.trace.v1.Span.SpanKind
    start_ns: int
    end_ns: int
    attributes: dict[str, object] = field(default_factory=dict)


def _value(v: AnyValue) -> object:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which is None or which == "kvlist_value":
        return None
    return getattr(v, which)


def decode(body: bytes) -> list[Span]:
    """The spans of one ExportTraceServiceRequest (raises DecodeError when it is not one)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[Span] = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(Span(
                    service=service, scope=ss.scope.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(), name=s.name, kind=s.kind,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes={kv.key: _value(kv.value) for kv in s.attributes},
                ))
    return spans


class OtlpReceiver:
    """`start()` binds 127.0.0.1 on a free port; `endpoint` is the base URL for exporters.

    `keep=False` (benchmarks): bodies are counted (`requests`, `bytes`), not decoded, so
    the receiver takes little of the CPU it shares with what is measured, like a
    collector on another machine.
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[Span] = []
        self.requests = 0
        self.bytes = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for the SDK (it appends /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        """Prometheus' ``tracing: endpoint`` (host:port; it appends /v1/traces)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(min(length, MAX_BODY))
                ok = self.path == PATH and length <= MAX_BODY and receiver._accept(
                    body, self.headers.get("content-encoding", ""), self.headers.get("content-type", ""))
                answer = ExportTraceServiceResponse().SerializeToString() if ok else b"not an OTLP trace export"
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf" if ok else "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def _accept(self, body: bytes, encoding: str, content_type: str) -> bool:
        if not self.keep:
            with self._lock:
                self.requests += 1
                self.bytes += len(body)
            return True
        try:
            if encoding.strip().lower() == "gzip":
                body = gzip.decompress(body)
            if not content_type.startswith("application/x-protobuf"):
                raise DecodeError(f"content type {content_type!r}")
            spans = decode(body)
        except (DecodeError, OSError, EOFError):
            with self._lock:
                self.rejected += 1
            return False
        with self._lock:
            self.requests += 1
            self.bytes += len(body)
            self.spans.extend(spans)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.snapshot() if s.trace_id == trace_id]

    def wait_for(self, check: Callable[[list[Span]], bool], timeout: float = 20.0) -> list[Span]:
        """Poll until `check(spans)` holds (bounded); the spans seen then."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if check(spans):
                return spans
            if time.monotonic() >= deadline:
                raise TimeoutError(f"spans never satisfied the check; got {[(s.service, s.name) for s in spans]}")
            time.sleep(0.1)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
