"""GET /metrics: negotiation, gzip, token protection, one route, off the event loop, promtool."""

from __future__ import annotations

import gzip
import shutil
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from prometheus_client.parser import text_string_to_metric_families

import app.monitoring.registry as registry_module
from app import instrumentation as domain
from app.gateway import metrics as gateway
from app.monitoring import install_monitoring
from app.monitoring.endpoint import token_matches
from tests.support.files import rotate
from tests.support.procs import promtool_check_metrics
from tests.support.tools import needs

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def make_app(token: str | None = None) -> FastAPI:
    async def require_api_key() -> None:
        raise HTTPException(status_code=403, detail="API key required")

    # Every API route needs an API key; /metrics must not.
    app = FastAPI(dependencies=[Depends(require_api_key)])

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    install_monitoring(app, metrics_token=token, app_name=f"ep-{uuid.uuid4().hex[:8]}")
    return app


async def test_text_format_by_default_and_no_api_auth() -> None:
    app = make_app()
    async with client(app) as c:
        assert (await c.get("/items/1")).status_code == 403  # API auth applies to the API
        r = await c.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert r.headers["cache-control"] == "no-store"
    assert "content-encoding" not in r.headers
    assert "# TYPE fastapi_requests_total counter" in r.text
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"fastapi_requests", "fastapi_requests_duration_seconds"} <= names


async def test_openmetrics_when_accept_asks() -> None:
    app = make_app()
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with client(app) as c:
        r = await c.get("/metrics", headers={"Accept": accept})
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")


async def test_gzip_when_accept_encoding_asks() -> None:
    app = make_app()
    async with client(app) as c:
        r = await c.get("/metrics", headers={"Accept-Encoding": "gzip"})
        plain = await c.get("/metrics", headers={"Accept-Encoding": "identity"})
        refused = await c.get("/metrics", headers={"Accept-Encoding": "gzip;q=0"})
    assert r.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in r.headers["vary"]
    # httpx decodes gzip transparently (raw bytes: test_gzip_raw_bytes).
    assert b"fastapi_requests_total" in r.content
    assert "content-encoding" not in plain.headers
    assert "content-encoding" not in refused.headers


async def test_gzip_raw_bytes() -> None:
    rendered = registry_module.render(None, "br, gzip")
    assert rendered.gzipped
    assert b"# TYPE" in gzip.decompress(rendered.body)
    assert not registry_module.render(None, None).gzipped


@pytest.mark.parametrize(
    ("header", "expected"),
    [("gzip", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False), ("*", True),
     ("identity", False), ("", False), ("gzip;q=abc", False), ("GZIP", True)],
)
def test_accepts_gzip(header: str, expected: bool) -> None:
    assert registry_module.accepts_gzip(header) is expected


async def test_token_protects_metrics() -> None:
    app = make_app(token="s3cret-token")
    async with client(app) as c:
        missing = await c.get("/metrics")
        wrong = await c.get("/metrics", headers={"Authorization": "Bearer nope"})
        basic = await c.get("/metrics", headers={"Authorization": "Basic czNjcmV0"})
        ok = await c.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        lower = await c.get("/metrics", headers={"Authorization": "bearer s3cret-token"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert missing.json()["error"] == "unauthorized"
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert wrong.headers["content-type"].startswith("application/json")
    assert basic.status_code == 401
    assert ok.status_code == 200 and b"fastapi_requests_total" in ok.content
    assert lower.status_code == 200


async def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_TOKEN", "from-env")
    app = make_app()
    async with client(app) as c:
        assert (await c.get("/metrics")).status_code == 401
        r = await c.get("/metrics", headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200


async def test_token_file_is_reread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    monkeypatch.delenv("METRICS_TOKEN", raising=False)
    monkeypatch.setenv("METRICS_TOKEN_FILE", str(token_file))
    app = make_app()
    first = {"Authorization": "Bearer first"}
    async with client(app) as c:
        assert (await c.get("/metrics", headers=first)).status_code == 200
        rotate(token_file, "second")  # rotation without restart
        assert (await c.get("/metrics", headers=first)).status_code == 401
        r = await c.get("/metrics", headers={"Authorization": "Bearer second"})
        assert r.status_code == 200


def test_token_matches() -> None:
    assert token_matches("abc", "Bearer abc")
    assert not token_matches("abc", "Bearer abd")
    assert not token_matches("abc", None)
    assert not token_matches("abc", "Bearer ")
    assert not token_matches("abc", "abc")


async def test_exactly_one_metrics_route_and_install_is_idempotent() -> None:
    app = make_app()
    install_monitoring(app)  # second call: no new route, no second middleware
    paths = [getattr(r, "path", None) for r in app.router.routes]
    assert paths.count("/metrics") == 1
    assert "/metrics" not in app.openapi()["paths"]
    from app.monitoring.http import PrometheusMiddleware

    classes: list[object] = [getattr(m, "cls", None) for m in app.user_middleware]
    assert classes.count(PrometheusMiddleware) == 1


def test_conflicting_metrics_route_is_refused() -> None:
    app = FastAPI()

    @app.get("/metrics")
    async def mine() -> str:
        return "x"

    with pytest.raises(RuntimeError):
        install_monitoring(app)


async def test_metrics_route_wins_over_catch_all_declared_first() -> None:
    app = FastAPI()

    @app.get("/{anything:path}")
    async def catch_all(anything: str) -> dict[str, str]:
        return {"caught": anything}

    install_monitoring(app)
    async with client(app) as c:
        r = await c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")


async def test_rendering_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_render = registry_module.render

    def spy(accept: str | None, accept_encoding: str | None) -> registry_module.Rendered:
        seen.append(threading.current_thread().name)
        return real_render(accept, accept_encoding)

    import app.monitoring.endpoint as endpoint_module

    monkeypatch.setattr(endpoint_module, "render", spy)
    app = make_app()
    loop_thread = threading.current_thread().name
    async with client(app) as c:
        assert (await c.get("/metrics")).status_code == 200
    assert seen and seen[0] != loop_thread


async def test_head_request_served() -> None:
    app = make_app()
    async with client(app) as c:
        r = await c.head("/metrics")
    assert r.status_code == 200


def populate_all_metrics() -> None:
    """One event of every kind, so every family in the body has samples."""
    domain.record_inference("openai", "gpt-4o", "success", 1.5, 100, 50, 0.25)
    domain.record_inference("openai", "gpt-4o", "error", 0.2)
    domain.set_provider_health("openai", 1.0, 0.02, 0.4)
    domain.record_db_query("users", "select", 0.003)
    domain.record_cache("models", True)
    domain.record_cache("models", False)
    domain.set_business(active_api_keys={"active": 5, "inactive": 1}, trials={"active": 2, "expired": 3})
    gateway.observe_upstream("overview", 0.05, None)
    gateway.observe_upstream("overview", 0.5, "timeout")
    gateway.cache_outcome("overview", "hit")
    gateway.set_breaker_state("closed")


KNOWN_CONTRACT_LINT = (
    'subscription_count non-histogram and non-summary metrics should not have "_count" suffix'
)


def assert_promtool_accepts(body: bytes) -> None:
    """promtool exits 0; or 3 (lint only) when the one known contract-name lint is all it says.

    ``subscription_count`` gets that lint only once a test in this process has set it.
    """
    result = promtool_check_metrics(body)
    out = (result.stdout + result.stderr).decode().strip().splitlines()
    if result.returncode == 3:
        assert out == [KNOWN_CONTRACT_LINT]
    else:
        assert result.returncode == 0, out


@pytest.mark.integration
@needs("promtool")
async def test_promtool_accepts_metrics_output() -> None:
    app = make_app()
    populate_all_metrics()
    async with client(app) as c:
        await c.get("/items/1")
        await c.get("/nowhere")
        r = await c.get("/metrics")
    assert b"model_inference_requests_total{" in r.content
    assert_promtool_accepts(r.content)


@pytest.mark.integration
@needs("promtool")
def test_promtool_only_lint_is_the_contract_name_subscription_count() -> None:
    """`subscription_count` is a gauge named by the backend contract; promtool's linter
    objects to a `_count` suffix on a gauge. It parses fine: the only complaint is that lint."""
    domain.set_business(subscriptions={("pro", "monthly"): 3})
    body = registry_module.render(None, None).body
    result = promtool_check_metrics(body)
    out = (result.stdout + result.stderr).decode().strip().splitlines()
    assert result.returncode == 3, out  # 3 = lint problems only; 1 would be a parse error
    assert out == [KNOWN_CONTRACT_LINT]
