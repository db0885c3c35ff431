"""A minimal app for the multiprocess test: FastAPI + install_monitoring + /ping.

Served by gunicorn with several uvicorn workers (tests/integration/test_multiprocess.py).
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from app.monitoring import install_monitoring

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


install_monitoring(app, app_name="mp-test")
