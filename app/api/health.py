"""Liveness and readiness.

- ``GET /health``: liveness. Touches no dependency, so a slow Prometheus or Redis
  never gets a healthy process restarted (Railway's healthcheck uses this path).
- ``GET /ready``: readiness. Checks, concurrently and each under a short
  deadline, that the upstream Prometheus answers (``app.state.prometheus.ready()``)
  and that Redis answers a PING (the client the vROps wiring put on
  ``app.state`` if any, else a short-lived one from ``REDIS_URL``). 200 when
  every configured dependency is reachable, else 503; the body says which check
  failed and why. The whole answer is bounded by ``READY_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 1.5
"""Deadline for each readiness check; the checks run concurrently."""

_REDIS_STATE_ATTRS = ("redis", "redis_client", "vrops_redis")


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving. No dependency is contacted."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: Prometheus and Redis reachable; 503 with the reason otherwise."""
    budget = _timeout()
    prom, redis = await asyncio.gather(
        _check_prometheus(request.app.state, budget),
        _check_redis(request.app.state, budget),
    )
    checks = {"prometheus": prom, "redis": redis}
    ok = all(c["ok"] or not c["required"] for c in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503,
                        headers={"Cache-Control": "no-store"})


def _timeout() -> float:
    raw = os.environ.get("READY_TIMEOUT_SECONDS")
    try:
        value = float(raw) if raw else READY_TIMEOUT_SECONDS
    except ValueError:
        value = READY_TIMEOUT_SECONDS
    return min(max(value, 0.05), 5.0)


async def _timed(
    name: str, awaitable: Awaitable[tuple[bool, str]], budget: float, required: bool = True
) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        ok, detail = await asyncio.wait_for(awaitable, budget)
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


async def _check_prometheus(state: Any, budget: float) -> dict[str, Any]:
    client = getattr(state, "prometheus", None)
    if client is None or not hasattr(client, "ready"):
        return {"ok": False, "required": True, "latency_ms": 0.0,
                "detail": "prometheus client not initialised (app still starting?)"}
    return await _timed("prometheus", client.ready(), budget)


def _redis_url() -> str | None:
    url: Any = os.environ.get("REDIS_URL")
    if not url:
        try:
            from app.vrops.settings import get_vrops_settings

            url = getattr(get_vrops_settings(), "redis_url", None)
        except Exception:
            url = None
    if url is not None and hasattr(url, "get_secret_value"):
        url = url.get_secret_value()
    return str(url) if url else None


async def _ping_client(client: Any) -> tuple[bool, str]:
    pong = await client.ping()
    return bool(pong), "PONG" if pong else f"unexpected answer {pong!r}"


async def _ping_url(url: str, budget: float) -> tuple[bool, str]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=budget, socket_timeout=budget, retry_on_timeout=False
    )
    try:
        return await _ping_client(client)
    finally:
        await client.aclose()


async def _check_redis(state: Any, budget: float) -> dict[str, Any]:
    for attr in _REDIS_STATE_ATTRS:
        client = getattr(state, attr, None)
        if client is not None and hasattr(client, "ping"):
            return await _timed("redis", _ping_client(client), budget)
    url = _redis_url()
    if url is None:
        return {"ok": False, "required": False, "latency_ms": 0.0,
                "detail": "REDIS_URL not set; redis not checked"}
    return await _timed("redis", _ping_url(url, budget), budget)
