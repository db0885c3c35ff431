"""The real application (app.main.create_app) exposes exactly one, working GET /metrics."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY

from app.main import create_app
from app.monitoring.http import UNMATCHED, resolve_template


def scope(path: str) -> dict[str, object]:
    return {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}


async def test_create_app_serves_metrics_once_and_counts_by_template() -> None:
    app = create_app()
    others = [r for r in app.router.routes if getattr(r, "name", None) != "prometheus_metrics"]
    assert len(others) == len(app.router.routes) - 1
    # No other route (including those of included routers) answers GET /metrics.
    assert resolve_template(others, scope("/metrics")) is None

    labels = {"app_name": "metrics-gateway", "method": "GET", "path": UNMATCHED,
              "status_code": "404"}
    before = REGISTRY.get_sample_value("fastapi_requests_total", labels) or 0.0
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/definitely/not/a/route")).status_code == 404
        r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE fastapi_requests_total counter" in r.text
    assert "# TYPE metrics_gateway_upstream_requests_total counter" in r.text
    after = REGISTRY.get_sample_value("fastapi_requests_total", labels) or 0.0
    assert after - before == 1
