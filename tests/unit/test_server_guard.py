"""The connection guard's rules, on a real uvicorn server in a thread (loopback sockets).

At the cap a new connection closes the oldest connection with no request in
flight; when every connection has a request in flight the new one is refused and
the busy ones finish; the open-file limit bounds the cap.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from app.ops.server import CONNECTIONS_CLOSED, ConnectionGuard, GuardedH11Protocol, connection_cap
from tests.support.procs import free_port, wait_until

RELEASE = threading.Event()


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.to_thread(RELEASE.wait, 5)
    return PlainTextResponse("done")


async def fast(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@dataclass
class Running:
    port: int
    guard: ConnectionGuard


def _serve(cap: int, read_timeout: float) -> Iterator[Running]:
    guard = ConnectionGuard(cap, read_timeout)
    port = free_port()
    app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning",
                            http=GuardedH11Protocol.bound(guard), lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, interval=0.02, what="uvicorn started")
    try:
        yield Running(port, guard)
    finally:
        RELEASE.set()
        server.should_exit = True
        thread.join(10)
        RELEASE.clear()


@pytest.fixture
def capped() -> Iterator[Running]:
    yield from _serve(cap=3, read_timeout=30.0)


def _connect(port: int, request: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    if request:
        s.sendall(request)
    return s


def _closed(s: socket.socket, within: float = 2.0) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _answer(s: socket.socket, until: bytes) -> bytes:
    """Read until `until` shows up (a response may come in several segments), 3 s at most."""
    s.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + 3
    while until not in got and time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    return got


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def _closed_count(reason: str) -> float:
    return CONNECTIONS_CLOSED.labels(reason)._value.get()


def test_at_the_cap_the_oldest_idle_connection_makes_room(capped: Running) -> None:
    evicted_before = _closed_count("evicted")
    idle = _connect(capped.port, b"GET /fast HTTP/1.1\r\n")  # half a head: idle
    busy1 = _connect(capped.port, _get("/slow"))
    busy2 = _connect(capped.port, _get("/slow"))
    wait_until(lambda: len(capped.guard.open) == 3, 5, interval=0.02, what="3 connections")
    newcomer = _connect(capped.port, _get("/fast"))
    assert _closed(idle), "the idle connection should have been closed to make room"
    assert b"200 OK" in _answer(newcomer, b"200 OK")
    assert _closed_count("evicted") - evicted_before == 1
    RELEASE.set()
    for s in (busy1, busy2):
        assert b"done" in _answer(s, b"done")
    for s in (idle, busy1, busy2, newcomer):
        s.close()


def test_when_every_connection_is_busy_the_new_one_is_refused(capped: Running) -> None:
    refused_before = _closed_count("refused")
    busy = [_connect(capped.port, _get("/slow")) for _ in range(3)]
    wait_until(lambda: len(capped.guard.open) == 3 and not any(p.idle for p in capped.guard.open),
               5, interval=0.02, what="3 busy connections")
    newcomer = _connect(capped.port, _get("/fast"))
    assert _closed(newcomer)
    assert _closed_count("refused") - refused_before == 1
    RELEASE.set()
    for s in busy:
        assert b"done" in _answer(s, b"done")
        s.close()
    newcomer.close()


def test_read_timeout_answers_408_to_a_partial_request_and_closes_a_silent_one() -> None:
    for running in _serve(cap=10, read_timeout=0.3):
        partial = _connect(running.port, b"GET /fast HTTP/1.1\r\nHost: x\r\n")
        silent = _connect(running.port)
        t0 = time.monotonic()
        assert _answer(partial, b"408").startswith(b"HTTP/1.1 408 ")
        assert _closed(silent)
        assert time.monotonic() - t0 < 2
        partial.close()
        silent.close()


def test_the_cap_leaves_room_below_the_open_file_limit() -> None:
    assert connection_cap(1000, nofile_soft=1024, in_use=30) == 1024 - 30 - 128
    assert connection_cap(100, nofile_soft=1024, in_use=30) == 100
    assert connection_cap(1000, nofile_soft=160, in_use=40) == 160 - 40 - 32
    assert connection_cap(1000, nofile_soft=50, in_use=40) == 1
