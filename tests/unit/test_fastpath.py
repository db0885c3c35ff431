"""The memo fast path: warm figure bodies answered before routing, byte for byte what
the routes answer, and never around security or the HTTP metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import respx
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security.settings import SecuritySettings
from app.settings import AppSettings
from tests.unit.test_gateway_routes import PROM, QUERY_URL, FakeProm

BASE = "/prometheus/metrics"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def make_client(**security: Any) -> TestClient:
    settings = AppSettings(gateway=GatewaySettings(prometheus_url=PROM, cache_ttl_seconds=60,
                                                   response_memo_seconds=5),
                           security=SecuritySettings(**security))
    return TestClient(create_app(settings))


@pytest.fixture()
def upstream() -> Iterator[respx.Route]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock.post(QUERY_URL).mock(side_effect=FakeProm())


def route_calls(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the figure service fail loudly: anything that reaches a route shows up here."""
    service = client.app.state.gateway  # type: ignore[attr-defined]
    calls: list[str] = []

    async def boom(*args: Any, **kw: Any) -> Any:
        calls.append("route")
        raise AssertionError("the route ran")

    def recall(key: tuple[str, ...], tenant: Any = None) -> None:
        calls.append("route")  # the routes look the memo up through the service

    for name in ("summary", "category", "everything"):
        monkeypatch.setattr(service, name, boom)
    monkeypatch.setattr(service, "recall", recall)
    return calls


@pytest.mark.parametrize(("path", "accept"), [
    ("summary", None),
    ("providers", None),
    ("providers", OPENMETRICS),
    ("providers", "application/json"),
    ("all", None),
])
def test_warm_answers_skip_the_routes_and_equal_them(upstream: respx.Route, monkeypatch: pytest.MonkeyPatch,
                                                     path: str, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    with make_client() as client:
        cold = client.get(f"{BASE}/{path}", headers=headers)
        assert cold.status_code == 200
        calls = route_calls(client, monkeypatch)
        warm = client.get(f"{BASE}/{path}", headers=headers)
        assert calls == []  # answered from the memo before routing
        assert warm.status_code == 200
        assert warm.content == cold.content
        assert warm.headers["content-type"] == cold.headers["content-type"]
        assert warm.headers["content-length"] == cold.headers["content-length"]


def test_requests_with_a_query_string_or_other_formats_go_to_the_routes(
        upstream: respx.Route, monkeypatch: pytest.MonkeyPatch) -> None:
    with make_client() as client:
        assert client.get(f"{BASE}/providers").status_code == 200
        calls = route_calls(client, monkeypatch)
        with pytest.raises(AssertionError):
            client.get(f"{BASE}/providers?format=json")
        with pytest.raises(AssertionError):  # another format than the memoized one
            client.get(f"{BASE}/providers", headers={"Accept": OPENMETRICS})
        # The query string: the route looks the memo up itself; the other format: the fast
        # path has just missed that key, so the route does not ask again.
        assert calls == ["route"] * 3
        assert client.head(f"{BASE}/summary").status_code in (200, 405)  # HEAD is never fast-pathed


def test_tokens_still_required_on_warm_answers(upstream: respx.Route) -> None:
    with make_client(api_tokens=["s3cret-token-0123456789"]) as client:
        auth = {"Authorization": "Bearer s3cret-token-0123456789"}
        assert client.get(f"{BASE}/summary", headers=auth).status_code == 200
        assert client.get(f"{BASE}/summary").status_code == 401
        assert client.get(f"{BASE}/summary", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.get(f"{BASE}/summary", headers=auth).status_code == 200


def test_warm_answers_are_counted_by_route_template(upstream: respx.Route) -> None:
    labels = {"method": "GET", "path": "/prometheus/metrics/summary", "status_code": "200"}

    def count() -> float:
        return sum(REGISTRY.get_sample_value("fastapi_requests_total", {**labels, "app_name": a}) or 0.0
                   for a in ("metrics-gateway", "gateway", "app"))

    with make_client() as client:
        before = count()
        for _ in range(5):
            assert client.get(f"{BASE}/summary").status_code == 200
        assert count() - before == 5


def test_degraded_answers_are_never_fast_pathed(monkeypatch: pytest.MonkeyPatch) -> None:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(QUERY_URL).respond(503, json={"status": "error", "errorType": "unavailable", "error": "down"})
        with make_client() as client:
            assert client.get(f"{BASE}/summary").json()["status"] != "ok"
            calls = route_calls(client, monkeypatch)
            with pytest.raises(AssertionError):
                client.get(f"{BASE}/summary")
            assert calls == ["route"]  # the summary itself: the memo was asked once, by the fast path


@pytest.mark.parametrize(("path", "query"), [("summary", ""), ("providers", ""), ("providers", "?format=json")])
def test_a_miss_asks_the_memo_once(upstream: respx.Route, monkeypatch: pytest.MonkeyPatch,
                                   path: str, query: str) -> None:
    with make_client() as client:
        memo = client.app.state.gateway.memo  # type: ignore[attr-defined]
        real = memo.get
        asked: list[tuple[str, ...]] = []

        def get(key: tuple[str, ...]) -> tuple[bytes, str] | None:
            asked.append(key)
            return real(key)

        monkeypatch.setattr(memo, "get", get)
        assert client.get(f"{BASE}/{path}{query}").status_code == 200
        assert len(asked) == 1, asked  # by the fast path, or (query string) by the route
        assert client.get(f"{BASE}/{path}{query}").status_code == 200
        assert len(asked) == 2  # and the warm one: one lookup, a hit


def test_a_cold_summary_is_answered_before_routing_as_its_route_answers_it(
        upstream: respx.Route, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.routing import Router

    routed: list[str] = []
    real = Router.__call__

    async def spy(self: Router, scope: Any, receive: Any, send: Any) -> None:
        routed.append(scope["path"])
        await real(self, scope, receive, send)

    settings = AppSettings(gateway=GatewaySettings(prometheus_url=PROM, cache_ttl_seconds=0,
                                                   response_memo_seconds=0))
    with TestClient(create_app(settings)) as client:
        monkeypatch.setattr(Router, "__call__", spy)
        fast = client.get(f"{BASE}/summary")
        assert routed == [] and upstream.call_count == 1  # cold, and answered by the fast path
        via_route = client.get(f"{BASE}/summary?via=route")  # a query string: the route answers
        assert routed == [f"{BASE}/summary"] and upstream.call_count == 2
    assert fast.status_code == via_route.status_code == 200
    assert fast.headers["content-type"] == via_route.headers["content-type"]
    a, b = fast.json(), via_route.json()
    for doc in (a, b):  # when each was rendered
        doc.pop("timestamp", None)
        doc.pop("generated_at", None)
    assert a == b
