"""app.security: bearer tokens on /prometheus and /vrops, open paths, limits, CORS, no leaks."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security import SecurityMiddleware, SecuritySettings, TokenSource, install_security
from app.security.auth import bearer_credentials, is_protected, sanitize_accept, token_allowed
from tests.support.files import rotate

PROM = "http://prom.test:9090"
T1 = "tok-one-4f0c9a7e1b2d"
T2 = "tok-two-88aa77bb66cc"
DOCS = "/prometheus/metrics/docs"


def make_client(monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    for k in ("API_TOKENS", "API_TOKENS_FILE", "CORS_ALLOW_ORIGINS", "METRICS_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return TestClient(create_app(GatewaySettings(prometheus_url=PROM)))


@pytest.fixture()
def secured(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with make_client(monkeypatch, API_TOKENS=f"{T1},{T2}") as c:
        yield c


# --- settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [f"{T1},{T2}", f" {T1} , {T2} ,", json.dumps([T1, T2])])
def test_tokens_comma_separated_or_json(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("API_TOKENS", raw)
    s = SecuritySettings()
    assert [t.get_secret_value() for t in s.api_tokens] == [T1, T2]
    for shown in (repr(s), str(s), s.model_dump_json()):
        assert T1 not in shown and T2 not in shown


def test_settings_errors_do_not_echo_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKENS", f'["{T1}", ')
    with pytest.raises(ValidationError) as err:
        SecuritySettings()
    assert T1 not in str(err.value)
    monkeypatch.setenv("API_TOKENS", f"{T1} with-space")
    with pytest.raises(ValidationError) as err:
        SecuritySettings()
    assert T1 not in str(err.value)


def test_cors_wildcard_refused_with_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKENS", T1)
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "*")
    with pytest.raises(ValidationError):
        SecuritySettings()


def test_defaults_open_and_no_cors(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("API_TOKENS", "API_TOKENS_FILE", "CORS_ALLOW_ORIGINS"):
        monkeypatch.delenv(k, raising=False)
    s = SecuritySettings()
    assert not s.auth_enabled and s.cors_allow_origins == []


# --- access control ---------------------------------------------------------------------------------

def test_no_tokens_configured_means_open(monkeypatch: pytest.MonkeyPatch) -> None:
    with make_client(monkeypatch) as c:
        assert c.get(DOCS).status_code == 200


def test_missing_token_is_401_json_with_challenge(secured: TestClient) -> None:
    for path in (DOCS, "/prometheus/metrics/summary", "/prometheus/metrics/system", "/vrops/metrics",
                 "/vrops/jobs/metrics", "/prometheus", "/vrops", "/prometheus/anything/else"):
        r = secured.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == 'Bearer realm="gateway"'
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "unauthorized"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", f"Token {T1}",
                                    f"Bearer {T1} extra"])
def test_malformed_authorization_is_401(secured: TestClient, header: str) -> None:
    assert secured.get(DOCS, headers={"Authorization": header}).status_code == 401


@pytest.mark.parametrize("token", ["wrong", T1 + "x", T1[:-1], T1.upper(), "x" * 5000])
def test_wrong_token_is_403(secured: TestClient, token: str) -> None:
    r = secured.get(DOCS, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert r.headers["www-authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert r.json()["error"] == "forbidden"
    assert token not in r.text


@pytest.mark.parametrize("token", [T1, T2])
def test_every_configured_token_is_accepted(secured: TestClient, token: str) -> None:
    assert secured.get(DOCS, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert secured.get(DOCS, headers={"Authorization": f"bearer {token}"}).status_code == 200


def test_token_in_query_string_or_cookie_is_not_accepted(secured: TestClient) -> None:
    for params in ({"token": T1}, {"access_token": T1}):
        assert secured.get(DOCS, params=params).status_code == 401
    secured.cookies.set("token", T1)
    assert secured.get(DOCS).status_code == 401


def test_open_paths_need_no_token(secured: TestClient) -> None:
    for path in ("/health", "/metrics", "/status", "/status/assets/status.js", "/openapi.json"):
        assert secured.get(path).status_code == 200, path
    assert secured.get("/ready").status_code in (200, 503)  # never 401


def test_prefix_matching_is_on_segments_and_case_insensitive(secured: TestClient) -> None:
    assert secured.get("/PROMETHEUS/metrics/docs").status_code == 401
    assert secured.get("/prometheusx").status_code == 404
    assert is_protected("/vrops/metrics") and is_protected("/vrops") and not is_protected("/vropsy")


def test_root_path_is_stripped_before_matching(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("API_TOKENS_FILE", "CORS_ALLOW_ORIGINS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("API_TOKENS", T1)
    with TestClient(create_app(GatewaySettings(prometheus_url=PROM)), root_path="/gw") as c:
        assert c.get("/gw" + DOCS).status_code == 401
        assert c.get("/gw/health").status_code == 200


def test_tokens_file_rotation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# current\n{T1}\n\n")
    with make_client(monkeypatch, API_TOKENS_FILE=str(f)) as c:
        def status(tok: str) -> int:
            return int(c.get(DOCS, headers={"Authorization": f"Bearer {tok}"}).status_code)

        assert status(T1) == 200 and status(T2) == 403
        rotate(f, f"{T1}\n{T2}\n")  # rollout: both
        assert status(T1) == 200 and status(T2) == 200
        rotate(f, f"{T2}\n")  # old one retired
        assert status(T1) == 403 and status(T2) == 200
        f.unlink()  # unreadable mid-rotation: the last good set stays in force
        assert status(T2) == 200 and status(T1) == 403


def test_tokens_file_never_readable_fails_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with make_client(monkeypatch, API_TOKENS_FILE=str(tmp_path / "missing")) as c:
        assert c.get(DOCS).status_code == 401
        assert c.get(DOCS, headers={"Authorization": "Bearer anything"}).status_code == 403


def test_comparison_touches_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # the module app.security.auth calls
    tokens = [b"a" * 10, b"b" * 20, b"c" * 30]
    assert token_allowed(b"a" * 10, tokens) and len(calls) == 3  # no early exit on a match
    calls.clear()
    assert not token_allowed(b"zz", tokens) and len(calls) == 3
    assert not token_allowed(b"", [*tokens, b""])  # an empty credential never matches


def test_bearer_credentials_parsing() -> None:
    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"headers": list(headers)}

    assert bearer_credentials(scope((b"authorization", b"Bearer abc"))) == b"abc"
    assert bearer_credentials(scope((b"authorization", b"bearer   abc  "))) == b"abc"
    assert bearer_credentials(scope((b"authorization", b"Basic abc"))) is None
    assert bearer_credentials(scope()) is None


def test_openapi_documents_the_scheme_without_secrets(secured: TestClient) -> None:
    text = secured.get("/openapi.json").text
    doc = json.loads(text)
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert doc["paths"]["/prometheus/metrics/summary"]["get"]["security"] == [{"bearerAuth": []}]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert T1 not in text and T2 not in text
    assert T1 not in secured.get("/docs").text


def test_install_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKENS", T1)
    app = FastAPI()
    s = install_security(app)
    assert install_security(app) is s
    assert sum(getattr(m, "cls", None) is SecurityMiddleware for m in app.user_middleware) == 1


# --- CORS ---------------------------------------------------------------------------------------------

def test_no_cors_by_default(secured: TestClient) -> None:
    r = secured.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = secured.options(DOCS, headers={"Origin": "https://evil.example",
                                          "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    with make_client(monkeypatch, API_TOKENS=T1, CORS_ALLOW_ORIGINS="https://dash.example") as c:
        pre = c.options(DOCS, headers={"Origin": "https://dash.example", "Access-Control-Request-Method": "GET",
                                       "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200  # preflight answered without a token
        assert pre.headers["access-control-allow-origin"] == "https://dash.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        bad = c.options(DOCS, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        r = c.get(DOCS, headers={"Origin": "https://dash.example", "Authorization": f"Bearer {T1}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://dash.example"


# --- no token anywhere ------------------------------------------------------------------------------------

def test_tokens_never_in_logs_metrics_or_errors(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with respx.mock(assert_all_called=False) as mock, \
            make_client(monkeypatch, API_TOKENS=f"{T1},{T2}", METRICS_TOKEN="metrics-tok-123") as c:
        mock.post(f"{PROM}/api/v1/query").mock(return_value=httpx.Response(503, text="down"))
        seen = [
            c.get("/prometheus/metrics/summary", headers={"Authorization": f"Bearer {T1}"}).text,
            c.get("/prometheus/metrics/summary", headers={"Authorization": f"Bearer {T1}zz"}).text,
            c.get("/prometheus/metrics/summary").text,
            c.get("/metrics", headers={"Authorization": "Bearer metrics-tok-123"}).text,
            c.get("/metrics", headers={"Authorization": f"Bearer {T2}"}).text,
            c.get("/openapi.json").text,
            c.get("/ready").text,
        ]
    blob = "\n".join(seen) + caplog.text
    for secret in (T1, T2, "metrics-tok-123"):
        assert secret not in blob


# --- limits ---------------------------------------------------------------------------------------

def test_long_query_string_is_414(secured: TestClient) -> None:
    r = secured.get("/health?" + "a=" + "x" * 5000)
    assert r.status_code == 414 and r.json()["error"] == "uri_too_long"


def test_long_path_is_414(secured: TestClient) -> None:
    r = secured.get("/prometheus/metrics/" + "x" * 3000)
    assert r.status_code == 414


def test_body_over_limit_is_413(secured: TestClient) -> None:
    r = secured.request("GET", "/health", content=b"x" * 20000)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


async def _call(app: Any, scope: dict[str, Any], body_chunks: list[bytes]) -> tuple[int, bytes]:
    chunks = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
              for i, c in enumerate(body_chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_chunked_body_is_counted_and_malformed_length_is_400() -> None:
    async def reads_body(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    settings = SecuritySettings(max_request_body_bytes=100)
    mw = SecurityMiddleware(reads_body, settings=settings, tokens=TokenSource(settings))
    base = {"type": "http", "method": "POST", "path": "/x", "query_string": b""}
    chunked = base | {"headers": [(b"transfer-encoding", b"chunked")]}
    assert (await _call(mw, chunked, [b"x" * 60, b"x" * 60]))[0] == 413
    assert (await _call(mw, chunked, [b"x" * 60, b"x" * 30])) == (200, b"ok")
    bad = base | {"headers": [(b"content-length", b"12abc")]}
    assert (await _call(mw, bad, [b""]))[0] == 400


def test_sanitize_accept_drops_only_bad_versions() -> None:
    assert sanitize_accept(b"text/plain") is None
    assert sanitize_accept(b"application/openmetrics-text; version=1.0.0") is None
    assert sanitize_accept(b"application/openmetrics-text; version=abc") == b"application/openmetrics-text"
    assert sanitize_accept(b"text/plain;version=1.x;q=0.5, */*") == b"text/plain;q=0.5, */*"
