"""The lean upstream transport against real loopback servers that misbehave on purpose.

Every case here is a way an upstream connection ends, waits or frames its answer; the
transport must answer each as httpcore's pool did (same httpx exceptions, so the one
error vocabulary of UpstreamHttp is unchanged), and never hand a half-read or closing
connection to the next request.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from app.gateway.settings import GatewaySettings
from app.gateway.upstream import transport as transport_module
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.client import UpstreamHttp
from app.gateway.upstream.transport import LeanTransport
from tests.support.tools import needs, require

Respond = Callable[[asyncio.StreamWriter, bytes, int], Awaitable[bool]]


class Server:
    """A loopback HTTP server scripted per test: `respond(writer, request, n)` answers the
    n-th request (numbered over all connections) and says whether to keep the connection."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.respond(writer, request, len(self.requests)):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(respond: Respond, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Server, str]]:
    server = Server(respond)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield server, f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        srv.close()


def answer(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), b"".join(h + b"\r\n" for h in extra), body)


async def ok(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
    writer.write(answer(b'{"n": %d}' % n))
    await writer.drain()
    return True


def client(**limits: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=LeanTransport(limits=httpx.Limits(
        max_connections=int(limits.get("max_connections", 10)), max_keepalive_connections=10,
        keepalive_expiry=limits.get("keepalive_expiry", 5.0))))


async def test_keep_alive_reuses_one_connection_and_writes_each_request_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    async with serving(ok) as (server, url), client() as http:
        for n in (1, 2, 3):
            r = await http.post(f"{url}/api/v1/query", content=b"query=up", headers={"X-Scope-OrgID": "a"})
            assert r.json() == {"n": n}
            if n == 1:  # spy on the pooled connection's socket writes from now on
                conn = next(iter(http._transport._idle.values()))[0]  # type: ignore[attr-defined]
                assert conn.transport is not None
                real = conn.transport.write

                def spy(data: bytes, real: Callable[[bytes], None] = real) -> None:
                    writes.append(data)
                    real(data)

                monkeypatch.setattr(conn.transport, "write", spy)
    assert server.connections == 1
    assert len(writes) == 2, "one write per request: request line, headers and body together"
    sent = server.requests[-1]
    assert sent.startswith(b"POST /api/v1/query HTTP/1.1\r\n")
    assert b"\r\nx-scope-orgid: a\r\n" in sent.lower() and b"\r\nhost: 127.0.0.1:" in sent.lower()
    assert sent.endswith(b"\r\n\r\nquery=up")


async def test_a_pooled_connection_the_upstream_closed_is_replaced_without_failing_the_request() -> None:
    async def once_per_connection(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(answer(b"{}"))  # no "Connection: close": the client believes it may reuse it
        await writer.drain()
        return False

    async with serving(once_per_connection) as (server, url), client() as http:
        for _ in range(3):
            await asyncio.sleep(0.05)  # the close reaches the client... or not yet: both must work
            assert (await http.get(f"{url}/x")).status_code == 200
    assert server.connections == 3


async def test_a_reused_connection_closed_as_the_request_arrives_is_retried_once_on_a_fresh_one() -> None:
    seen: dict[int, int] = {}

    async def idle_close_race(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        # The upstream's idle timeout fires just as the next request arrives: that request
        # is never answered on this connection (nothing of it was processed).
        seen[id(writer)] = seen.get(id(writer), 0) + 1
        if seen[id(writer)] > 1:
            return False
        return await ok(writer, request, n)

    async with serving(idle_close_race) as (server, url), client() as http:
        assert (await http.get(f"{url}/x")).json() == {"n": 1}
        assert (await http.get(f"{url}/x")).json() == {"n": 3}, "asked again on a fresh connection"
    assert server.connections == 2


async def test_connection_close_answers_are_not_pooled() -> None:
    async def closing(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(answer(b"{}", b"Connection: close"))
        await writer.drain()
        return True  # the server would go on: the client must not

    async with serving(closing) as (server, url), client() as http:
        for _ in range(2):
            assert (await http.get(f"{url}/x")).status_code == 200
    assert server.connections == 2


async def test_expired_idle_connections_are_not_reused() -> None:
    async with serving(ok) as (server, url), client(keepalive_expiry=0.05) as http:
        await http.get(f"{url}/x")
        await asyncio.sleep(0.1)
        await http.get(f"{url}/x")
    assert server.connections == 2


async def test_a_fresh_connection_closed_without_an_answer_fails_once_not_forever() -> None:
    async def silent_close(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        return False

    async with serving(silent_close) as (server, url), client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await http.get(f"{url}/x")
    assert server.connections == 1


async def test_a_close_mid_answer_is_a_protocol_error_and_the_connection_is_dropped() -> None:
    async def truncated(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            await writer.drain()
            return False
        return await ok(writer, request, n)

    async with serving(truncated) as (server, url), client(max_connections=1) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="mid-answer"):
            await http.get(f"{url}/x")
        assert (await http.get(f"{url}/x")).json() == {"n": 2}  # the one slot was given back
    assert server.connections == 2


async def test_no_answer_within_the_read_timeout() -> None:
    async def hang(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        await asyncio.sleep(5)
        return False

    async with serving(hang) as (_, url), client() as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/x", timeout=httpx.Timeout(5, read=0.2))
        assert time.monotonic() - started < 1.0


async def test_a_stalled_body_hits_the_read_timeout() -> None:
    async def stall(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(5)
        return False

    async with serving(stall) as (_, url), client() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/x", timeout=httpx.Timeout(5, read=0.2))


async def test_the_pool_is_bounded_and_its_wait_is_a_pool_timeout() -> None:
    release = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        await release.wait()
        return await ok(writer, request, n)

    async with serving(slow) as (server, url), client(max_connections=1) as http:
        first = asyncio.create_task(http.get(f"{url}/x"))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await http.get(f"{url}/x", timeout=httpx.Timeout(5, pool=0.1))
        second = asyncio.create_task(http.get(f"{url}/x"))
        await asyncio.sleep(0.05)
        assert server.connections == 1, "the second request waits for the one slot"
        release.set()
        assert [(await t).status_code for t in (first, second)] == [200, 200]
    assert server.connections == 1


async def test_refused_connections_are_connect_errors() -> None:
    async with serving(ok) as (_, url):
        pass  # closed: nothing listens on that port any more
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{url}/x")


@pytest.mark.parametrize("framing", ["chunked", "close-delimited", "gzip"])
async def test_answers_framed_every_way_arrive_whole(framing: str) -> None:
    body = b'{"data": "%s"}' % (b"x" * 200_000)

    async def framed(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 65536):
                part = body[i:i + 65536]
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")
        elif framing == "close-delimited":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        else:
            writer.write(answer(gzip.compress(body), b"Content-Encoding: gzip"))
        await writer.drain()
        return framing != "close-delimited"

    async with serving(framed) as (_, url), client() as http:
        for _ in range(2):
            assert (await http.get(f"{url}/x")).content == body


async def test_a_big_answer_read_slowly_is_exact_and_bounded_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    body = bytes(range(256)) * (6 * 4096)  # 6 MiB, beyond the pause threshold
    most = [0]

    class Watched(transport_module._Connection):
        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            most[0] = max(most[0], self._buffered)

    monkeypatch.setattr(transport_module, "_Connection", Watched)

    async def big(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(answer(body))
        await writer.drain()
        return True

    async with serving(big) as (_, url), client() as http:
        async with http.stream("GET", f"{url}/x") as r:
            chunks = []
            async for chunk in r.aiter_raw():
                chunks.append(chunk)
                if len(chunks) < 5:
                    await asyncio.sleep(0.02)  # a slow reader: the transport pauses the socket
            assert b"".join(chunks) == body
        assert (await http.get(f"{url}/x")).content == body  # and the connection is whole
    assert most[0] < 2 * transport_module._HIGH_WATER, f"{most[0]} bytes buffered at once"


async def test_an_answer_over_the_size_cap_drops_its_connection_and_frees_its_slot() -> None:
    async def big(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(answer(b"x" * 300_000 if n == 1 else b'{"ok": 1}'))
        await writer.drain()
        return True

    async with serving(big) as (server, url):
        upstream = UpstreamHttp(GatewaySettings(prometheus_url=url, prometheus_max_connections=1))
        try:
            with pytest.raises(UpstreamError) as caught:
                await upstream.exchange("GET", f"{url}/x", [], 5, None, max_bytes=100_000)
            assert caught.value.error_type == "too_large"
            assert await upstream.exchange("GET", f"{url}/x", [], 5, None) == (200, b'{"ok": 1}')
        finally:
            await upstream.aclose()
    assert server.connections == 2, "the half-read connection was closed, not reused"


async def test_transport_failures_keep_the_one_error_vocabulary() -> None:
    async def truncated(writer: asyncio.StreamWriter, request: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx")
        await writer.drain()
        return False

    async with serving(truncated) as (_, url):
        upstream = UpstreamHttp(GatewaySettings(prometheus_url=url))
        try:
            with pytest.raises(UpstreamError) as caught:
                await upstream.exchange("POST", f"{url}/api/v1/query", [("query", "up")], 5, None)
            assert caught.value.error_type == "transport"
        finally:
            await upstream.aclose()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([require("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@needs("openssl")
@pytest.mark.parametrize(("verify", "works"), [("ca", True), (False, True), (True, False)])
async def test_tls_is_verified_as_configured(certificate: tuple[Path, Path], verify: object, works: bool) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    async with serving(ok, tls) as (_, url):
        upstream = UpstreamHttp(GatewaySettings(prometheus_url=url, prometheus_verify_tls=verify is not False,
                                                prometheus_ca_file=cert if verify == "ca" else None))
        try:
            if works:
                assert await upstream.exchange("GET", f"{url}/x", [], 5, None) == (200, b'{"n": 1}')
            else:
                with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED") as caught:
                    await upstream.exchange("GET", f"{url}/x", [], 5, None)
                assert caught.value.error_type == "unreachable"
        finally:
            await upstream.aclose()


async def test_headers_merge_case_insensitively_so_a_tenant_header_replaces_a_configured_one() -> None:
    async with serving(ok) as (server, url):
        upstream = UpstreamHttp(GatewaySettings(
            prometheus_url=url, prometheus_bearer_token="tok",
            prometheus_headers={"x-scope-orgid": "everyone", "authorization": "Bearer configured", "X-Extra": "1"}))
        try:
            await upstream.exchange("POST", f"{url}/api/v1/query", [("query", "up")], 5, {"X-Scope-OrgID": "tenant-a"})
        finally:
            await upstream.aclose()
    lines = [line.lower() for line in server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")[1:]]
    named = {name: [line for line in lines if line.startswith(name + b":")]
             for name in (b"x-scope-orgid", b"authorization", b"x-extra", b"content-type", b"host")}
    assert named[b"x-scope-orgid"] == [b"x-scope-orgid: tenant-a"]
    assert named[b"authorization"] == [b"authorization: bearer tok"]
    assert all(len(found) == 1 for found in named.values()), named
