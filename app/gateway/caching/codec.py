"""figure answers to bytes and back (compact JSON, zlib, bounded)."""

from __future__ import annotations

import json
import math
import zlib
from typing import Any, Final

from app.gateway.result import Fetched, Sample, UpstreamFailure


class CodecError(ValueError):
    """Bytes that are not an entry of this format (corrupt, foreign or truncated)."""


_JSON: Final = b"J"  # compact JSON


_ZLIB: Final = b"Z"  # zlib-compressed compact JSON


_FAIL: Final = b"E"  # a failed fetch (res entries only)


_BIG: Final = b"B"  # an answer too large to share (res entries only)


def _num(v: float) -> float | str:
    # JSON has no NaN or infinities; Prometheus sends them (as strings), so do we.
    return v if math.isfinite(v) else repr(v)


class Codec:
    """Fetched answers to bytes and back: compact JSON, zlib when it pays, bounded."""

    def __init__(self, max_bytes: int = 1024 * 1024, compress_min_bytes: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.compress_min_bytes = compress_min_bytes

    def encode(self, fetched: Fetched, expires_at: float = 0.0) -> bytes | None:
        """The entry's bytes, or None when it exceeds the size bound."""
        doc: dict[str, Any] = {
            "t": fetched.fetched_at,
            "s": [[[x for pair in s.labels for x in pair], _num(s.value)] for s in fetched.samples],
        }
        if expires_at:
            doc["e"] = expires_at
        if fetched.warnings:
            doc["w"] = list(fetched.warnings)
        if fetched.dropped:
            doc["d"] = fetched.dropped
        raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        data = _JSON + raw
        if len(raw) >= self.compress_min_bytes:
            packed = zlib.compress(raw, 6)
            if len(packed) < len(raw):
                data = _ZLIB + packed
        return data if len(data) <= self.max_bytes else None

    def decode(self, data: bytes) -> tuple[Fetched, float]:
        """(answer, expires_at: unix time) from `encode`'s bytes; CodecError for anything
        else. The answer's own ``expires_at`` (a monotonic instant of one process) is 0."""
        tag, body = data[:1], data[1:]
        try:
            if tag == _ZLIB:
                body = zlib.decompress(body)
            elif tag != _JSON:
                raise CodecError(f"unknown entry tag {tag!r}")
            doc = json.loads(body)
            samples = []
            for flat, value in doc["s"]:
                labels = tuple((str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat) - 1, 2))
                samples.append(Sample(labels, float(value)))
            warnings = tuple(str(w) for w in doc.get("w", ()))
            return (Fetched(tuple(samples), float(doc["t"]), warnings, int(doc.get("d", 0))),
                    float(doc.get("e", 0.0)))
        except CodecError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, zlib.error) as exc:
            raise CodecError(f"undecodable entry: {exc}") from None

    @staticmethod
    def encode_failure(failure: UpstreamFailure) -> bytes:
        return _FAIL + json.dumps([failure.error_type, failure.message[:500]], separators=(",", ":")).encode()

    def decode_outcome(self, data: bytes) -> tuple[Fetched, float] | UpstreamFailure | None:
        """A res entry: (answer, expires_at), the failure, or None for "too large to share"."""
        tag = data[:1]
        if tag == _BIG:
            return None
        if tag == _FAIL:
            try:
                etype, message = json.loads(data[1:])
                return UpstreamFailure(str(etype), str(message))
            except (ValueError, TypeError) as exc:
                raise CodecError(f"undecodable failure: {exc}") from None
        return self.decode(data)
