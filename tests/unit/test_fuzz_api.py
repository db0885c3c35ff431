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
from schemathesis.checks import not_a_server_error

from app.config import Settings
from app.main import create_app
from app.vrops.settings import VropsSettings
from tests.support.procs import Proc, start_redis

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


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_redis(tmp_path_factory.mktemp("fuzz-redis"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(redis: Proc) -> Iterator[TestClient]:
    mp = pytest.MonkeyPatch()
    mp.setenv("API_TOKENS", TOKEN)
    mp.delenv("API_TOKENS_FILE", raising=False)
    mp.delenv("METRICS_TOKEN", raising=False)
    app = create_app(Settings(prometheus_url=PROM, cache_ttl_seconds=0, response_memo_seconds=0))
    app.state.vrops_settings = VropsSettings(
        redis_url=redis.url,
        vrops_targets=[{"name": "t1", "url": "http://vrops.test", "username": "u", "password": "p"}],
    )
    with respx.mock(assert_all_called=False, assert_all_mocked=False) as mock:
        mock.post(f"{PROM}/api/v1/query").mock(side_effect=_answer)
        mock.route(host="testserver").pass_through()
        with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            yield c
    mp.undo()
    folder = os.environ.get("FUZZ_REPORT_DIR")
    if folder:
        Path(folder, "api.json").write_text(json.dumps({"schemathesis": COUNTS}, indent=2) + "\n")


# The schema of a fresh app (the routes do not depend on settings); requests go to `client`.
schema = schemathesis.openapi.from_dict(create_app(Settings(prometheus_url=PROM)).openapi())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_api_conforms_and_never_5xx(case: Any, client: TestClient) -> None:
    COUNTS["cases"] += 1
    kwargs = case.as_transport_kwargs(headers={"Authorization": f"Bearer {TOKEN}"})
    kwargs.pop("base_url", None)
    url = kwargs.pop("url", None) or kwargs.pop("path")
    method = kwargs.pop("method")
    kwargs = {k: v for k, v in kwargs.items() if k in ("headers", "params", "content", "json", "cookies", "data")}
    response = client.request(method, url, **kwargs)
    try:
        assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.text[:300])
        # Only "no 5xx" is checked by schemathesis itself: the schema FastAPI derives does
        # not describe these routes (Response objects: no content types; HTTPException:
        # string `detail` where HTTPValidationError is documented, 404/503 undocumented;
        # see the xfail below). What the schema cannot say is asserted here instead.
        case.validate_response(response, checks=[not_a_server_error])
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


@pytest.mark.xfail(strict=True, reason=(
    "BUG (docs): app/api/gateway.py declares the text and markdown routes without response_class / "
    "responses=, so the OpenAPI schema documents application/json for /prometheus/metrics/docs "
    "(text/markdown) and /prometheus/metrics/{category} and /all (text/plain exposition); "
    "the 404 (unknown category) and 503 (/vrops/metrics, Redis down) answers are not documented, and "
    "422s raised as HTTPException(422, str) have a string `detail` where HTTPValidationError (a list) "
    "is documented; vROps list parameters accept any string in the schema but 422 control characters"))
def test_text_routes_document_their_content_type() -> None:
    doc = create_app(Settings(prometheus_url=PROM)).openapi()
    content = doc["paths"]["/prometheus/metrics/docs"]["get"]["responses"]["200"]["content"]
    assert "text/markdown" in content
