"""vROps client against respx: token flow, renewal, 401/1512 retry, batching, timeouts."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import respx

from app.vrops.client import TokenCache, VropsAuthError, VropsClient, VropsError
from app.vrops.settings import VropsSettings

BASE = "https://vrops.test"
API = f"{BASE}/suite-api/api"
PASSWORD = "hunter2-very-secret"


def settings(**kw: Any) -> VropsSettings:
    return VropsSettings.model_validate({
        "vrops_targets": [{"name": "lab", "url": BASE, "username": "svc", "password": PASSWORD,
                           "auth_source": "LDAP-corp"}],
        "vrops_retry_backoff_seconds": 0.01, **kw})


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def nosleep(_: float) -> None:
    return None


def client(s: VropsSettings, clock: Clock | None = None, cache: TokenCache | None = None,
           ) -> VropsClient:
    return VropsClient(s.vrops_targets[0], s, clock=clock or Clock(), sleep=nosleep,
                       token_cache=cache)


def token_route(mock: respx.MockRouter, clock: Clock, ttl: float = 1800.0) -> respx.Route:
    n = {"i": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        n["i"] += 1
        return httpx.Response(200, json={"token": f"tok-{n['i']}",
                                         "validity": int((clock() + ttl) * 1000),
                                         "expiresAt": "x", "roles": []})

    return mock.post(f"{API}/auth/token/acquire").mock(side_effect=answer)


def empty_stats(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"values": []})


@respx.mock
async def test_token_acquire_body_and_header() -> None:
    clock = Clock()
    tok = token_route(respx.mock, clock)
    stats = respx.post(f"{API}/resources/stats/latest/query").mock(side_effect=empty_stats)
    async with client(settings(), clock) as c:
        await c.latest_stats(["a"], ["cpu|usage_average"])
    sent = json.loads(tok.calls[0].request.content)
    assert sent == {"username": "svc", "password": PASSWORD, "authSource": "LDAP-corp"}
    req = stats.calls[0].request
    assert req.headers["authorization"] == "vRealizeOpsToken tok-1"
    assert req.headers["accept"] == "application/json"
    assert json.loads(req.content)["currentOnly"] is True


@respx.mock
async def test_token_reused_then_renewed_before_validity_runs_out() -> None:
    clock = Clock()
    tok = token_route(respx.mock, clock, ttl=1800)
    respx.post(f"{API}/resources/stats/latest/query").mock(side_effect=empty_stats)
    s = settings(vrops_token_renew_margin_seconds=300)
    async with client(s, clock) as c:
        await c.latest_stats(["a"], ["k"])
        clock.t += 1000  # 800 s of validity left: still fresh
        await c.latest_stats(["a"], ["k"])
        assert tok.call_count == 1
        clock.t += 600  # 200 s left < 300 s margin: renew proactively, no 401 needed
        await c.latest_stats(["a"], ["k"])
        assert tok.call_count == 2


@respx.mock
async def test_expired_token_401_1512_renews_and_retries_once() -> None:
    clock = Clock()
    tok = token_route(respx.mock, clock)
    calls = {"n": 0}

    def stats(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.headers["authorization"] == "vRealizeOpsToken tok-1":
            return httpx.Response(401, json={"message": "expired", "apiErrorCode": 1512})
        return httpx.Response(200, json={"values": [{"resourceId": "a", "stat-list": {"stat": [
            {"timestamps": [1000], "statKey": {"key": "k"}, "data": [5.0]}]}}]})

    respx.post(f"{API}/resources/stats/latest/query").mock(side_effect=stats)
    async with client(settings(), clock) as c:
        values, errors = await c.latest_stats(["a"], ["k"])
    assert errors == [] and values[0].value == 5.0
    assert tok.call_count == 2 and calls["n"] == 2


@respx.mock
async def test_401_forever_gives_auth_error_after_one_retry(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    tok = token_route(respx.mock, clock)
    route = respx.post(f"{API}/resources/stats/latest/query").mock(
        return_value=httpx.Response(401, json={"apiErrorCode": 1512}))
    async with client(settings(), clock) as c:
        with pytest.raises(VropsAuthError):
            await c.latest_stats(["a"], ["k"])
    assert tok.call_count == 2 and route.call_count == 2
    assert PASSWORD not in caplog.text and "tok-" not in caplog.text


@respx.mock
async def test_bad_credentials_is_auth_error_without_secret() -> None:
    respx.post(f"{API}/auth/token/acquire").mock(return_value=httpx.Response(401))
    async with client(settings()) as c:
        with pytest.raises(VropsAuthError) as info:
            await c.list_resources("ClusterComputeResource")
    assert PASSWORD not in str(info.value)


@respx.mock
async def test_stats_batched_at_1000_ids() -> None:
    clock = Clock()
    token_route(respx.mock, clock)
    sizes: list[int] = []

    def stats(request: httpx.Request) -> httpx.Response:
        ids = json.loads(request.content)["resourceId"]
        sizes.append(len(ids))
        if len(ids) > 1000:
            return httpx.Response(400, json={"message": "too many"})
        return httpx.Response(200, json={"values": [
            {"resourceId": i, "stat-list": {"stat": [
                {"timestamps": [1], "statKey": {"key": "k"}, "data": [1.0]}]}} for i in ids]})

    respx.post(f"{API}/resources/stats/latest/query").mock(side_effect=stats)
    ids = [f"id-{i}" for i in range(2500)]
    async with client(settings(vrops_batch_size=1000), clock) as c:
        values, errors = await c.latest_stats(ids, ["k"])
    assert sorted(sizes) == [500, 1000, 1000]
    assert errors == [] and {v.resource_id for v in values} == set(ids)


@respx.mock
async def test_timeouts_are_retried_a_bounded_number_of_times() -> None:
    clock = Clock()
    token_route(respx.mock, clock)
    route = respx.get(f"{API}/resources").mock(side_effect=httpx.ReadTimeout("slow"))
    async with client(settings(vrops_max_retries=2), clock) as c:
        with pytest.raises(VropsError, match="3 attempts: timeout"):
            await c.list_resources("HostSystem")
    assert route.call_count == 3


@respx.mock
async def test_5xx_then_success_and_paging() -> None:
    clock = Clock()
    token_route(respx.mock, clock)
    answers = iter([
        httpx.Response(503),
        httpx.Response(200, json={"pageInfo": {"totalCount": 3, "page": 0, "pageSize": 2},
                                  "resourceList": [
                                      {"identifier": "1", "resourceKey": {
                                          "name": "a", "resourceKindKey": "HostSystem"}},
                                      {"identifier": "2", "resourceKey": {
                                          "name": "b", "resourceKindKey": "HostSystem"}}]}),
        httpx.Response(200, json={"pageInfo": {"totalCount": 3, "page": 1, "pageSize": 2},
                                  "resourceList": [
                                      {"identifier": "3", "resourceKey": {
                                          "name": "c", "resourceKindKey": "HostSystem"}}]}),
    ])
    route = respx.get(f"{API}/resources").mock(side_effect=lambda r: next(answers))
    async with client(settings(vrops_page_size=2), clock) as c:
        res = await c.list_resources("HostSystem")
    assert [r.name for r in res] == ["a", "b", "c"]
    assert route.call_count == 3
    assert route.calls[2].request.url.params["page"] == "1"


@respx.mock
async def test_connect_and_read_timeouts_configured() -> None:
    s = settings(vrops_connect_timeout_seconds=2, vrops_read_timeout_seconds=7)
    async with client(s) as c:
        t = c._http.timeout
    assert t.connect == 2 and t.read == 7


@respx.mock
async def test_token_cache_shared_between_clients() -> None:
    clock = Clock()
    tok = token_route(respx.mock, clock)
    respx.post(f"{API}/resources/stats/latest/query").mock(side_effect=empty_stats)
    cache = TokenCache()
    for _ in range(3):
        async with client(settings(), clock, cache) as c:
            await c.latest_stats(["a"], ["k"])
    assert tok.call_count == 1


def test_password_from_file(tmp_path: Any) -> None:
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    s = VropsSettings.model_validate({
        "vrops_targets": [{"name": "x", "url": BASE, "username": "u"}],
        "vrops_password_file": f})
    assert s.vrops_targets[0].secret(s.vrops_password_file) == "from-file"
    assert "from-file" not in repr(s)
