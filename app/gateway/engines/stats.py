"""What one query API request cost: the ``Server-Timing`` header and the slow-query log line.

``Server-Timing: queue;dur=…, upstream;dur=…, assembly;dur=…, total;dur=…`` (milliseconds):
time waiting for its turn (both lanes), upstream requests (slot held, answer decoded),
everything else the gateway did (cache, assembly, checks). Browsers' devtools and Grafana's
query inspector show it. A request slower than ``SLOW_QUERY_SECONDS`` logs one JSON line
(logger ``gateway.slow_query``) with the client's label, the query, its range and step,
durations, series, bytes and cache state; never a token or a tenant's headers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from app.common import tracing
from app.gateway.engines.limits import series_in
from app.gateway.engines.scheduler import Ticket

log = logging.getLogger("gateway.slow_query")


@dataclass(slots=True)
class QueryNote:
    """The request as the HTTP edge saw it, for the log line (the rest is in the ticket's Stats)."""

    path: str
    query: str = ""
    cache: str = ""
    status: int = 200


def server_timing(ticket: Ticket, total: float) -> str:
    s = ticket.stats
    assembly = max(0.0, total - s.queue_seconds - s.upstream_seconds)
    parts = (("queue", s.queue_seconds), ("upstream", s.upstream_seconds), ("assembly", assembly),
             ("total", total))
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in parts)


def log_if_slow(ticket: Ticket, note: QueryNote, total: float, threshold: float) -> bool:
    """One JSON line for a request slower than `threshold` seconds (0: every request)."""
    if total < threshold:
        return False
    s = ticket.stats
    line = {
        "event": "slow_query", "client": ticket.label, "path": note.path, "query": note.query,
        "start": s.start, "end": s.end, "step": s.step, "time": s.time,
        "range_seconds": None if s.start is None or s.end is None else s.end - s.start,
        "duration_seconds": round(total, 4), "queue_seconds": round(s.queue_seconds, 4),
        "upstream_seconds": round(s.upstream_seconds, 4), "heavy_seconds": round(s.heavy_seconds, 4),
        "upstream_queries": s.upstream_queries, "bytes": s.bytes,
        "series": s.series if s.series is not None or s.answer is None else series_in(s.answer),
        "cache": note.cache, "status": note.status,
    }
    ids = tracing.current_ids()  # in the line itself too, whatever LOG_FORMAT says
    if ids is not None:
        line["trace_id"], line["span_id"] = ids
    log.warning(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
    return True
