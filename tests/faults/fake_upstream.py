"""A controllable fake Prometheus HTTP API on 127.0.0.1, for fault injection.

Runs an asyncio server in a background thread of the test process, so tests flip
``fake.mode`` between requests and read its counters. Speaks just enough
HTTP/1.1 (keep-alive, Content-Length or chunked answers) for httpx.

Modes (``fake.mode``):

- ``ok``: a successful vector answer; batched queries (``label_replace(..,
  "gateway_query", "<n>", "", "")``) get one series per part, value ``fake.value``
- ``nan``: like ok, values alternate NaN, +Inf, -Inf
- ``warnings``: like ok, plus ``warnings`` and ``infos``
- ``hang``: reads the request, never answers (until the client closes)
- ``slow``: answers ok after ``fake.delay`` seconds
- ``bad_data`` (400), ``execution`` (422), ``timeout`` (503), ``internal`` (500):
  Prometheus' own error envelopes with that errorType
- ``html``: a 502 HTML page, as a proxy in front of Prometheus would send
- ``truncated``: declares a Content-Length, sends half the JSON, closes
- ``huge``: a chunked answer of ``fake.huge_bytes`` bytes
- ``refuse``: not a mode of this server: use ``closed_port()`` instead

Counters: ``open_connections`` (now), ``max_open_connections``, ``connections``
(total accepted), ``requests`` (total), ``by_mode``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BATCH = re.compile(r'"gateway_query", "(\d+)"')
MODES = ("ok", "nan", "warnings", "hang", "slow", "bad_data", "execution", "timeout", "internal",
         "html", "truncated", "huge")
REASONS = {200: "OK", 400: "Bad Request", 422: "Unprocessable Entity", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parse_form(body: bytes) -> dict[str, str]:
    from urllib.parse import parse_qs

    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


class FakePrometheus:
    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.value = "1"
        self.huge_bytes = 4 * 1024 * 1024
        self.open_connections = 0
        self.max_open_connections = 0
        self.connections = 0
        self.requests = 0
        self.by_mode: dict[str, int] = {}
        self.last_form: dict[str, str] = {}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakePrometheus:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-prometheus", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Prometheus did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    @contextmanager
    def in_mode(self, mode: str, **attrs: Any) -> Iterator[FakePrometheus]:
        old = {k: getattr(self, k) for k in attrs} | {"mode": self.mode}
        self.mode = mode
        for k, v in attrs.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)

    # -- HTTP ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        self.max_open_connections = max(self.max_open_connections, self.open_connections)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if ":" in line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                self.requests += 1
                mode = self.mode
                self.by_mode[mode] = self.by_mode.get(mode, 0) + 1
                self.last_form = _parse_form(body)
                if not await self._answer(mode, writer, reader):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    ctype: str = "application/json", length: int | None = None) -> None:
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'X')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode()
        writer.write(head + body)
        await writer.drain()

    def _vector(self, extra: dict[str, Any] | None = None) -> bytes:
        parts = BATCH.findall(self.last_form.get("query", "")) or [None]
        values = {"nan": ["NaN", "+Inf", "-Inf"]}.get(self.mode, [self.value])
        result = []
        for i, part in enumerate(parts):
            metric = {"gateway_query": part} if part is not None else {}
            result.append({"metric": metric, "value": [1.7e9, values[i % len(values)]]})
        doc = {"status": "success", "data": {"resultType": "vector", "result": result}, **(extra or {})}
        return json.dumps(doc).encode()

    async def _answer(self, mode: str, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        """Answer one request; False closes the connection."""
        if mode in ("ok", "nan"):
            await self._send(writer, 200, self._vector())
        elif mode == "warnings":
            await self._send(writer, 200, self._vector({"warnings": ["fake warning: partial data"],
                                                        "infos": ["fake info: maybe a counter"]}))
        elif mode == "slow":
            await asyncio.sleep(self.delay)
            await self._send(writer, 200, self._vector())
        elif mode == "hang":
            await reader.read()  # until the client gives up and closes
            return False
        elif mode in ("bad_data", "execution", "timeout", "internal"):
            status = {"bad_data": 400, "execution": 422, "timeout": 503, "internal": 500}[mode]
            doc = {"status": "error", "errorType": mode, "error": f"fake {mode} error"}
            await self._send(writer, status, json.dumps(doc).encode())
        elif mode == "html":
            await self._send(writer, 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                             "text/html")
        elif mode == "truncated":
            body = self._vector()
            await self._send(writer, 200, body[: len(body) // 2], length=len(body))
            return False
        elif mode == "huge":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head)
            chunk = b" " * 65536
            sent = 0
            while sent < self.huge_bytes:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent += len(chunk)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return True
