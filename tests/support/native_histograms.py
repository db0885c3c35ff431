"""An exporter of native histograms in the protobuf exposition format, for tests.

Prometheus (>= 2.40, ``--enable-feature=native-histograms``) scrapes native
histograms only in protobuf (delimited ``io.prometheus.client.MetricFamily``
messages). prometheus_client does not write them, so the few fields needed are
encoded here by hand (client_model's metrics.proto field numbers).
"""

from __future__ import annotations

import struct
import threading

from tests.support.procs import serve_exposition

CONTENT_TYPE = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint((num << 3) | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _text(num: int, s: str) -> bytes:
    return _field(num, 2, s.encode())


def histogram(count: int, total: float, schema: int, buckets: dict[int, int], zero: int = 0) -> bytes:
    """A Histogram message: integer counts, positive buckets by index (one span per run)."""
    body = (_field(1, 0, _varint(count)) + _field(2, 1, struct.pack("<d", total))
            + _field(5, 0, _varint(_zigzag(schema))) + _field(6, 1, struct.pack("<d", 1e-128))
            + _field(7, 0, _varint(zero)))
    indices = sorted(buckets)
    spans, deltas, prev_index, prev_count = [], [], None, 0
    for i in indices:
        if prev_index is None or i != prev_index + 1:
            offset = i if prev_index is None else i - prev_index - 1
            spans.append([offset, 0])
        spans[-1][1] += 1
        deltas.append(buckets[i] - prev_count)
        prev_index, prev_count = i, buckets[i]
    for offset, length in spans:
        body += _field(12, 2, _field(1, 0, _varint(_zigzag(offset))) + _field(2, 0, _varint(length)))
    body += _field(13, 2, b"".join(_varint(_zigzag(d)) for d in deltas))
    return body


def family(name: str, help_text: str, metrics: list[tuple[dict[str, str], bytes]]) -> bytes:
    """One delimited MetricFamily of type HISTOGRAM."""
    body = _text(1, name) + _text(2, help_text) + _field(3, 0, _varint(4))
    for labels, hist in metrics:
        metric = b"".join(_field(1, 2, _text(1, k) + _text(2, v)) for k, v in sorted(labels.items()))
        body += _field(4, 2, metric + _field(7, 2, hist))
    return _varint(len(body)) + body


class NativeHistogramExporter:
    """Serves `nh_request_seconds{route}`: observations added at every scrape."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.lock = threading.Lock()
        self.server, self.port = serve_exposition(self.exposition, CONTENT_TYPE)

    def exposition(self) -> bytes:
        with self.lock:
            self.scrapes += 1
            n = self.scrapes
        metrics = []
        for route, scale in (("a", 1), ("b", 3)):
            buckets = {i: n * scale * (i + 3) + n // (i + 4) for i in range(-2, 4)}
            buckets[7] = n // 3  # a second span, growing slowly
            count = sum(buckets.values()) + n
            metrics.append(({"route": route}, histogram(count, 0.37 * n * scale, 0, buckets, zero=n)))
        return family("nh_request_seconds", "Request latency (native).", metrics)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
