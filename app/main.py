"""The application factory: settings read once, features composed.

``uvicorn --factory app.main:create_app`` (or gunicorn ``app.main:create_app()``)
builds an app; ``uvicorn app.main:app`` still works: the module attribute ``app``
is built on first access, not at import. Another FastAPI app can serve the
figure routes itself with ``app.include_router(create_gateway_router())``.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.common import tracing
from app.gateway import create_gateway_router
from app.gateway.routes.fastpath import MemoFastPath
from app.gateway.settings import GatewaySettings
from app.monitoring import install_monitoring
from app.monitoring.http import RouteTemplates
from app.ops.health import create_health_router
from app.ops.logs import configure_logging
from app.ops.status_page import router as status_router
from app.security import install_security
from app.settings import AppSettings
from app.vrops.router import create_vrops_router


def create_app(settings: AppSettings | GatewaySettings | None = None) -> FastAPI:
    """A new app. `settings`: the whole root, or only the gateway's (the rest from the environment)."""
    if isinstance(settings, GatewaySettings):
        settings = AppSettings(gateway=settings)
    settings = settings or AppSettings()
    configure_logging(settings.ops.log_level, settings.ops.log_format)
    tracing.configure_from_env()  # off unless OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set

    # docs_url/redoc_url off: FastAPI's pages load Swagger UI / ReDoc from a CDN, without
    # integrity, on the origin where the status page keeps its token. /openapi.json stays
    # (load it into a viewer served from elsewhere). redirect_slashes off: Starlette builds
    # the redirect's Location from the Host header (/status/ -> http://evil.example/status).
    app = FastAPI(title="Metrics gateway", version="0.1.0",
                  description="PromQL figures for widgets and Grafana: concurrent, cached, honest about failure.",
                  docs_url=None, redoc_url=None, redirect_slashes=False, **tracing.fastapi_options())
    # Innermost first: the memo fast path must sit inside security and HTTP metrics
    # (add_middleware wraps what is there), so tokens and limits apply to it too.
    app.add_middleware(MemoFastPath)
    install_security(app, settings.security)
    install_monitoring(app, settings=settings.monitoring)
    # Outermost, so the request span covers security and HTTP metrics (whose latency
    # histogram takes the trace id as an exemplar). Nothing is added when tracing is off.
    tracing.install_tracing(app, RouteTemplates(app.router).span_details)
    app.include_router(create_health_router(settings.ops.ready_timeout_seconds))
    app.include_router(create_gateway_router(settings.gateway))
    app.include_router(create_vrops_router(settings.vrops))
    app.include_router(status_router)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """`app.main:app`, built from the environment on first access."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
