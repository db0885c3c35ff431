"""The application: settings, routers and their lifespans, monitoring.

`uvicorn app.main:app` serves it; `create_app()` builds a fresh one (tests,
gunicorn factories). Another FastAPI app can serve the gateway routes itself
with `app.include_router(create_gateway_router())`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import health, status_page, vrops
from app.api.gateway import create_gateway_router
from app.config import Settings, get_settings
from app.monitoring import install_monitoring
from app.security import install_security
from app.vrops import wiring as vrops_wiring


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await vrops_wiring.startup(app)
        try:
            yield
        finally:
            await vrops_wiring.shutdown(app)

    app = FastAPI(title="Metrics gateway", version="0.1.0", lifespan=lifespan,
                  description="PromQL figures for widgets and Grafana: concurrent, cached, honest about failure.")
    install_security(app)
    install_monitoring(app)
    app.include_router(health.router)
    app.include_router(create_gateway_router(settings))
    app.include_router(vrops.router)
    app.include_router(status_page.router)
    return app


app = create_app()
