"""A minimal app serving only the vROps routes, for tests and benchmarks (uvicorn --factory)."""

from __future__ import annotations

from fastapi import FastAPI


def make_api() -> FastAPI:
    """The vROps router with its own lifespan, as app.main composes it; settings from the environment."""
    from app.vrops.router import create_vrops_router

    app = FastAPI()
    app.include_router(create_vrops_router())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
