"""The upstream client against respx (and real sockets for refusals and hangs)."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from app.gateway.caching.flight import Background
from app.gateway.engines.readiness import ReadinessProbe
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import QueryAnswer, UpstreamError, parse_answer
from app.gateway.upstream.client import PrometheusClient
from app.gateway.upstream.transport import LeanTransport
from tests.support.files import rotate

PROM = "http://prom.test:9090"
QUERY_URL = f"{PROM}/api/v1/query"


def settings(**kw: Any) -> GatewaySettings:
    kw.setdefault("prometheus_url", PROM)
    return GatewaySettings(**kw)


def vector(*series: tuple[dict[str, str], str], **extra: Any) -> dict[str, Any]:
    return {"status": "success", **extra,
            "data": {"resultType": "vector",
                     "result": [{"metric": m, "value": [1.7e9, v]} for m, v in series]}}


def form(request: httpx.Request) -> dict[str, str]:
    return dict(httpx.QueryParams(request.content.decode()))


@asynccontextmanager
async def prom_client(s: GatewaySettings) -> AsyncIterator[PrometheusClient]:
    c = PrometheusClient(s)
    try:
        yield c
    finally:
        await c.aclose()


async def run_query(s: GatewaySettings, timeout: float = 2.0) -> QueryAnswer:
    async with prom_client(s) as c:
        return await c.query("sum(up)", timeout=timeout, category="test")


# --- success ---------------------------------------------------------------------------------------

@respx.mock
async def test_vector_answer_is_parsed_and_form_fields_sent() -> None:
    route = respx.post(QUERY_URL).respond(json=vector(({"provider": "a"}, "1.5"), ({"provider": "b"}, "2")))
    async with prom_client(settings()) as c:
        answer = await c.query('sum by (provider) (x{a="b"})', timeout=2.0, category="test")
        assert c.up is True and c.last_success is not None
    assert [(s.labels, s.value) for s in answer.series] == [({"provider": "a"}, 1.5), ({"provider": "b"}, 2.0)]
    assert answer.warnings == ()
    assert route.call_count == 1
    req = route.calls[0].request
    assert req.method == "POST"
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert req.headers["accept"] == "application/json"
    fields = form(req)
    assert set(fields) == {"query", "timeout"}
    assert fields["query"] == 'sum by (provider) (x{a="b"})'


@respx.mock
@pytest.mark.parametrize("remaining", [0.05, 0.3, 2.0, 2.9999])
async def test_timeout_field_is_whole_ms_below_the_remaining_time(remaining: float) -> None:
    route = respx.post(QUERY_URL).respond(json=vector())
    await run_query(settings(), timeout=remaining)
    value = form(route.calls[0].request)["timeout"]
    m = re.fullmatch(r"(\d+)ms", value)
    assert m, value
    assert 1 <= int(m.group(1)) < remaining * 1000


@respx.mock
async def test_scalar_and_non_finite_values() -> None:
    respx.post(QUERY_URL).mock(side_effect=[
        httpx.Response(200, json={"status": "success", "data": {"resultType": "scalar", "result": [1.7e9, "42.5"]}}),
        httpx.Response(200, json=vector(({"a": "1"}, "NaN"), ({"a": "2"}, "+Inf"), ({"a": "3"}, "-Inf"))),
    ])
    async with prom_client(settings()) as c:
        scalar = await c.query("scalar(up)", timeout=1, category="t")
        odd = await c.query("up", timeout=1, category="t")
    assert [(s.labels, s.value) for s in scalar.series] == [({}, 42.5)]
    values = [s.value for s in odd.series]
    assert math.isnan(values[0]) and values[1] == math.inf and values[2] == -math.inf


@respx.mock
async def test_warnings_and_infos_are_passed_through() -> None:
    respx.post(QUERY_URL).respond(json=vector(({}, "1"), warnings=["partial response"], infos=["metric is odd"]))
    answer = await run_query(settings())
    assert answer.warnings == ("partial response", "info: metric is odd")
    assert answer.series[0].value == 1.0


# --- upstream options --------------------------------------------------------------------------------

@respx.mock
async def test_bearer_token_from_the_variable() -> None:
    route = respx.post(QUERY_URL).respond(json=vector())
    await run_query(settings(prometheus_bearer_token="s3cret-token"))
    assert route.calls[0].request.headers["authorization"] == "Bearer s3cret-token"


@respx.mock
async def test_bearer_token_from_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("file-token\n")
    route = respx.post(QUERY_URL).respond(json=vector())
    await run_query(settings(prometheus_bearer_token_file=token))
    assert route.calls[0].request.headers["authorization"] == "Bearer file-token"


@respx.mock
async def test_bearer_token_file_rotation_is_picked_up(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    route = respx.post(QUERY_URL).respond(json=vector())
    async with prom_client(settings(prometheus_bearer_token_file=token)) as c:
        await c.query("up", timeout=1, category="t")
        rotate(token, "rotated")
        await c.query("up", timeout=1, category="t")
    assert route.calls[0].request.headers["authorization"] == "Bearer first"
    assert route.calls[1].request.headers["authorization"] == "Bearer rotated"


@respx.mock
async def test_basic_auth_and_extra_headers() -> None:
    route = respx.post(QUERY_URL).respond(json=vector())
    await run_query(settings(prometheus_username="alice", prometheus_password="pa:ss",
                             prometheus_headers={"X-Scope-OrgID": "tenant-1", "X-Extra": "yes"}))
    headers = route.calls[0].request.headers
    assert headers["authorization"] == "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    assert headers["x-scope-orgid"] == "tenant-1"
    assert headers["x-extra"] == "yes"


@respx.mock
async def test_no_auth_header_by_default() -> None:
    route = respx.post(QUERY_URL).respond(json=vector())
    await run_query(settings())
    assert "authorization" not in route.calls[0].request.headers


@respx.mock
@pytest.mark.parametrize("url", ["http://mimir:8080/prometheus", "http://mimir:8080/prometheus/"])
async def test_path_prefixed_url(url: str) -> None:
    route = respx.post("http://mimir:8080/prometheus/api/v1/query").respond(json=vector(({}, "3")))
    answer = await run_query(settings(prometheus_url=url))
    assert route.call_count == 1
    assert answer.series[0].value == 3.0


def test_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="PROMETHEUS_URL"):
        GatewaySettings(prometheus_url="prometheus:9090")


@pytest.mark.parametrize(("verify", "ca", "expected"), [(True, None, True), (False, None, False),
                                                        (True, "ca.pem", "ca.pem"), (False, "ca.pem", False)])
def test_tls_verify_switch(verify: bool, ca: str | None, expected: object) -> None:
    client = PrometheusClient(settings(prometheus_url="https://prom.test", prometheus_verify_tls=verify,
                                       prometheus_ca_file=ca))
    transport = client.http._transport
    assert isinstance(transport, LeanTransport)
    assert transport._verify == expected  # TLS itself: tests/unit/test_upstream_transport.py


@pytest.mark.parametrize(("env", "proxied"), [
    ({}, False),
    ({"HTTPS_PROXY": "http://proxy.test:3128"}, True),
    ({"https_proxy": "http://proxy.test:3128"}, True),
    ({"ALL_PROXY": "http://proxy.test:3128"}, True),
    ({"HTTP_PROXY": "http://proxy.test:3128"}, False),  # the upstream is https
    ({"HTTPS_PROXY": "http://proxy.test:3128", "NO_PROXY": "prom.test"}, False),
])
def test_a_proxy_from_the_environment_is_honoured(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                  proxied: bool) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    transport = PrometheusClient(settings(prometheus_url="https://prom.test")).http._transport
    assert isinstance(transport, httpx.AsyncHTTPTransport if proxied else LeanTransport)


# --- failures --------------------------------------------------------------------------------------

def envelope(error_type: str, error: str) -> dict[str, str]:
    return {"status": "error", "errorType": error_type, "error": error}


@respx.mock
@pytest.mark.parametrize(("response", "error_type", "status"), [
    (httpx.Response(400, json=envelope("bad_data", "1:5: parse error")), "bad_data", 400),
    (httpx.Response(422, json=envelope("execution", "many-to-many matching")), "execution", 422),
    (httpx.Response(503, json=envelope("timeout", "query timed out")), "timeout", 503),
    (httpx.Response(500, html="<html><body>Internal Server Error</body></html>"), "bad_response", 500),
    (httpx.Response(502, text="Bad Gateway"), "bad_response", 502),
    (httpx.Response(502, json={"message": "upstream"}), "server_error", 502),
    (httpx.Response(200, text='{"status":"success","data":{"resultType":"vec'), "bad_response", 200),
    (httpx.Response(200, json=["not", "an", "object"]), "bad_response", 200),
    (httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": []}}),
     "bad_response", 200),
    (httpx.Response(200, json={"status": "success", "data": {"resultType": "vector",
                                                              "result": [{"metric": {}, "value": [1]}]}}),
     "bad_response", 200),
])
async def test_error_type_mapping(response: httpx.Response, error_type: str, status: int) -> None:
    respx.post(QUERY_URL).mock(return_value=response)
    with pytest.raises(UpstreamError) as info:
        await run_query(settings())
    assert info.value.error_type == error_type
    assert info.value.status == status


@pytest.mark.parametrize("result", [[1], ["x"], {"metric": {}}])
def test_garbage_vector_items_are_bad_response(result: object) -> None:
    body = httpx.Response(200, json={"status": "success",
                                     "data": {"resultType": "vector", "result": result}}).content
    with pytest.raises(UpstreamError) as info:
        parse_answer(body, 200)
    assert info.value.error_type == "bad_response"


@respx.mock
async def test_query_errors_leave_upstream_up() -> None:
    respx.post(QUERY_URL).respond(400, json=envelope("bad_data", "nope"))
    async with prom_client(settings(breaker_failure_threshold=1)) as c:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await c.query("x", timeout=1, category="t")
        assert c.up is True
        assert c.breaker.state == "closed"


@respx.mock
async def test_server_errors_mark_upstream_down() -> None:
    respx.post(QUERY_URL).respond(500, html="<h1>oops</h1>")
    async with prom_client(settings()) as c:
        with pytest.raises(UpstreamError):
            await c.query("x", timeout=1, category="t")
        assert c.up is False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_is_unreachable() -> None:
    s = settings(prometheus_url=f"http://127.0.0.1:{free_port()}")
    t = time.perf_counter()
    with pytest.raises(UpstreamError) as info:
        await run_query(s, timeout=2.0)
    assert info.value.error_type == "unreachable"
    assert time.perf_counter() - t < 2.0


@respx.mock
async def test_connect_error_from_transport_is_unreachable() -> None:
    respx.post(QUERY_URL).mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(UpstreamError) as info:
        await run_query(settings())
    assert info.value.error_type == "unreachable"


@asynccontextmanager
async def tcp_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                     ) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for w in writers:
            w.close()
        server.close()


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    await asyncio.sleep(30)


async def test_hanging_upstream_times_out_within_the_budget() -> None:
    async with tcp_server(_never_answer) as url:
        t = time.perf_counter()
        with pytest.raises(UpstreamError) as info:
            await run_query(settings(prometheus_url=url), timeout=0.4)
        elapsed = time.perf_counter() - t
    assert info.value.error_type == "timeout"
    assert elapsed < 0.4 + 0.5


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    body = b'{"status":"success","data":{"resultType":"vector","result":[]}}' + b" " * 40
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode())
    await writer.drain()
    for byte in body:  # one byte every 0.1 s: never idle long enough for a read timeout
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


async def test_trickling_upstream_is_bounded_by_the_timeout() -> None:
    async with tcp_server(_trickle) as url:
        t = time.perf_counter()
        with pytest.raises(UpstreamError) as info:
            await asyncio.wait_for(run_query(settings(prometheus_url=url), timeout=0.5), 3)
        elapsed = time.perf_counter() - t
    assert info.value.error_type == "timeout"
    assert elapsed < 0.5 + 0.5


@respx.mock
async def test_oversize_body_with_content_length_is_too_large() -> None:
    big = vector(*[({"provider": f"p{i}"}, "1") for i in range(100)])
    respx.post(QUERY_URL).respond(json=big)
    async with prom_client(settings(prometheus_max_response_bytes=1024)) as c:
        with pytest.raises(UpstreamError) as info:
            await c.query("x", timeout=1, category="t")
        assert c.up is True  # the upstream answered; the query was at fault
    assert info.value.error_type == "too_large"


@respx.mock
async def test_oversize_streamed_body_is_too_large() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"status":"success","data":{"resultType":"vector","result":['
        for _ in range(50):
            yield b'{"metric":{"a":"' + b"x" * 100 + b'"},"value":[1,"1"]},'
        yield b"]}}"

    respx.post(QUERY_URL).mock(return_value=httpx.Response(200, content=chunks()))
    with pytest.raises(UpstreamError) as info:
        await run_query(settings(prometheus_max_response_bytes=2048))
    assert info.value.error_type == "too_large"


@respx.mock
async def test_answer_at_the_limit_is_accepted() -> None:
    respx.post(QUERY_URL).respond(json=vector(({}, "7")))
    answer = await run_query(settings(prometheus_max_response_bytes=1024))
    assert answer.series[0].value == 7.0


# --- one log line per episode -----------------------------------------------------------------------

@respx.mock
async def test_one_log_line_per_failure_episode(caplog: pytest.LogCaptureFixture) -> None:
    route = respx.post(QUERY_URL)
    route.respond(500, html="<html>down</html>")
    caplog.set_level(logging.INFO, logger="gateway.prometheus")
    async with prom_client(settings(breaker_failure_threshold=100)) as c:
        for _ in range(10):
            with pytest.raises(UpstreamError):
                await c.query("x", timeout=1, category="t")
        failing = [r for r in caplog.records if r.name == "gateway.prometheus"]
        assert len(failing) == 1
        assert "failing" in failing[0].getMessage() and "bad_response" in failing[0].getMessage()
        assert failing[0].levelno == logging.WARNING
        route.respond(json=vector())
        for _ in range(3):
            await c.query("x", timeout=1, category="t")
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.prometheus"]
    assert len(lines) == 2
    assert "recovered" in lines[1] and "10 failures" in lines[1]
    assert route.call_count == 13


@respx.mock
async def test_query_errors_do_not_open_an_episode(caplog: pytest.LogCaptureFixture) -> None:
    respx.post(QUERY_URL).respond(422, json=envelope("execution", "bad"))
    caplog.set_level(logging.INFO, logger="gateway.prometheus")
    async with prom_client(settings()) as c:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await c.query("x", timeout=1, category="t")
    assert [r for r in caplog.records if r.name == "gateway.prometheus"] == []


# --- readiness ----------------------------------------------------------------------------------------

@respx.mock
async def test_ready_queries_vector_one() -> None:
    route = respx.post(QUERY_URL).mock(side_effect=[httpx.Response(200, json=vector(({}, "1"))),
                                                    httpx.ConnectError("refused")])
    async with prom_client(settings(ready_cache_seconds=0)) as c:
        probe = ReadinessProbe(c.settings, c, Background())
        assert await probe.ready() == (True, "ready")
        assert await probe.ready() == (False, "unreachable")
    assert form(route.calls[0].request)["query"] == "vector(1)"
