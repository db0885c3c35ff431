"""A minimal app serving only the vROps routes, for tests and benchmarks (uvicorn --factory)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI


def make_api() -> FastAPI:
    """The vROps router with the same lifespan wiring app.main uses; settings from the environment."""
    from app.api.vrops import router
    from app.vrops import wiring

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await wiring.startup(app)
        yield
        await wiring.shutdown(app)

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
