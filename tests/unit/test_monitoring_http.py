"""HTTP metrics middleware: route templates, collapsing, exclusions, every metric moves."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY
from starlette.responses import PlainTextResponse, StreamingResponse

from app.monitoring import install_monitoring
from app.monitoring.http import UNMATCHED, PrometheusMiddleware, resolve_template


def value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def build_app() -> tuple[FastAPI, str]:
    """A small app with templated, mounted and failing routes; unique app_name per test."""
    app_name = f"test-{uuid.uuid4().hex[:8]}"
    app = FastAPI()

    @app.get("/prometheus/metrics/{category}")
    async def category(category: str) -> dict[str, str]:
        return {"category": category}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/boom")
    async def boom() -> None:
        raise LookupError("kaput")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for chunk in (b"a", b"b"):
                yield chunk

        return StreamingResponse(body(), media_type="text/plain")

    router = APIRouter(prefix="/api/v1")

    @router.post("/batch/{name}")
    async def batch(name: str) -> dict[str, str]:
        return {"name": name}

    app.include_router(router)

    sub = FastAPI()

    @sub.get("/query/{q}")
    async def sub_query(q: str) -> dict[str, str]:
        return {"q": q}

    app.mount("/sub", sub)
    install_monitoring(app, app_name=app_name)
    return app, app_name


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def req_labels(app_name: str, path: str, status: str, method: str = "GET") -> dict[str, str]:
    return {"app_name": app_name, "method": method, "path": path, "status_code": status}


async def test_requests_counted_by_route_template_not_raw_path() -> None:
    app, name = build_app()
    tmpl = "/prometheus/metrics/{category}"
    async with client(app) as c:
        for cat in ("overview", "providers", "models"):
            assert (await c.get(f"/prometheus/metrics/{cat}")).status_code == 200
    assert value("fastapi_requests_total", req_labels(name, tmpl, "200")) == 3
    raw = req_labels(name, "/prometheus/metrics/overview", "200")
    assert value("fastapi_requests_total", raw) == 0
    hist = {"app_name": name, "method": "GET", "path": tmpl}
    assert value("fastapi_requests_duration_seconds_count", hist) == 3
    assert value("fastapi_requests_duration_seconds_sum", hist) > 0
    assert value("fastapi_requests_duration_seconds_bucket", {**hist, "le": "+Inf"}) == 3


async def test_template_keeps_convertor_and_router_prefix() -> None:
    app, name = build_app()
    async with client(app) as c:
        await c.get("/items/7")
        await c.post("/api/v1/batch/x")
    assert value("fastapi_requests_total", req_labels(name, "/items/{item_id}", "200")) == 1
    assert value(
        "fastapi_requests_total", req_labels(name, "/api/v1/batch/{name}", "200", "POST")
    ) == 1


async def test_mounted_app_uses_joined_template() -> None:
    app, name = build_app()
    async with client(app) as c:
        assert (await c.get("/sub/query/abc")).status_code == 200
        assert (await c.get("/sub/query/def")).status_code == 200
    assert value("fastapi_requests_total", req_labels(name, "/sub/query/{q}", "200")) == 2


async def test_unmatched_paths_collapse_to_one_value() -> None:
    app, name = build_app()
    async with client(app) as c:
        for i in range(5):
            assert (await c.get(f"/no/such/path/{i}")).status_code == 404
        assert (await c.get("/sub/nothing-here")).status_code == 404
    assert value("fastapi_requests_total", req_labels(name, UNMATCHED, "404")) == 6
    assert value("fastapi_requests_total", req_labels(name, "/no/such/path/0", "404")) == 0


async def test_method_mismatch_uses_route_template_with_405() -> None:
    app, name = build_app()
    async with client(app) as c:
        assert (await c.delete("/items/1")).status_code == 405
    assert value(
        "fastapi_requests_total", req_labels(name, "/items/{item_id}", "405", "DELETE")
    ) == 1


async def test_unknown_methods_collapse_to_other() -> None:
    app, name = build_app()
    async with client(app) as c:
        await c.request("FROBNICATE", "/items/1")
    assert value(
        "fastapi_requests_total", req_labels(name, "/items/{item_id}", "405", "OTHER")
    ) == 1


async def test_metrics_and_health_routes_not_counted() -> None:
    app, name = build_app()
    async with client(app) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200
        body = (await c.get("/metrics")).text
    for path in ("/metrics", "/health", "/ready"):
        assert value("fastapi_requests_total", req_labels(name, path, "200")) == 0
        assert f'app_name="{name}",method="GET",path="{path}"' not in body


async def test_unhandled_exception_counts_500_and_exception_type() -> None:
    app, name = build_app()
    before = value("fastapi_exceptions_total", {"app_name": name, "exception_type": "LookupError"})
    async with client(app) as c:
        assert (await c.get("/boom")).status_code == 500
    after = value("fastapi_exceptions_total", {"app_name": name, "exception_type": "LookupError"})
    assert after - before == 1
    assert value("fastapi_requests_total", req_labels(name, "/boom", "500")) == 1
    gauge = {"app_name": name, "method": "GET", "path": "/boom"}
    assert value("fastapi_requests_in_progress", gauge) == 0


async def test_streaming_response_counted_once() -> None:
    app, name = build_app()
    async with client(app) as c:
        r = await c.get("/stream")
    assert r.text == "ab"
    assert value("fastapi_requests_total", req_labels(name, "/stream", "200")) == 1


async def test_in_progress_gauge_rises_during_request_and_falls_after() -> None:
    app_name = f"test-{uuid.uuid4().hex[:8]}"
    app = FastAPI()
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.get("/slow/{n}")
    async def slow(n: int) -> dict[str, int]:
        entered.set()
        await release.wait()
        return {"n": n}

    install_monitoring(app, app_name=app_name)
    gauge = {"app_name": app_name, "method": "GET", "path": "/slow/{n}"}
    async with client(app) as c:
        task = asyncio.create_task(c.get("/slow/1"))
        await asyncio.wait_for(entered.wait(), 5)
        assert value("fastapi_requests_in_progress", gauge) == 1
        release.set()
        assert (await asyncio.wait_for(task, 5)).status_code == 200
    assert value("fastapi_requests_in_progress", gauge) == 0


async def test_template_cache_is_bounded() -> None:
    app, _ = build_app()
    async with client(app) as c:
        await c.get("/items/1")  # builds the middleware stack
    middleware = app.middleware_stack
    while middleware is not None and not isinstance(middleware, PrometheusMiddleware):
        middleware = getattr(middleware, "app", None)
    assert isinstance(middleware, PrometheusMiddleware)
    async with client(app) as c:
        for i in range(300):
            await c.get(f"/random/{i}")
    assert len(middleware.templates._cache) <= middleware.templates._cache.maxsize


def test_resolve_template_directly() -> None:
    app, _ = build_app()
    scope = {"type": "http", "method": "GET", "path": "/sub/query/z", "root_path": ""}
    assert resolve_template(app.router.routes, scope) == "/sub/query/{q}"
    scope = {"type": "http", "method": "GET", "path": "/nowhere", "root_path": ""}
    assert resolve_template(app.router.routes, scope) is None


async def test_two_apps_in_one_process_do_not_collide() -> None:
    app1, name1 = build_app()
    app2, name2 = build_app()
    async with client(app1) as c1, client(app2) as c2:
        await c1.get("/items/1")
        await c2.get("/items/1")
        await c2.get("/items/2")
    assert value("fastapi_requests_total", req_labels(name1, "/items/{item_id}", "200")) == 1
    assert value("fastapi_requests_total", req_labels(name2, "/items/{item_id}", "200")) == 2


async def test_root_path_is_stripped_before_matching() -> None:
    app_name = f"test-{uuid.uuid4().hex[:8]}"
    app = FastAPI()

    @app.get("/things/{x}")
    async def things(x: str) -> PlainTextResponse:
        return PlainTextResponse(x)

    install_monitoring(app, app_name=app_name)
    transport = httpx.ASGITransport(app=app, root_path="/gw")  # as behind a proxy prefix
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/gw/things/1")).status_code == 200
        assert (await c.get("/gw/metrics")).status_code == 200
    assert value("fastapi_requests_total", req_labels(app_name, "/things/{x}", "200")) == 1
    assert value("fastapi_requests_total", req_labels(app_name, UNMATCHED, "200")) == 0


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
async def test_custom_exclusions_still_exclude_metrics(path: str) -> None:
    app_name = f"test-{uuid.uuid4().hex[:8]}"
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {}

    install_monitoring(app, app_name=app_name, excluded_paths={"/ready"})
    async with client(app) as c:
        await c.get(path)
    counted = value("fastapi_requests_total", req_labels(app_name, path, "200"))
    assert counted == (1 if path == "/health" else 0)


async def test_nested_included_routers_and_405_inside_them() -> None:
    app_name = f"test-{uuid.uuid4().hex[:8]}"
    app = FastAPI()
    outer = APIRouter(prefix="/outer")
    inner = APIRouter(prefix="/inner")

    @inner.get("/leaf/{x}")
    async def leaf(x: str) -> dict[str, str]:
        return {"x": x}

    outer.include_router(inner)
    app.include_router(outer)
    install_monitoring(app, app_name=app_name)
    async with client(app) as c:
        assert (await c.get("/outer/inner/leaf/1")).status_code == 200
        assert (await c.post("/outer/inner/leaf/2")).status_code == 405
    tmpl = "/outer/inner/leaf/{x}"
    assert value("fastapi_requests_total", req_labels(app_name, tmpl, "200")) == 1
    assert value("fastapi_requests_total", req_labels(app_name, tmpl, "405", "POST")) == 1
