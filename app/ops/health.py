"""Liveness and readiness.

- ``GET /health``: liveness. Touches no dependency, so a slow Prometheus or Redis
  never gets a healthy process restarted (Railway's healthcheck uses this path).
- ``GET /ready``: readiness. Runs, concurrently and each under a short deadline
  (``READY_TIMEOUT_SECONDS``), every check the app's features registered
  (``app.common.readiness``: the gateway registers ``prometheus``, vROps
  registers ``redis``). 200 when every required check passes, else 503; the body
  says which check failed and why. This route knows no feature.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.common.readiness import Check, readiness_of


def create_health_router(ready_timeout_seconds: float = 1.5) -> APIRouter:
    router = APIRouter(tags=["health"])
    budget = min(max(ready_timeout_seconds, 0.05), 5.0)

    @router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process is up and serving. No dependency is contacted."""
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: every registered dependency check passes; 503 with the reason otherwise."""
        registry = readiness_of(request.app.state)
        names = list(registry.checks)
        results = await asyncio.gather(*(_timed(n, *registry.checks[n], budget) for n in names))
        checks = dict(zip(names, results, strict=True))
        ok = all(c["ok"] or not c["required"] for c in checks.values())
        body = {"status": "ready" if ok else "not_ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503,
                            headers={"Cache-Control": "no-store"})

    return router


async def _timed(name: str, check: Check, required: bool, budget: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        ok, detail = await asyncio.wait_for(check(), budget)
    except TimeoutError:
        ok, detail = False, f"{name} did not answer within {budget:g}s"
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
    return {
        "ok": bool(ok),
        "required": required,
        "detail": detail,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
