"""The reference for the serving-stack benchmark: a bare FastAPI route, nothing else.

Served by the same gunicorn configuration as the gateway (benchmarks/bench_fleet.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Response

app = FastAPI()


@app.get("/bare")
async def bare() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/bare_bytes")
async def bare_bytes() -> Response:
    """The cheapest a FastAPI route gets: prebuilt bytes, no serialization."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
