"""The service's own monitoring: GET /metrics and HTTP metrics by route template.

Public surface::

    from app.monitoring import install_monitoring
    install_monitoring(app, metrics_token=settings_token_or_None)

It adds exactly one route, ``GET /metrics`` (a plain Starlette route placed
first, outside any FastAPI dependency, so API auth does not apply to it), and
the HTTP metrics middleware. It is idempotent per app. Under gunicorn with
several workers, set ``PROMETHEUS_MULTIPROC_DIR`` (see ``gunicorn.conf.py``) and
every scrape serves the merge of all workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI
from prometheus_client import disable_created_metrics
from starlette.routing import Route

from app.monitoring.endpoint import METRICS_PATH, TokenProvider, make_metrics_endpoint
from app.monitoring.http import DEFAULT_EXCLUDED_PATHS, PrometheusMiddleware
from app.monitoring.registry import multiprocess_dir, multiprocess_values_active
from app.monitoring.settings import MonitoringSettings

__all__ = ["MonitoringSettings", "install_monitoring"]

log = logging.getLogger(__name__)
_ROUTE_NAME = "prometheus_metrics"


def install_monitoring(
    app: FastAPI,
    metrics_token: str | None = None,
    *,
    app_name: str | None = None,
    excluded_paths: Iterable[str] | None = None,
    settings: MonitoringSettings | None = None,
) -> None:
    """Add GET /metrics and the HTTP metrics middleware to ``app``.

    ``metrics_token``: bearer token required on /metrics; when None, the
    ``METRICS_TOKEN`` / ``METRICS_TOKEN_FILE`` environment variables decide
    (neither set: /metrics is open). ``app_name``: the ``app_name`` label
    (default ``METRICS_APP_NAME`` or "metrics-gateway"). ``excluded_paths``:
    paths not counted (default /metrics, /health, /ready).
    """
    if getattr(app.state, "monitoring_installed", False):
        return
    for route in app.router.routes:
        if getattr(route, "path", None) == METRICS_PATH:
            raise RuntimeError(f"{METRICS_PATH} is already routed; install_monitoring owns it")

    settings = settings or MonitoringSettings()
    token_provider: TokenProvider
    if metrics_token:
        fixed = metrics_token

        def token_provider() -> str | None:
            return fixed
    else:
        token_provider = settings.token_provider()

    # First in the list so no catch-all route declared earlier can shadow it.
    app.router.routes.insert(
        0,
        Route(
            METRICS_PATH,
            make_metrics_endpoint(token_provider),
            methods=["GET"],
            name=_ROUTE_NAME,
            include_in_schema=False,
        ),
    )
    excluded = set(DEFAULT_EXCLUDED_PATHS if excluded_paths is None else excluded_paths)
    excluded.add(METRICS_PATH)
    app.add_middleware(
        PrometheusMiddleware,
        router=app.router,
        app_name=app_name or settings.metrics_app_name,
        excluded_paths=excluded,
    )
    app.state.monitoring_installed = True
    # No `*_created` series: Prometheus 2.x text scrapes store them as extra gauges
    # (a third more series), multiprocess mode never has them, and they cost ~15%
    # of render time. Process-wide, like prometheus_client's own env switch.
    disable_created_metrics()  # type: ignore[no-untyped-call]

    if multiprocess_dir() is not None and not multiprocess_values_active():
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported first; "
            "set it in the environment before the process starts"
        )
