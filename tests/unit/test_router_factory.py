"""The documented factory: a backend serves the gateway routes from its own FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import respx
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from app.gateway.routes.figures import create_gateway_router
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


# --- embedding without a lifespan, or next to the host app's own -------------------------------------

def vector_answer(request: httpx.Request) -> httpx.Response:
    """Every batched part answers 3 (one series per `gateway_query` index in the request)."""
    query = dict(httpx.QueryParams(request.content.decode()))["query"]
    parts = query.count('"gateway_query", "') or 1
    result = [{"metric": {"gateway_query": str(i)} if parts > 1 else {}, "value": [1.7e9, "3"]}
              for i in range(parts)]
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})


def embedded(app: FastAPI | None = None) -> FastAPI:
    app = app or FastAPI()
    app.include_router(create_gateway_router(GatewaySettings(prometheus_url=PROM, cache_ttl_seconds=0,
                                                             response_memo_seconds=0)))
    return app


def test_router_works_without_a_lifespan() -> None:
    """`TestClient(app)` without `with` runs no lifespan; each request runs in an event loop of
    its own, so the service must start lazily and never reuse a client from a dead loop."""
    app = embedded()
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(f"{PROM}/api/v1/query").mock(side_effect=vector_answer)
        mock.route(host="testserver").pass_through()
        client = TestClient(app)  # no `with`: no lifespan
        first = client.get("/prometheus/metrics/summary")
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "ok"
        assert first.json()["metrics"]["business"]["active_trials"] == 3.0
        for path in ("/prometheus/metrics/system", "/prometheus/metrics/providers?format=json",
                     "/prometheus/metrics/summary", "/prometheus/metrics/docs"):
            resp = client.get(path)  # a new event loop each time
            assert resp.status_code == 200, (path, resp.text)
        assert "gateway_upstream_up 1.0" in client.get("/prometheus/metrics/all").text
        assert route.call_count >= 5


def test_create_app_without_a_lifespan() -> None:
    from app.main import create_app

    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{PROM}/api/v1/query").mock(side_effect=vector_answer)
        mock.route(host="testserver").pass_through()
        client = TestClient(create_app(GatewaySettings(prometheus_url=PROM)))
        assert client.get("/prometheus/metrics/summary").json()["status"] == "ok"
        assert client.get("/prometheus/metrics/business?format=json").json()["status"] == "ok"


def test_router_in_an_app_with_its_own_lifespan() -> None:
    """Both lifespans run: the host's (its state reaches its routes) and the router's."""
    events: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        events.append("host up")
        yield {"db": "host-db"}
        events.append("host down")

    host = FastAPI(lifespan=own)

    @host.get("/v1/db")
    async def db(request: Request) -> dict[str, str]:
        return {"db": request.state.db}

    embedded(host)
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{PROM}/api/v1/query").mock(side_effect=vector_answer)
        mock.route(host="testserver").pass_through()
        with TestClient(host) as client:
            assert events == ["host up"]
            assert host.state.gateway.started  # the router's lifespan ran as well
            assert client.get("/v1/db").json() == {"db": "host-db"}
            assert client.get("/prometheus/metrics/summary").json()["status"] == "ok"
        assert events == ["host up", "host down"]
        assert host.state.gateway._client is None  # the router's lifespan closed its client


def test_without_a_lifespan_each_event_loop_gets_its_own_client() -> None:
    """Against a real keep-alive HTTP server: a pooled connection opened in one request's event
    loop must not be reused from the next request's loop (that loop's sockets are gone)."""
    from tests.faults.fake_upstream import FakePrometheus

    fake = FakePrometheus().start()
    try:
        app = FastAPI()
        app.include_router(create_gateway_router(GatewaySettings(
            prometheus_url=fake.url, cache_ttl_seconds=0, response_memo_seconds=0, request_deadline_seconds=2)))
        client = TestClient(app)  # no `with`
        for _ in range(3):
            body = client.get("/prometheus/metrics/summary").json()
            assert body["status"] == "ok", body["errors"]
            assert body["upstream"]["up"] is True
        assert fake.requests >= 3
    finally:
        fake.stop()
