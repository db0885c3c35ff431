"""The small common core every feature may use: nothing here imports a feature.

- ``exposition``: content negotiation, Prometheus/OpenMetrics rendering, gzip, JSON-or-text.
- ``episodes``: one log line per failure episode.
- ``http_errors``: client errors in FastAPI's validation-error shape, JSON error bodies.
- ``secrets``: the one secret-file reader, bearer-token parsing and constant-time checks.
- ``redis``: the one Redis client factory.
"""
