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


def test_gateway_metrics_do_not_list_the_backend_instrumentation_kit() -> None:
    """The gateway's own /metrics is about the gateway: the backend's kit
    (app.instrumentation: model_inference_*, provider_*, ...) is not imported by it.
    A fresh interpreter, so no other test's import of the kit can hide a regression."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from app.settings import AppSettings\n"
        "body = TestClient(create_app()).get('/metrics').text\n"
        "assert 'metrics_gateway_upstream_requests_total' in body, body[:200]\n"
        "print('app.instrumentation' in sys.modules, 'model_inference_requests_total' in body)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_importing_app_main_builds_no_app() -> None:
    """Factories, not import-time apps: importing app.main (or the Celery module) starts nothing."""
    import subprocess
    import sys

    code = (
        "import sys, app.main, app.workers.celery_app as c\n"
        "print(app.main._app is None, c._app is None)\n"
        "a = app.main.app\n"
        "print(a is app.main.app)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr
