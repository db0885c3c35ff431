"""The documented factory: a backend serves the gateway routes from its own FastAPI app."""

from __future__ import annotations

import httpx
import respx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.gateway.router import create_gateway_router
from app.gateway.settings import GatewaySettings

PROM = "http://prom.embedded:9090"


def test_router_included_in_another_app_brings_its_own_lifespan() -> None:
    backend = FastAPI()

    @backend.get("/v1/ping")
    async def ping() -> dict[str, bool]:
        return {"pong": True}

    backend.include_router(create_gateway_router(GatewaySettings(prometheus_url=PROM), prefix="/internal/figures"))
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(f"{PROM}/api/v1/query").respond(
            json={"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"gateway_query": str(i)}, "value": [1.7e9, "2"]} for i in range(40)]}})
        mock.route(host="testserver").pass_through()
        with TestClient(backend) as client:
            assert client.get("/v1/ping").json() == {"pong": True}
            body = client.get("/internal/figures/summary").json()
            assert body["status"] == "ok"
            assert body["metrics"]["business"]["active_api_keys"] == 2.0
            assert route.call_count == 1  # one batched upstream request for the whole summary
            assert client.get("/prometheus/metrics/summary").status_code == 404
            assert isinstance(backend.state.gateway.client.up, bool)
        # The lifespan closed the pooled client when the app stopped.
        assert backend.state.gateway._client is None


def test_two_apps_in_one_process_do_not_collide() -> None:
    apps = [FastAPI(), FastAPI()]
    for app in apps:
        app.include_router(create_gateway_router(GatewaySettings(prometheus_url="http://127.0.0.1:1")))
    for app in apps:
        with TestClient(app) as client:
            body = client.get("/prometheus/metrics/summary").json()
            assert body["status"] == "unavailable"
            assert httpx.codes.is_success(client.get("/prometheus/metrics/system").status_code)
