"""Schemathesis against the app's own OpenAPI schema, in-process (ASGI), bounded.

Every operation gets generated requests (valid and invalid parameters, odd
headers); every answer must be a non-5xx that conforms to the schema. Upstream
Prometheus is respx (answers every query), Redis is a real redis-server, API
tokens are on (the fuzzer sends the right one) so the security middleware is
in the path. FUZZ_MAX_EXAMPLES (default 40 per operation) bounds the run;
FUZZ_REPORT_DIR=dir writes the case counts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.settings import AppSettings
from app.vrops.settings import VropsSettings, VropsTarget
from tests.support.procs import Proc

PROM = "http://prom.test:9090"
TOKEN = "fuzz-token-7d1e"
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "40"))
BATCH = re.compile(r'"gateway_query", "(\d+)"')
COUNTS: dict[str, int] = {"cases": 0, "failures": 0}
TEXT_TYPES = {"text/plain", "application/openmetrics-text", "text/markdown", "text/html"}


def _refuse(const: str) -> None:
    raise AssertionError(f"non-standard JSON constant {const}")


def _answer(request: httpx.Request) -> httpx.Response:
    query = dict(httpx.QueryParams(request.content.decode())).get("query", "")
    parts = BATCH.findall(query) or [None]
    result = [{"metric": {"gateway_query": p} if p else {}, "value": [1.7e9, "1"]} for p in parts]
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})


_API_DATA: dict[str, Any] = {
    "query_range": {"resultType": "matrix", "result": []}, "series": [], "labels": [], "metadata": {},
    "query_exemplars": [], "status/buildinfo": {"version": "2.42.0"}, "status/flags": {},
    "rules": {"groups": []}, "alerts": {"alerts": []},
}


def _api_answer(request: httpx.Request) -> httpx.Response:
    """Any other upstream API path (the gateway's /api/v1 pass-through): an empty success."""
    path = request.url.path.removeprefix("/api/v1/")
    data = [] if path.startswith("label/") else _API_DATA.get(path, {})
    return httpx.Response(200, json={"status": "success", "data": data})


@pytest.fixture(scope="module")
def client(redis_server: Proc) -> Iterator[TestClient]:
    mp = pytest.MonkeyPatch()
    mp.setenv("API_TOKENS", TOKEN)
    mp.delenv("API_TOKENS_FILE", raising=False)
    mp.delenv("METRICS_TOKEN", raising=False)
    app = create_app(AppSettings(
        gateway=GatewaySettings(prometheus_url=PROM, cache_ttl_seconds=0, response_memo_seconds=0),
        vrops=VropsSettings(
            redis_url=redis_server.url,
            vrops_targets=[VropsTarget(name="t1", url="http://vrops.test", username="u", password=SecretStr("p"))],
        )))
    with respx.mock(assert_all_called=False, assert_all_mocked=False) as mock:
        mock.post(f"{PROM}/api/v1/query").mock(side_effect=_answer)
        mock.route(host="prom.test").mock(side_effect=_api_answer)
        mock.route(host="testserver").pass_through()
        with TestClient(app) as c:
            yield c
    mp.undo()
    folder = os.environ.get("FUZZ_REPORT_DIR")
    if folder:
        Path(folder, "api.json").write_text(json.dumps({"schemathesis": COUNTS}, indent=2) + "\n")


def _openapi() -> dict[str, Any]:
    """The schema of a fresh app with tokens on, as `client` runs it (requests go to `client`)."""
    old = os.environ.get("API_TOKENS")
    os.environ["API_TOKENS"] = TOKEN
    try:
        return create_app(GatewaySettings(prometheus_url=PROM)).openapi()
    finally:
        if old is None:
            del os.environ["API_TOKENS"]
        else:
            os.environ["API_TOKENS"] = old


schema = schemathesis.openapi.from_dict(_openapi())


@schema.auth()
class BearerToken:
    """The one valid token: schemathesis sends it on positive cases and tries without/others."""

    def get(self, case: Any, context: Any) -> str:
        return TOKEN

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_api_conforms_and_never_5xx(case: Any, client: TestClient) -> None:
    COUNTS["cases"] += 1
    kwargs = case.as_transport_kwargs()
    kwargs.pop("base_url", None)
    url = kwargs.pop("url", None) or kwargs.pop("path")
    method = kwargs.pop("method")
    kwargs = {k: v for k, v in kwargs.items() if k in ("headers", "params", "content", "json", "cookies", "data")}
    response = client.request(method, url, **kwargs)
    try:
        assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.text[:300])
        # Every schemathesis check (no 5xx, status codes, content types, bodies and headers
        # against the schema, valid data accepted), except on /vrops/...: its parameters
        # accept any string in the schema but 422 empty or control-character values, with a
        # string `detail` (see test_vrops_422_uses_the_documented_shape): no 5xx only there.
        if case.path.startswith("/vrops"):
            case.validate_response(response, checks=[not_a_server_error])
        elif "/api/v1/" in case.path:
            # The Prometheus API: every check but "schema-valid data is accepted", since
            # Prometheus' own rules (end >= start, at most 11,000 points) are no schema's.
            case.validate_response(response, excluded_checks=[ignored_auth, positive_data_acceptance])
        else:
            # ignored_auth re-sends the request itself over the network (not through this
            # in-process client); invalid and missing tokens are covered by the negative cases
            # schemathesis generates here and by tests/unit/test_security.py.
            case.validate_response(response, excluded_checks=[ignored_auth])
        ctype = response.headers.get("content-type", "")
        if response.status_code >= 400:
            body = json.loads(response.text, parse_constant=_refuse)
            assert "detail" in body or "error" in body, response.text[:300]
        elif ctype.startswith("application/json"):
            json.loads(response.text, parse_constant=_refuse)  # standard JSON, never NaN
        else:
            assert ctype.split(";")[0] in TEXT_TYPES, ctype
    except Exception:
        COUNTS["failures"] += 1
        raise


def test_text_routes_document_their_content_type() -> None:
    doc = create_app(GatewaySettings(prometheus_url=PROM)).openapi()
    content = doc["paths"]["/prometheus/metrics/docs"]["get"]["responses"]["200"]["content"]
    assert "text/markdown" in content


def test_vrops_422_uses_the_documented_shape(client: TestClient) -> None:
    r = client.get("/vrops/metrics", params={"kind": "bogus"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"] == ["query", "kind"]
    assert "kind must be one of" in detail[0]["msg"]
