"""HTTP hygiene against a real server (uvicorn, raw sockets on 127.0.0.1).

- Content-Length together with Transfer-Encoding (RFC 9112 section 6.1: ambiguous
  framing, the request-smuggling shape): 400 and the connection closed, not parsed
  one way and kept open for the next request.
- A trailing slash is not redirected with a Location built from the Host header.
- No page on the origin loads third-party script (the OpenAPI docs pages did, from a
  CDN without integrity); /openapi.json stays.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from tests.faults.conftest import Gateway, gateway_env, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("hygiene"), gateway_env("http://127.0.0.1:9"))
    yield g
    stop_gateway(g)


def _exchange(port: int, raw: bytes, wait: float = 2.0) -> tuple[bytes, bool]:
    """Send `raw`; the answer, and whether the server closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(raw)
        data = b""
        closed = False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except TimeoutError:
            pass  # still open after `wait` seconds: kept alive
    return data, closed


def _head(data: bytes) -> tuple[int, dict[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:])}
    return status, headers


def test_content_length_with_transfer_encoding_is_refused_and_closed(gw: Gateway) -> None:
    """Over the wire. (h11 >= 0.16 already refuses this framing itself; httptools, which
    uvicorn prefers when installed, parses it: the app-level answer below covers both.)"""
    raw = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    data, closed = _exchange(gw.proc.port, raw)
    status, headers = _head(data)
    assert status == 400, data[:300]
    assert headers.get("connection") == "close"
    assert closed, "the connection must not be reused after ambiguous framing"
    # An ordinary request on the same kind of connection is still kept alive.
    data, closed = _exchange(gw.proc.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", wait=0.5)
    assert _head(data)[0] == 200 and not closed


async def test_the_app_itself_refuses_ambiguous_framing_with_connection_close() -> None:
    """Whatever server parsed it: the security middleware answers 400 + Connection: close."""
    from app.gateway.settings import GatewaySettings
    from app.main import create_app

    app = create_app(GatewaySettings(prometheus_url="http://127.0.0.1:9"))
    sent: list[dict[str, object]] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/health", "raw_path": b"/health", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"5"),
                         (b"transfer-encoding", b"chunked")]}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[arg-type]
    start = sent[0]
    assert start["status"] == 400
    assert (b"connection", b"close") in start["headers"]  # type: ignore[operator]
    assert b"Transfer-Encoding" in sent[1]["body"]  # type: ignore[operator]


@pytest.mark.parametrize("path", ["/status/", "/health/", "/prometheus/metrics/summary/", "/openapi.json/"])
def test_no_redirect_location_is_built_from_the_host_header(gw: Gateway, path: str) -> None:
    raw = f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
    data, _ = _exchange(gw.proc.port, raw)
    status, headers = _head(data)
    assert "location" not in headers, headers
    assert b"evil.example" not in data
    assert status in (401, 404), status


def test_no_third_party_script_on_the_origin(gw: Gateway) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert gw.client.get(gw.url + path).status_code == 404, path
    assert gw.client.get(gw.url + "/openapi.json").json()["info"]["title"] == "Metrics gateway"
    page = gw.client.get(gw.url + "/status").text
    sources = re.findall(r"""<script[^>]*\ssrc=["']([^"']+)""", page)
    assert sources and all(not re.match(r"(?i)(https?:)?//", s) for s in sources), sources
