"""GET /vrops/metrics and GET /vrops/jobs/metrics: vROps samples and job metrics from Redis.

Both read Redis only (the Celery workers do the collecting), in one or two
pipelined round trips bounded by short socket timeouts. If Redis is down, JSON
callers get a fast 503 and Prometheus gets `vrops_store_up 0` (HTTP 200 so the
scrape itself succeeds and the outage is alertable); the outage is logged once
per episode.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError

from app.common.episodes import FailureEpisode
from app.common.exposition import render_families, wants_json
from app.common.http_errors import invalid_query
from app.common.readiness import readiness_of
from app.vrops.exposition import json_payload, overdue_after, render_text, store_down_families
from app.vrops.jobs import job_families
from app.vrops.resources import VropsResources, open_resources, vrops_resources
from app.vrops.settings import VropsSettings
from app.vrops.store import VropsStore
from app.vrops.units import OBJECT_KINDS, STAT_SPECS, metric_by_name

router = APIRouter(tags=["vrops"])

MAX_VALUES = 50
MAX_VALUE_LENGTH = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
STORE_ERRORS = (RedisError, OSError, TimeoutError)

ListParam = Annotated[list[str] | None, Query()]


def _check_values(name: str, values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    if len(values) > MAX_VALUES:
        raise invalid_query(name, f"at most {MAX_VALUES} values for {name}")
    for v in values:
        if not v or len(v) > MAX_VALUE_LENGTH or _CONTROL.search(v):
            raise invalid_query(name, f"{name} values must be 1..{MAX_VALUE_LENGTH} printable characters")
    return list(dict.fromkeys(values))


def _store_down(episode: FailureEpisode, exc: BaseException,
                as_json: bool, accept: str | None) -> Response:
    episode.failure(f"{type(exc).__name__}: {exc}")
    if as_json:
        return JSONResponse({"status": "error", "store_up": False,
                             "error": "sample store (Redis) unavailable"}, status_code=503)
    body, ctype = render_families(store_down_families(), accept)
    return Response(body, media_type=ctype, headers={"Cache-Control": "no-store"})


@router.get("/vrops/metrics")
async def vrops_metrics(
    request: Request,
    res: Annotated[VropsResources, Depends(vrops_resources)],
    target: ListParam = None,
    cluster: ListParam = None,
    object: ListParam = None,
    kind: ListParam = None,
    metric: ListParam = None,
    format: Annotated[str | None, Query(pattern="^(json|text|prometheus)$")] = None,
) -> Response:
    """Latest vROps samples as Prometheus text (default) or JSON (?format=json / Accept)."""
    settings = res.settings
    known_targets = [t.name for t in settings.vrops_targets]
    targets = _check_values("target", target) or known_targets
    unknown = [t for t in targets if t not in known_targets]
    if unknown:
        raise invalid_query("target", f"unknown target(s): {', '.join(unknown)}")
    clusters = _check_values("cluster", cluster)
    objects = _check_values("object", object)
    kinds = _check_values("kind", kind)
    if kinds:
        bad = [k for k in kinds if k not in OBJECT_KINDS.values()]
        if bad:
            raise invalid_query("kind", f"kind must be one of {sorted(OBJECT_KINDS.values())}")
    metrics_in = _check_values("metric", metric)
    if metrics_in:
        specs = [metric_by_name(m) for m in metrics_in]
        if any(s is None for s in specs):
            raise invalid_query("metric", f"metric must be one of {sorted(s.metric for s in STAT_SPECS.values())}")
        metrics = [s.short for s in specs if s is not None]
    else:
        metrics = [s.short for s in STAT_SPECS.values()]

    accept = request.headers.get("accept")
    as_json = wants_json(accept, "json" if format == "json" else (
        "text" if format in ("text", "prometheus") else None))
    episode = res.episode
    store = VropsStore(res.redis)
    budget = settings.vrops_redis_timeout_seconds * 2
    try:
        async with asyncio.timeout(budget):
            snap = await store.read_latest(targets, clusters, metrics)
    except STORE_ERRORS as exc:
        return _store_down(episode, exc, as_json, accept)
    episode.success()
    now = time.time()
    stale_after = settings.vrops_stale_after_seconds
    # Frozen samples are flagged as soon as collections are overdue, not at the stale age.
    overdue = overdue_after(settings.vrops_stats_interval_seconds, settings.vrops_collection_timeout_seconds)
    if as_json:
        payload: dict[str, Any] = json_payload(snap, targets, now, stale_after, objects, kinds, overdue)
        return JSONResponse(payload, headers={"Cache-Control": "no-store"})
    body, ctype = render_text(snap, targets, now, stale_after, accept, objects, kinds, overdue)
    return Response(body, media_type=ctype, headers={"Cache-Control": "no-store"})


@router.get("/vrops/jobs/metrics")
async def vrops_job_metrics(request: Request,
                            res: Annotated[VropsResources, Depends(vrops_resources)]) -> Response:
    """Celery job metrics (written to Redis by every worker child) as Prometheus text."""
    settings = res.settings
    accept = request.headers.get("accept")
    episode = res.jobs_episode
    budget = settings.vrops_redis_timeout_seconds * 2
    try:
        async with asyncio.timeout(budget):
            families = await job_families(
                res.redis, res.broker_redis,
                settings.vrops_queues, window=settings.vrops_job_window_seconds,
                workers_max_age=3 * settings.vrops_worker_ping_interval_seconds + 5,
            )
    except STORE_ERRORS as exc:
        return _store_down(episode, exc, False, accept)
    episode.success()
    body, ctype = render_families(families, accept)
    return Response(body, media_type=ctype, headers={"Cache-Control": "no-store"})


def create_vrops_router(settings: VropsSettings | None = None) -> APIRouter:
    """The /vrops routes with a lifespan that opens (and closes) their Redis clients
    and registers the `redis` readiness check."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or VropsSettings()
        res = open_resources(s)
        app.state.vrops = res
        # Required only where Redis is configured on purpose (targets, or REDIS_URL given).
        required = bool(s.vrops_targets) or "redis_url" in s.model_fields_set
        readiness_of(app.state).register("redis", res.ping, required=required)
        try:
            yield
        finally:
            readiness_of(app.state).unregister("redis")
            await res.aclose()

    outer = APIRouter(lifespan=lifespan)
    outer.include_router(router)
    return outer
