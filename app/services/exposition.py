"""Prometheus text exposition for any list of metric families.

Every text route (gateway categories, vROps, ...) renders through here, so HELP,
TYPE, label escaping and content negotiation come from prometheus_client's own
encoders instead of hand-written string formatting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class _StaticCollector(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


Encoder = Callable[[CollectorRegistry], bytes]


def negotiate(accept: str | None) -> tuple[Encoder, str]:
    """prometheus_client's choose_encoder, minus its crash on odd Accept headers.

    `application/openmetrics-text; version=abc` makes choose_encoder raise; a
    client's malformed header must get the default format, never a 500.
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
