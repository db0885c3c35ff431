"""The application: settings, the gateway router and its lifespan, monitoring.

`uvicorn app.main:app` serves it; `create_app()` builds a fresh one (tests,
gunicorn factories).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app.api.gateway import create_gateway_router
from app.config import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(title="Metrics gateway", version="0.1.0",
                  description="PromQL figures for widgets and Grafana, concurrent, cached, honest.")
    app.include_router(create_gateway_router(settings))
    return app


app = create_app()
