"""Prometheus text exposition for any list of metric families.

Every text route (gateway categories, vROps, ...) renders through here, so HELP,
TYPE, label escaping and content negotiation come from prometheus_client's own
encoders instead of hand-written string formatting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_GOOD_VERSION = re.compile(rb"[0-9]{1,9}(?:\.[0-9]{1,9}){0,3}")


class _StaticCollector(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


Encoder = Callable[[CollectorRegistry], bytes]


def negotiate(accept: str | None) -> tuple[Encoder, str]:
    """prometheus_client's choose_encoder, minus its crash on odd Accept headers.

    `application/openmetrics-text; version=abc` makes choose_encoder raise; a
    client's malformed header must get the default format, never a 500. (The
    security middleware also repairs such headers with `sanitize_accept` for
    routes that negotiate elsewhere; this is the one negotiation.)
    """
    try:
        return choose_encoder(accept or "")
    except (TypeError, ValueError, IndexError):
        return choose_encoder("")


def render_families(families: Sequence[Metric], accept: str | None) -> tuple[bytes, str]:
    """Encode families as 0.0.4 text, or OpenMetrics when the Accept header asks for it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StaticCollector(families))
    encoder, content_type = negotiate(accept)
    return encoder(registry), content_type


def wants_json(accept: str | None, fmt: str | None) -> bool:
    """JSON when asked by `?format=json` or when the Accept header prefers it."""
    if fmt is not None:
        return fmt == "json"
    if not accept:
        return False
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return first == "application/json"


def sanitize_accept(value: bytes) -> bytes | None:
    """Drop ``version=`` parameters that are not dotted numbers; None when nothing changed.

    prometheus_client's ``choose_encoder`` (used by every text route and /metrics)
    raises TypeError on ``Accept: application/openmetrics-text; version=abc`` (or
    ``text/plain; version=1.x``): it compares a tuple holding a str with (1, 0, 0).
    One request header must not make a 500, so such a parameter is removed here,
    before any route sees the header; the route then negotiates as if no version
    had been given.
    """
    if b"version" not in value.lower():
        return None
    changed = False
    ranges = []
    for media_range in value.split(b","):
        parts = media_range.split(b";")
        kept = [parts[0]]
        for param in parts[1:]:
            key, _, val = param.partition(b"=")
            if key.strip().lower() == b"version" and not _GOOD_VERSION.fullmatch(val.strip()):
                changed = True
                continue
            kept.append(param)
        ranges.append(b";".join(kept))
    return b",".join(ranges) if changed else None


def accepts_gzip(accept_encoding: str | None) -> bool:
    """True when Accept-Encoding lists gzip (or *) with a non-zero quality."""
    if not accept_encoding:
        return False
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False
