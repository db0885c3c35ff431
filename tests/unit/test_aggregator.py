"""The aggregator against respx: batching, caching, coalescing, fallback, deadlines, stale values."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from app.gateway.caching.figures import QueryCache
from app.gateway.catalog.loader import build_catalog
from app.gateway.catalog.model import Catalog, CatalogQuery
from app.gateway.engines.figures import Engine
from app.gateway.result import State
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.client import PrometheusClient

PROM = "http://prom.test:9090"
QUERY_URL = f"{PROM}/api/v1/query"

CATALOG: Catalog = build_catalog({"queries": [
    {"id": "a", "expr": "sum(metric_a)", "help": "A.", "unit": "u"},
    {"id": "b", "expr": "sum(rate(metric_b[5m]))", "help": "B.", "unit": "u"},
    {"id": "c", "expr": "max by (provider) (metric_c)", "help": "C.", "unit": "u", "labels": ["provider"]},
    {"id": "bad", "expr": "sum(metric_bad)", "help": "Bad.", "unit": "u"},
    {"id": "s", "expr": "scalar(sum(metric_s))", "help": "S.", "unit": "u"},
    {"id": "d", "expr": "sum(metric_d)", "help": "D.", "unit": "u"},
    {"id": "e", "expr": "sum(metric_e)", "help": "E.", "unit": "u"},
]}, "test")
Q = CATALOG.queries
ABC = [Q["a"], Q["b"], Q["c"]]

# What "Prometheus" holds for each catalog expression.
DATA: dict[str, list[tuple[dict[str, str], str]]] = {
    "sum(metric_a)": [({}, "10")],
    "sum(rate(metric_b[5m]))": [({}, "2.5")],
    "max by (provider) (metric_c)": [({"provider": "openai"}, "1"), ({"provider": "anthropic"}, "0.5")],
    "sum(metric_bad)": [({}, "99")],
    "sum(metric_d)": [({}, "4")],
    "sum(metric_e)": [({}, "5")],
}


def batch_expr(queries: list[CatalogQuery]) -> str:
    return " or ".join(f'label_replace({q.expr}, "gateway_query", "{i}", "", "")' for i, q in enumerate(queries))


def sent(call: Any) -> dict[str, str]:
    return dict(httpx.QueryParams(call.request.content.decode()))


def vector(series: list[tuple[dict[str, str], str]], **extra: Any) -> dict[str, Any]:
    return {"status": "success", **extra, "data": {"resultType": "vector", "result": [
        {"metric": m, "value": [1.7e9, v]} for m, v in series]}}


def fake_prometheus(request: httpx.Request, *, bad: frozenset[str] = frozenset()) -> httpx.Response:
    """Evaluates single catalog exprs and their label_replace or-joins from DATA."""
    expr = dict(httpx.QueryParams(request.content.decode()))["query"]
    parts = expr.split(" or label_replace(") if expr.startswith("label_replace(") else [expr]
    series: list[tuple[dict[str, str], str]] = []
    for i, part in enumerate(parts):
        if expr.startswith("label_replace("):
            inner = part.removeprefix("label_replace(").rsplit(', "gateway_query"', 1)[0]
            idx = part.rsplit('"gateway_query", "', 1)[1].split('"', 1)[0]
            assert int(idx) == i
        else:
            inner, idx = part, None
        if inner in bad:
            return httpx.Response(400, json={"status": "error", "errorType": "bad_data",
                                             "error": f"bad query {inner}"})
        for labels, value in DATA[inner]:
            series.append(({**labels, "gateway_query": idx} if idx is not None else labels, value))
    return httpx.Response(200, json=vector(series))


def settings(**kw: Any) -> GatewaySettings:
    kw.setdefault("prometheus_url", PROM)
    return GatewaySettings(**kw)


@pytest.fixture()
async def make() -> AsyncIterator[Any]:
    made: list[tuple[Engine, PrometheusClient]] = []

    def factory(**kw: Any) -> Engine:
        s = settings(**kw)
        client = PrometheusClient(s)
        agg = Engine(s, client, QueryCache(s.cache_max_entries, s.stale_max_age_seconds))
        made.append((agg, client))
        return agg

    yield factory
    for agg, client in made:
        await agg.aclose()
        await client.aclose()


async def settle() -> None:
    """Let a finished fetch task run its clean-up (see test_back_to_back_uncached_requests)."""
    await asyncio.sleep(0.01)


def values(result: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {s.labels: s.value for s in result.samples}


@respx.mock
async def test_cold_batch_is_one_upstream_request_split_by_label(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make()
    before = time.time()
    results = await agg.run(ABC, "test")
    assert route.call_count == 1
    fields = sent(route.calls[0])
    assert fields["query"] == batch_expr(ABC)
    assert fields["query"] == ('label_replace(sum(metric_a), "gateway_query", "0", "", "") or '
                               'label_replace(sum(rate(metric_b[5m])), "gateway_query", "1", "", "") or '
                               'label_replace(max by (provider) (metric_c), "gateway_query", "2", "", "")')
    assert int(fields["timeout"].removesuffix("ms")) < 3000
    assert [r.query.id for r in results] == ["a", "b", "c"]
    assert all(r.state is State.FRESH for r in results)
    assert values(results[0]) == {(): 10.0}
    assert values(results[1]) == {(): 2.5}
    assert values(results[2]) == {(("provider", "openai"),): 1.0, (("provider", "anthropic"),): 0.5}
    for r in results:
        assert r.error is None
        assert r.fetched_at is not None and before <= r.fetched_at <= time.time()
        assert r.age_seconds is not None and r.age_seconds < 0.5


@respx.mock
async def test_second_call_within_ttl_is_served_from_cache(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=30)
    first = await agg.run(ABC, "test")
    await asyncio.sleep(0.05)
    second = await agg.run(ABC, "test")
    assert route.call_count == 1
    for f, s in zip(first, second, strict=True):
        assert s.state is State.CACHED
        assert s.samples == f.samples
        assert s.fetched_at == f.fetched_at
        assert s.age_seconds is not None and 0.05 <= s.age_seconds < 1.0


@respx.mock
async def test_ttl_expiry_fetches_again(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=0.05)
    await agg.run(ABC, "test")
    await asyncio.sleep(0.1)
    results = await agg.run(ABC, "test")
    assert route.call_count == 2
    assert all(r.state is State.FRESH for r in results)


@respx.mock
async def test_only_missing_queries_are_fetched(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make()
    await agg.run([Q["a"]], "test")
    results = await agg.run(ABC, "test")
    assert route.call_count == 2
    assert sent(route.calls[1])["query"] == batch_expr([Q["b"], Q["c"]])
    assert [r.state for r in results] == [State.CACHED, State.FRESH, State.FRESH]
    assert values(results[2])[(("provider", "openai"),)] == 1.0


@respx.mock
async def test_concurrent_identical_requests_share_one_fetch(make: Any) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.1)
        return fake_prometheus(request)

    route = respx.post(QUERY_URL).mock(side_effect=slow)
    agg = make()
    all_results = await asyncio.gather(*(agg.run(ABC, "test") for _ in range(20)))
    assert route.call_count == 1
    for results in all_results:
        assert [r.state for r in results] == [State.FRESH] * 3
        assert values(results[0]) == {(): 10.0}
        assert len(results[2].samples) == 2


@respx.mock
async def test_bad_query_in_a_batch_falls_back_to_single_queries(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=lambda r: fake_prometheus(r, bad=frozenset({"sum(metric_bad)"})))
    agg = make()
    queries = [Q["a"], Q["bad"], Q["c"]]
    results = await agg.run(queries, "test")
    exprs = [sent(c)["query"] for c in route.calls]
    assert exprs[0] == batch_expr(queries)
    assert sorted(exprs[1:]) == sorted(q.expr for q in queries)
    assert route.call_count == 4
    a, bad, c = results
    assert a.state is State.FRESH and values(a) == {(): 10.0}
    assert c.state is State.FRESH and len(c.samples) == 2
    assert bad.state is State.FAILED and bad.samples == ()
    assert bad.error is not None and bad.error.error_type == "bad_data"
    assert "metric_bad" in bad.error.message


@respx.mock
async def test_hanging_upstream_fails_every_figure_within_the_deadline(make: Any) -> None:
    started: list[httpx.Request] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        started.append(request)
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    respx.post(QUERY_URL).mock(side_effect=hang)
    agg = make(request_deadline_seconds=0.3)
    t = time.perf_counter()
    both = await asyncio.gather(agg.run(ABC, "test"), agg.run(ABC, "test"))
    assert time.perf_counter() - t < 0.3 + 0.5
    for results in both:
        for r in results:
            assert r.state is State.FAILED
            assert r.error is not None and r.error.error_type == "timeout"
    assert len(started) == 1  # concurrent requests wait on one fetch (respx counts calls only once answered)
    assert int(dict(httpx.QueryParams(started[0].content.decode()))["timeout"].removesuffix("ms")) < 300
    # A later request is bounded by its own deadline too, whatever became of the first fetch.
    t = time.perf_counter()
    again = await agg.run(ABC, "test")
    assert time.perf_counter() - t < 0.3 + 0.5
    assert all(r.state is State.FAILED and r.error is not None for r in again)


@respx.mock
async def test_failure_after_success_serves_the_last_good_value_as_stale(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=0, breaker_failure_threshold=100)
    good = await agg.run(ABC, "test")
    await asyncio.sleep(0.05)
    route.mock(return_value=httpx.Response(500, html="<html>down</html>"))
    results = await agg.run(ABC, "test")
    assert route.call_count == 2
    for g, r in zip(good, results, strict=True):
        assert r.state is State.STALE
        assert r.samples == g.samples
        assert r.fetched_at == g.fetched_at
        assert r.age_seconds is not None and r.age_seconds >= 0.05
        assert r.error is not None and r.error.error_type == "bad_response"


@respx.mock
async def test_stale_values_expire(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=0, stale_max_age_seconds=0.05)
    await agg.run([Q["a"]], "test")
    await asyncio.sleep(0.1)
    route.mock(side_effect=httpx.ConnectError("refused"))
    (r,) = await agg.run([Q["a"]], "test")
    assert r.state is State.FAILED and r.samples == ()
    assert r.error is not None and r.error.error_type == "unreachable"


@respx.mock
async def test_answer_with_warnings_is_reused_briefly_but_never_kept_as_last_good(make: Any) -> None:
    route = respx.post(QUERY_URL).respond(json=vector([({}, "3")], warnings=["partial response"]))
    agg = make(cache_ttl_seconds=60, warning_ttl_seconds=0.3)
    (first,) = await agg.run([Q["a"]], "test")
    await settle()
    (second,) = await agg.run([Q["a"]], "test")
    assert route.call_count == 1  # reused for WARNING_TTL_SECONDS (on its grid), not 60 s
    assert first.state is State.FRESH and second.state is State.CACHED
    for r in (first, second):
        assert r.warnings == ("partial response",)
        assert values(r) == {(): 3.0}
    # Not remembered as a last good value: once its short TTL is over, a failure is a failure.
    route.respond(500, text="down")
    await asyncio.sleep(0.65)  # past the 0.3 s grid step (at most two steps)
    (third,) = await agg.run([Q["a"]], "test")
    assert route.call_count == 2
    assert third.state is State.FAILED


@respx.mock
async def test_declared_labels_only_and_coinciding_series_summed(make: Any) -> None:
    respx.post(QUERY_URL).respond(json=vector([
        ({"provider": "openai", "job": "backend", "instance": "10.0.0.1:8000"}, "1"),
        ({"provider": "openai", "job": "backend", "instance": "10.0.0.2:8000"}, "2"),
        ({"provider": "anthropic", "job": "backend", "instance": "10.0.0.1:8000"}, "0.25"),
        ({"job": "other"}, "7"),
    ]))
    agg = make()
    (r,) = await agg.run([Q["c"]], "test")
    assert values(r) == {
        (("provider", "openai"),): 3.0,
        (("provider", "anthropic"),): 0.25,
        (("provider", ""),): 7.0,
    }
    (total,) = await agg.run([Q["a"]], "test")  # a query with no labels: one series, the sum
    assert values(total) == {(): 10.25}
    assert r.total() == 10.25


@respx.mock
async def test_non_finite_values_survive(make: Any) -> None:
    respx.post(QUERY_URL).respond(json=vector([({}, "NaN")]))
    agg = make()
    (r,) = await agg.run([Q["a"]], "test")
    assert r.state is State.FRESH and math.isnan(r.samples[0].value)


@respx.mock
async def test_scalar_queries_go_alone_and_batches_are_capped(make: Any) -> None:
    DATA["scalar(sum(metric_s))"] = [({}, "5")]
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    try:
        agg = make(batch_max_queries=2)
        queries = [Q["a"], Q["s"], Q["b"], Q["c"], Q["d"], Q["e"]]
        results = await agg.run(queries, "test")
    finally:
        del DATA["scalar(sum(metric_s))"]
    exprs = sorted(sent(c)["query"] for c in route.calls)
    assert exprs == sorted([batch_expr([Q["a"], Q["b"]]), batch_expr([Q["c"], Q["d"]]), Q["e"].expr,
                            "scalar(sum(metric_s))"])
    assert [r.state for r in results] == [State.FRESH] * 6
    assert [r.total() for r in results] == [10.0, 5.0, 2.5, 1.5, 4.0, 5.0]


@respx.mock
async def test_filters_are_applied_and_cached_separately(make: Any) -> None:
    route = respx.post(QUERY_URL).respond(json=vector([({"provider": "openai"}, "1")]))
    agg = make()
    await agg.run([Q["c"]], "test", {"provider": ["openai"]})
    await agg.run([Q["c"]], "test", {"provider": ["openai"]})
    await agg.run([Q["c"]], "test")
    await agg.run([Q["c"]], "test", {"provider": ["openai", "mistral"]})
    assert route.call_count == 3
    assert [sent(c)["query"] for c in route.calls] == [
        'max by (provider) (metric_c{provider="openai"})',
        "max by (provider) (metric_c)",
        'max by (provider) (metric_c{provider=~"openai|mistral"})',
    ]


@respx.mock
async def test_missing_or_unknown_batch_labels_give_no_data(make: Any) -> None:
    respx.post(QUERY_URL).respond(json=vector([
        ({"gateway_query": "0"}, "1"),
        ({"gateway_query": "9"}, "5"),
        ({}, "6"),
        ({"gateway_query": "x"}, "7"),
    ]))
    agg = make()
    a, b = await agg.run([Q["a"], Q["b"]], "test")
    assert values(a) == {(): 1.0}
    assert b.state is State.FRESH and b.samples == () and b.total() is None


@respx.mock
async def test_open_circuit_fails_fast_and_serves_stale(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=0, breaker_failure_threshold=1, breaker_reset_seconds=60)
    await agg.run([Q["a"]], "test")
    await settle()
    route.mock(side_effect=httpx.ConnectError("refused"))
    (first,) = await agg.run([Q["a"]], "test")
    await settle()
    assert first.state is State.STALE and first.error is not None
    assert first.error.error_type == "unreachable"
    calls = route.call_count
    t = time.perf_counter()
    a, b = await agg.run([Q["a"], Q["b"]], "test")
    assert time.perf_counter() - t < 0.2
    assert route.call_count == calls
    assert a.state is State.STALE and values(a) == {(): 10.0}
    assert a.error is not None and a.error.error_type == "circuit_open"
    assert b.state is State.FAILED and b.error is not None and b.error.error_type == "circuit_open"


@respx.mock
async def test_back_to_back_uncached_requests(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=0)
    states = []
    for _ in range(3):
        (r,) = await agg.run([Q["a"]], "test")
        states.append((r.state, r.error))
    assert states == [(State.FRESH, None)] * 3
    assert route.call_count == 3


@respx.mock
async def test_same_expression_with_different_kept_labels_is_projected_per_figure(make: Any) -> None:
    cat = build_catalog({"queries": [
        {"id": "per_provider", "expr": "max by (provider) (metric_c)", "help": "P.", "unit": "u",
         "labels": ["provider"]},
        {"id": "total", "name": "total", "expr": "max by (provider) (metric_c)", "help": "T.", "unit": "u"},
    ]}, "test")
    respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make()
    per_provider, total = await agg.run([cat.queries["per_provider"], cat.queries["total"]], "test")
    assert {s.labels: s.value for s in per_provider.samples} == {
        (("provider", "openai"),): 1.0, (("provider", "anthropic"),): 0.5}
    assert [(s.labels, s.value) for s in total.samples] == [((), 1.5)]


@respx.mock
async def test_ttl_is_configured_per_category(make: Any) -> None:
    route = respx.post(QUERY_URL).mock(side_effect=fake_prometheus)
    agg = make(cache_ttl_seconds=3600, cache_ttl_overrides={"business": 0})
    await agg.run([Q["a"]], "system")
    (r,) = await agg.run([Q["a"]], "system")
    assert r.state is State.CACHED and route.call_count == 1  # the default TTL keeps it
    await agg.run([Q["d"]], "business")
    (r,) = await agg.run([Q["d"]], "business")
    assert r.state is State.FRESH and route.call_count == 3  # TTL 0 for business: fetched each time


@respx.mock
async def test_a_request_joining_a_fetch_that_runs_out_of_its_leaders_time_asks_again(make: Any) -> None:
    """A request that joined another request's fetch inherits that request's deadline: when
    the fetch times out while the joiner has most of its own time left, the joiner asks again
    (one more upstream request) and fails, if it must, at its own deadline, not at once."""
    started: list[float] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        started.append(time.perf_counter())
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    respx.post(QUERY_URL).mock(side_effect=hang)
    agg = make(request_deadline_seconds=0.4)
    first = asyncio.create_task(agg.run(ABC, "test"))
    await asyncio.sleep(0.3)  # the first request's fetch has 0.1 s left; the next one 0.4 s
    t = time.perf_counter()
    second = await agg.run(ABC, "test")
    took = time.perf_counter() - t
    assert all(r.state is State.FAILED and r.error is not None and r.error.error_type == "timeout"
               for r in [*second, *await first])
    assert took >= 0.3, f"failed after {took:.3f}s with the other request's timeout"
    assert len(started) == 2
