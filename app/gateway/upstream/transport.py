"""A lean HTTP/1.1 transport for httpx: the upstream exchange without httpcore's layers.

Why: a cold figure request is one small query that Prometheus answers in about 2 ms.
httpx's default transport (httpcore, h11 and anyio over asyncio) spends about 1 ms of
CPU on each such exchange on these machines, measured side by side with a bare
asyncio protocol on the same request (docs/benchmarks.md, "the figure path"): half of
what the gateway added to Prometheus' own time. This transport speaks HTTP/1.1 over
an asyncio protocol with httptools' C parser (uvicorn's), and writes each request in
one call.

httpx stays the one public face (auth, redirects, decoding, tracing's client spans
wrap `handle_async_request`); proxies from the environment keep httpx's own transports
(httpx mounts them beside this one). What this transport adds is what httpcore's pool
did for us: a bounded pool with its wait (`PoolTimeout`), keep-alive with expiry,
connect and read timeouts, TLS, and one retry on a fresh connection when a reused one
turns out closed before any answer arrived (every upstream request here is a read).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

# Bytes buffered from the socket before reading pauses until the consumer catches up:
# a big answer (megabytes) is bounded by the size cap, but a slow consumer should not
# let the kernel's whole stream pile up here.
_HIGH_WATER = 1 << 20

_Key = tuple[bytes, bytes, int]

_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


class _Closed(Exception):
    """The connection closed before any byte of the answer arrived (retryable when reused)."""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, the answer parsed as it
    arrives (httptools' callbacks fill a queue of body chunks)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._more: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self.started = False  # any byte of the answer seen
        self.complete = False
        self.reusable = False
        self._paused = False

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak its interface
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is not None and not self.complete:
            if self._head.done() and not self._parser.should_keep_alive() and not self._framed():
                self.on_message_complete()  # an answer delimited by the close itself
            elif not self.started:
                self._fail(_Closed())
            else:
                self._fail(httpx.RemoteProtocolError("the upstream closed the connection mid-answer"))

    # -- httptools callbacks ---------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.reusable = not self.closed and self._parser.should_keep_alive()
        self._wake()

    # -- the exchange ----------------------------------------------------------------
    def _framed(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" in names or b"transfer-encoding" in names

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        for waiter in (self._head, self._more):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)

    async def send(self, data: bytes, read_timeout: float | None) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Write one request; wait for the answer's head: (status, raw headers)."""
        self._reset()
        self.used = True
        self._head = head = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None or self.transport.is_closing():
            raise _Closed()
        self.transport.write(data)
        await self._within(head, read_timeout, "no answer")
        return self._parser.get_status_code(), self._headers

    async def body(self, read_timeout: float | None) -> AsyncIterator[bytes]:
        """The answer's body as it arrives."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                yield chunk
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            self._more = more = asyncio.get_running_loop().create_future()
            try:
                await self._within(more, read_timeout, "no more of the answer")
            except _Closed:
                raise httpx.RemoteProtocolError("the upstream closed the connection mid-answer") from None

    async def _within(self, waiter: asyncio.Future[None], read_timeout: float | None, what: str) -> None:
        """Wait for the next part of the answer; past the read timeout the connection is dropped
        (what it would say next no longer belongs to anybody)."""
        try:
            async with asyncio.timeout(read_timeout):
                await waiter
        except TimeoutError:
            self.close()
            raise httpx.ReadTimeout(f"{what} within {read_timeout}s") from None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Answer(httpx.AsyncByteStream):
    """The body stream handed to httpx: closing it gives the connection back (or drops it
    when the answer was not read to its end or the upstream will close it)."""

    def __init__(self, pool: LeanTransport, key: _Key, conn: _Connection, read_timeout: float | None) -> None:
        self._pool, self._key, self._conn, self._read_timeout = pool, key, conn, read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._conn.body(self._read_timeout):
            yield chunk

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._key, self._conn)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one or more origins over a bounded keep-alive pool (see the module doc)."""

    def __init__(self, *, verify: ssl.SSLContext | str | bool = True,
                 limits: httpx.Limits = _DEFAULT_LIMITS) -> None:
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._max = limits.max_connections or 1_000_000
        self._keep = limits.max_keepalive_connections if limits.max_keepalive_connections is not None \
            else self._max
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else float("inf")
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[_Key, deque[_Connection]] = {}
        self._closing = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(verify=self._verify)
        return self._ssl

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closing:
            raise RuntimeError("the transport is closed")
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        key: _Key = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection in time") from None
        try:
            data = self._encode(request, await request.aread())
            for _ in range(2):  # a reused connection found closed: once more on a fresh one
                conn = self._idle_connection(key) or await self._connect(key, timeouts.get("connect"))
                reused = conn.used
                try:
                    status, headers = await conn.send(data, timeouts.get("read"))
                except _Closed:
                    conn.close()
                    if reused:
                        continue
                    raise httpx.RemoteProtocolError("the upstream closed the connection without answering") from None
                except BaseException:
                    conn.close()
                    raise
                stream = _Answer(self, key, conn, timeouts.get("read"))
                return httpx.Response(status, headers=headers, stream=stream,
                                      extensions={"http_version": b"HTTP/1.1"})
            raise httpx.RemoteProtocolError("the upstream closed two connections without answering")
        except BaseException:
            self._slots.release()
            raise

    @staticmethod
    def _encode(request: httpx.Request, body: bytes) -> bytes:
        """The request line, headers and body as one write."""
        head = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += (name, b": ", value, b"\r\n")
        if body and "content-length" not in request.headers:
            head += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
        head.append(b"\r\n")
        head.append(body)
        return b"".join(head)

    def _idle_connection(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, key: _Key, timeout: float | None) -> _Connection:
        scheme, host, port = key
        tls = self._ssl_context() if scheme == b"https" else None
        name = host.decode("ascii")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Connection, name, port, ssl=tls,
                                                       server_hostname=name if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {name}:{port} within {timeout}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def _release(self, key: _Key, conn: _Connection) -> None:
        """The answer is done with: keep the connection if it is whole and reusable."""
        if self._slots is not None:
            self._slots.release()
        idle = self._idle.setdefault(key, deque())
        if conn.complete and conn.reusable and not conn.closed and not self._closing \
                and len(idle) < self._keep:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._closing = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
