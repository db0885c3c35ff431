"""Logging set-up: one format for the whole process, text or JSON lines.

httpx and httpcore log one INFO line per request; at the default level those
would drown the one-line-per-episode messages, so they are kept at WARNING.

Every line written inside a trace carries it: a filter on the process handler puts
``trace_id``/``span_id`` (hex, as Tempo shows them) on each record, whichever logger
wrote it (episode lines, the slow-query log, a library's warning), and the JSON
format writes them as fields, so Loki's derived field can link the line to Tempo.
Fields a record was given with ``extra=`` (CONTEXT_FIELDS) are written the same way.
"""

from __future__ import annotations

import json
import logging
import time

from app.common.tracing import current_ids

# Record attributes written as JSON fields when present (set by TraceContext, or given
# by a caller with ``extra=``).
CONTEXT_FIELDS = ("trace_id", "span_id")


class TraceContext(logging.Filter):
    """Puts the current trace's ``trace_id``/``span_id`` on every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = current_ids()
        if ids is not None and not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = ids
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc when present)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_gateway", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._gateway = True  # type: ignore[attr-defined]
        handler.addFilter(TraceContext())
        root.addHandler(handler)
    for h in root.handlers:
        if getattr(h, "_gateway", False):
            h.setFormatter(JsonFormatter() if fmt == "json" else
                           logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
