"""Tenants: token -> scope configuration, the middleware's hand-over, syntax-tree enforcement,
tenant-keyed figures, and per-token upstream headers reaching a real (in-process) upstream."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

import httpx
import promql_parser as pp
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from app.common.secrets import SECRET_FILE_ERRORS
from app.common.tenancy import UNCONFINED, Tenant, TenantConfigError, make_tenant, tenant_from_config, tenant_of
from app.gateway.promql.syntax import PromQLError, enforce, enforce_match, parse
from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security import SecurityMiddleware, SecuritySettings, TokenSource
from app.settings import AppSettings
from tests.support.files import rotate

TA, TB, TOPS, TMIMIR = "tok-a-6c1f0e2d", "tok-b-9a8b7c6d", "tok-ops-11223344", "tok-mimir-55667788"
TOKENS = {TA: {"env": "a"}, TB: {"labels": {"env": "b"}}, TOPS: {},
          TMIMIR: {"upstream_headers": {"X-Scope-OrgID": "team-m"}}}
ENV_A = (("env", "a"),)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- configuration ---------------------------------------------------------------------------------

def test_json_object_maps_tokens_to_tenants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKENS", json.dumps(TOKENS))
    s = SecuritySettings()
    by_token = dict(zip((t.get_secret_value() for t in s.api_tokens), s.token_tenants(), strict=True))
    assert by_token[TA].matchers == (("env", "a"),) and not by_token[TA].upstream_headers
    assert by_token[TB].matchers == (("env", "b"),)
    assert by_token[TOPS] is UNCONFINED
    assert by_token[TMIMIR].matchers == () and by_token[TMIMIR].headers() == {"X-Scope-OrgID": "team-m"}
    assert by_token[TMIMIR].scoped and not by_token[TMIMIR].confined
    for shown in (repr(s), str(s), s.model_dump_json()):
        assert not any(t in shown for t in TOKENS)


@pytest.mark.parametrize("raw", [f"{TA},{TB}", json.dumps([TA, TB])])
def test_list_forms_stay_unconfined(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("API_TOKENS", raw)
    s = SecuritySettings()
    assert [t.get_secret_value() for t in s.api_tokens] == [TA, TB]
    assert s.token_tenants() == [UNCONFINED, UNCONFINED]


@pytest.mark.parametrize("scope", [
    {"__name__": "up"}, {"1env": "a"}, {"env": ""}, {"env": ["a", "b"]}, {"env": 1},
    {"labels": {"env": "a"}, "extra": {}}, {"labels": {"env": "a"}, "upstream_headers": {"Authorization": "x"}},
    {"upstream_headers": {"Bad Header": "x"}}, {"upstream_headers": {"X-Scope-OrgID": "a\r\nX-Evil: 1"}},
    {"labels": ["env"]}, "env=a",
])
def test_scopes_that_cannot_be_enforced_are_refused(monkeypatch: pytest.MonkeyPatch, scope: Any) -> None:
    monkeypatch.setenv("API_TOKENS", json.dumps({TOPS: {}, TA: scope}))
    with pytest.raises(ValidationError) as err:
        SecuritySettings()
    assert "entry #2" in str(err.value)
    assert TA not in str(err.value) and TOPS not in str(err.value)


def test_repeated_or_malformed_tokens_are_refused_without_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    repeated = "{" + f'"{TA}": {{"env": "a"}}, "{TA}": {{}}' + "}"
    for raw in (repeated, "{" + f'"{TA}": {{"env": "a"', json.dumps({f"{TA} x": {}})):
        monkeypatch.setenv("API_TOKENS", raw)
        with pytest.raises(ValidationError) as err:
            SecuritySettings()
        assert TA not in str(err.value)


def test_tenant_id_follows_the_scope_not_the_token() -> None:
    a1 = tenant_from_config({"env": "a", "team": "x"})
    a2 = tenant_from_config({"labels": {"team": "x", "env": "a"}})
    assert a1 == a2 and a1.id and a1.id.startswith("t")
    assert a1.matchers == (("env", "a"), ("team", "x"))  # sorted: one canonical form
    others = [tenant_from_config({"env": "b"}), tenant_from_config({"env": "a"}),
              make_tenant({"env": "a"}, {"X-Scope-OrgID": "a"}), make_tenant({}, {"X-Scope-OrgID": "a"})]
    assert len({a1.id, *(t.id for t in others)}) == 5
    assert tenant_from_config({}) is UNCONFINED and UNCONFINED.id == ""
    assert "team-m" not in repr(make_tenant({}, {"X-Scope-OrgID": "team-m"}))
    with pytest.raises(TenantConfigError):
        make_tenant({}, {"x-scope-orgid": "a", "X-Scope-OrgID": "b"})


def test_tokens_file_json_object_rotation(tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    rotate(f, json.dumps({TA: {"env": "a"}, TOPS: {}}))
    source = TokenSource(SecuritySettings(api_tokens_file=f))
    tokens, tenants = source.grants()
    assert dict(zip(tokens, tenants, strict=True)) == {TA.encode(): tenant_from_config({"env": "a"}),
                                                       TOPS.encode(): UNCONFINED}
    invalid = SECRET_FILE_ERRORS.labels("api_tokens", "invalid")
    before = invalid._value.get()
    rotate(f, json.dumps({TA: {"__name__": "x"}}))  # cannot be enforced: not adopted
    assert source.grants() == (tokens, tenants)
    rotate(f, '{"' + TB + '": {"env": ')  # half a JSON object: not adopted either
    assert source.grants() == (tokens, tenants)
    assert invalid._value.get() == before + 2
    rotate(f, json.dumps({TB: {"env": "b"}}))
    assert source.grants() == ([TB.encode()], [tenant_from_config({"env": "b"})])
    rotate(f, f"# plain lines stay unconfined\n{TA}\n")
    assert source.grants() == ([TA.encode()], [UNCONFINED])


def test_static_entry_wins_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    rotate(f, json.dumps({TA: {}}))
    source = TokenSource(SecuritySettings(api_tokens=json.dumps({TA: {"env": "a"}}), api_tokens_file=f))
    tokens, tenants = source.grants()
    assert tenants[tokens.index(TA.encode())].matchers == ENV_A


# --- the middleware hands the tenant to the route ----------------------------------------------------------

@pytest.fixture()
def whoami() -> Iterator[TestClient]:
    inner = FastAPI()

    async def show(request: Request, tenant: Annotated[Tenant, Depends(tenant_of)]) -> dict[str, Any]:
        return {"id": tenant.id, "labels": tenant.labels(), "headers": tenant.headers()}

    for path in ("/prometheus/metrics/who", "/api/v1/who", "/vrops/who", "/open/who"):
        inner.add_api_route(path, show)
    settings = SecuritySettings(api_tokens=json.dumps(TOKENS))
    outer = SecurityMiddleware(inner, settings=settings,
                               protected_prefixes=("/prometheus", "/api", "/vrops"))
    with TestClient(outer) as c:  # type: ignore[arg-type]
        yield c


def test_token_resolves_to_its_tenant_in_the_route(whoami: TestClient) -> None:
    a = whoami.get("/prometheus/metrics/who", headers=bearer(TA)).json()
    assert a["labels"] == {"env": "a"} and a["id"] == tenant_from_config({"env": "a"}).id
    assert whoami.get("/api/v1/who", headers=bearer(TB)).json()["labels"] == {"env": "b"}
    assert whoami.get("/api/v1/who", headers=bearer(TOPS)).json() == {"id": "", "labels": {}, "headers": None}
    m = whoami.get("/api/v1/who", headers=bearer(TMIMIR)).json()
    assert m["headers"] == {"X-Scope-OrgID": "team-m"} and m["id"]
    assert whoami.get("/api/v1/who").status_code == 401
    assert whoami.get("/api/v1/who", headers=bearer("nope")).status_code == 403
    # Unprotected paths carry no tenant, whatever token comes along.
    assert whoami.get("/open/who", headers=bearer(TA)).json()["labels"] == {}


def test_scoped_tokens_are_refused_where_data_has_no_tenant_labels(whoami: TestClient) -> None:
    for token in (TA, TMIMIR):
        r = whoami.get("/vrops/who", headers=bearer(token))
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert whoami.get("/vrops/who", headers=bearer(TOPS)).status_code == 200


# --- enforcement on the syntax tree -------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "expected"), [
    ("up", 'up{env="a"}'),
    ('{__name__=~".+"}', '{__name__=~".+",env="a"}'),
    ('up{env=~"a|b"}', 'up{env=~"a|b",env="a"}'),
    ('up{env!="a"}', 'up{env!="a",env="a"}'),
    ('up{env="b"}', 'up{env="b",env="a"}'),
    ("sum(rate(x[5m] offset 1m)) or vector(1)", 'sum(rate(x{env="a"}[5m] offset 1m)) or vector(1)'),
    ("max_over_time(rate(x[1m])[10m:30s] @ 100)", 'max_over_time(rate(x{env="a"}[1m])[10m:30s] @ 100.000)'),
    ("x @ start() / on (job) group_left y", 'x{env="a"} @ start() / on (job) group_left () y{env="a"}'),
    ('label_replace(up, "env", "b", "", "")', 'label_replace(up{env="a"}, "env", "b", "", "")'),
    ('up{job="x" or job="y"}', 'up{job="x",env="a" or job="y",env="a"}'),
    ("1 + time()", "1 + time()"),
    # absent() reports the caller's own equality matchers, never the tenant's.
    ('absent(up{job="x"})', 'label_replace(absent(up{job="x",env="a"}), "env", "", "", "")'),
    ('absent(up{env="a"})', 'label_replace(absent(up{env="a",env="a"}), "env", "a", "", "")'),
    ("absent_over_time(up[5m])", 'label_replace(absent_over_time(up{env="a"}[5m]), "env", "", "", "")'),
])
def test_enforce_adds_the_tenant_to_every_selector(expr: str, expected: str) -> None:
    assert enforce(expr, ENV_A) == expected
    assert enforce(expr, ()) == expr


def _selectors_all_confined(expr: str, matchers: tuple[tuple[str, str], ...]) -> bool:
    ok = True

    def visit(n: pp.Expr) -> None:
        nonlocal ok
        if isinstance(n, pp.VectorSelector):
            groups = n.matchers.or_matchers or [n.matchers.matchers]
            for group in groups:
                have = {(m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in group}
                ok &= all((k, "Equal", v) in have for k, v in matchers)

    pp.walk(parse(expr), pre_visit=visit)
    return ok


SHAPES = [
    'sum by (job) (rate(demo_api_request_duration_seconds_count{status="500"}[5m]))',
    "histogram_quantile(0.9, sum by (le) (rate(demo_api_request_duration_seconds_bucket[1m])))",
    "demo_memory_usage_bytes unless on (instance) demo_num_cpus",
    "count_values(\"v\", demo_num_cpus) and ignoring (v) vector(1)",
    "topk(2, demo_cpu_usage_seconds_total offset -1m) > bool 0",
    "rate(demo_cpu_usage_seconds_total[5m:10s] @ end() offset 1m)",
    "-(demo_disk_usage_bytes ^ 2) % 3",
    "scalar(sum(demo_num_cpus)) * on () group_right (x) demo_num_cpus",
    "quantile_over_time(0.5, (demo_num_cpus + 1)[5m:])",
    '{__name__=~"demo_.*", instance!~"x"}',
]


@pytest.mark.parametrize("expr", SHAPES)
def test_every_selector_of_any_shape_is_confined(expr: str) -> None:
    matchers = (("env", "a"), ("team", 'x"y\\z'))  # a value that would break naive splicing
    out = enforce(expr, matchers)
    assert _selectors_all_confined(out, matchers)
    assert not _selectors_all_confined(expr, matchers)


def test_unenforceable_functions_and_bad_queries_raise() -> None:
    for expr in ("info(up)", "up{", 'up{env="a"} +'):
        with pytest.raises(PromQLError):
            enforce(expr, ENV_A)


def test_enforce_match() -> None:
    assert enforce_match([], ENV_A) == ['{env="a"}']
    assert enforce_match(["up", '{job="x"}', '{__name__=~".+"}'], ENV_A) == [
        'up{env="a"}', '{job="x",env="a"}', '{__name__=~".+",env="a"}']
    assert enforce_match(["up"], ()) == ["up"]
    for bad in ("", "up offset 5m", "rate(up[5m])", "{}", "up @ 10", "sum(up)"):
        with pytest.raises(PromQLError):
            enforce_match([bad], ENV_A)


# --- figures: tenant in the upstream query, in every cache key, and its upstream headers --------------------

class RecordingUpstream:
    """A small real Prometheus API stand-in (Starlette under uvicorn on 127.0.0.1) that records
    each request's path, form and X-Scope-OrgID, and answers per tenant: every series
    (one per batched figure) has the value 1 for env="a" / org a, 2 for b, 7 otherwise."""

    VALUES = {"a": "1", "b": "2"}

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        app = FastAPI()
        app.add_api_route("/api/v1/query", self.query, methods=["GET", "POST"])
        app.add_api_route("/api/v1/labels", self.labels, methods=["GET", "POST"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def query(self, request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode())) or dict(request.query_params)
        org = request.headers.get("x-scope-orgid")
        expr = form.get("query", "")
        self.calls.append({"path": request.url.path, "query": expr, "org": org})
        env = re.search(r'env="(\w)"', expr)
        value = self.VALUES.get(org or "") or self.VALUES.get(env.group(1) if env else "", "7")
        parts = re.findall(r'"gateway_query", "(\d+)"', expr) or [None]
        result = [{"metric": {} if p is None else {"gateway_query": p}, "value": [time.time(), value]}
                  for p in parts]
        return JSONResponse({"status": "success", "data": {"resultType": "vector", "result": result}})

    async def labels(self, request: Request) -> JSONResponse:
        form = parse_qsl((await request.body()).decode()) or list(request.query_params.multi_items())
        self.calls.append({"path": request.url.path, "match": [v for k, v in form if k == "match[]"],
                           "org": request.headers.get("x-scope-orgid"), "query": ""})
        return JSONResponse({"status": "success", "data": ["__name__", "env"]})

    def __enter__(self) -> RecordingUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture()
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as fake:
        yield fake


def gateway(upstream: RecordingUpstream, **gw: Any) -> TestClient:
    settings = AppSettings(gateway=GatewaySettings(prometheus_url=upstream.url, **gw),
                           security=SecuritySettings(api_tokens=json.dumps(TOKENS)))
    return TestClient(create_app(settings))


def test_figures_are_the_tenants_and_cached_per_tenant(upstream: RecordingUpstream) -> None:
    with gateway(upstream, cache_ttl_seconds=60) as c:
        a = c.get("/prometheus/metrics/summary", headers=bearer(TA)).json()
        assert a["metrics"]["business"]["active_api_keys"] == 1.0
        assert a["scope"] == {"labels": {"env": "a"}}
        sent_a = [call["query"] for call in upstream.calls]
        assert sent_a and all(_selectors_all_confined(q, ENV_A) for q in sent_a)
        # The other tenant, right after, with everything of a's cached: its own figures.
        b = c.get("/prometheus/metrics/summary", headers=bearer(TB)).json()
        assert b["metrics"]["business"]["active_api_keys"] == 2.0
        assert all(_selectors_all_confined(call["query"], (("env", "b"),)) for call in upstream.calls[len(sent_a):])
        ops = c.get("/prometheus/metrics/summary", headers=bearer(TOPS)).json()
        assert ops["metrics"]["business"]["active_api_keys"] == 7.0 and "scope" not in ops
        # Cached and memoised answers stay per tenant.
        fetched = len(upstream.calls)
        again = {t: c.get("/prometheus/metrics/summary", headers=bearer(t)).json() for t in (TA, TB, TOPS)}
        assert len(upstream.calls) == fetched
        assert [again[t]["metrics"]["business"]["active_api_keys"] for t in (TA, TB, TOPS)] == [1.0, 2.0, 7.0]
        # Category routes, filters and the docs follow the tenant too.
        prov = c.get("/prometheus/metrics/providers?format=json&provider=openai", headers=bearer(TA)).json()
        assert prov["scope"] == {"labels": {"env": "a"}}
        assert all(f["series"][0]["value"] == 1.0 for f in prov["figures"] if f["series"])
        docs = c.get("/prometheus/metrics/docs", headers=bearer(TA)).text
        assert 'confined to `env="a"`' in docs and 'sum(fastapi_requests_total{env="a"})' in docs
        assert 'env="a"' not in c.get("/prometheus/metrics/docs", headers=bearer(TOPS)).text


def test_per_token_upstream_header_reaches_the_upstream(upstream: RecordingUpstream) -> None:
    """Mimir style: the token names its tenant upstream (X-Scope-OrgID), no label matchers."""
    # PROMETHEUS_HEADERS applies to everyone; a token's own header of that name wins.
    with gateway(upstream, cache_ttl_seconds=60, prometheus_headers={"X-Scope-OrgID": "global"}) as c:
        m = c.get("/prometheus/metrics/summary", headers=bearer(TMIMIR)).json()
        assert m["status"] == "ok" and "scope" not in m
        mimir_calls = list(upstream.calls)
        assert mimir_calls and {call["org"] for call in mimir_calls} == {"team-m"}
        assert all("env=" not in call["query"] for call in mimir_calls)
        # Same PromQL for the unconfined token, but not its cache entry nor its header.
        ops = c.get("/prometheus/metrics/summary", headers=bearer(TOPS)).json()
        assert ops["metrics"]["business"]["active_api_keys"] == 7.0
        assert len(upstream.calls) > len(mimir_calls)
        assert {call["org"] for call in upstream.calls[len(mimir_calls):]} == {"global"}
        # The query API sends it too, and keeps the tenants' cached answers apart.
        for token, value, fetches in ((TMIMIR, "7", [["team-m"]]), (TB, "2", [["global"]]),
                                      (TMIMIR, "7", [["team-m"], []])):
            before = len(upstream.calls)
            r = c.get("/api/v1/query", params={"query": "sum(up)", "time": "1700000000"}, headers=bearer(token))
            assert r.status_code == 200 and r.json()["data"]["result"][0]["value"][1] == value
            assert [call["org"] for call in upstream.calls[before:]] in fetches
        before = len(upstream.calls)
        assert c.get("/api/v1/labels", headers=bearer(TMIMIR)).status_code == 200
        assert upstream.calls[before]["org"] == "team-m" and upstream.calls[before]["match"] == []
        assert c.get("/api/v1/labels", headers=bearer(TA)).status_code == 200
        assert upstream.calls[before + 1]["org"] == "global"
        assert upstream.calls[before + 1]["match"] == ['{env="a"}']


def test_unconfined_gateway_without_tokens_is_unchanged(upstream: RecordingUpstream) -> None:
    settings = AppSettings(gateway=GatewaySettings(prometheus_url=upstream.url), security=SecuritySettings())
    with TestClient(create_app(settings)) as c:
        body = c.get("/prometheus/metrics/summary").json()
        assert body["metrics"]["business"]["active_api_keys"] == 7.0 and "scope" not in body
    assert all("env=" not in call["query"] and call["org"] is None for call in upstream.calls)


def test_httpx_sees_the_fake_upstream(upstream: RecordingUpstream) -> None:
    """The stand-in is a real HTTP server (so the header test above crosses a real socket)."""
    r = httpx.post(f"{upstream.url}/api/v1/query", data={"query": "up"}, headers={"X-Scope-OrgID": "b"})
    assert r.json()["data"]["result"][0]["value"][1] == "2"
