"""The HTTP server's own limits: every connection costs a file descriptor, so none is free.

Stock uvicorn (and the gunicorn ``UvicornWorker``) holds a connection that never
completes its request for ever: it has no header-read timeout, the keep-alive timer
starts only after a first response, and gunicorn's ``worker_connections`` is not
passed on. Two hundred slowloris clients and a hundred silent sockets stayed open
for good; at the open-file limit asyncio's ``accept()`` failed and logged a
traceback per attempt (240,000 lines in 18 s), and the service stopped answering.

This module is the designed answer, used by ``gunicorn.conf.py``
(``worker_class = "app.ops.server.GatewayUvicornWorker"``):

- **Request read timeout** (``HTTP_REQUEST_READ_TIMEOUT_SECONDS``, default 10 s):
  a client has that long to send a complete request -- head and body -- counted
  from the moment it connects, or from its first byte on a kept-alive connection.
  Then the connection is closed (``408`` when part of a request had arrived).
  Idle kept-alive connections are uvicorn's keep-alive timeout's (gunicorn
  ``keepalive``).
- **Connection cap per worker**: gunicorn's ``worker_connections`` (or
  ``HTTP_MAX_CONNECTIONS``), and never more than the open-file limit leaves room
  for (an eighth of it, at least 32, stays for Redis, Prometheus, files). At the
  cap a new connection closes the *oldest connection with no request in flight*
  (a slow or silent client, or an idle kept-alive one, which clients retry) and
  takes its place; when every connection has a request in flight, the new one is
  closed at once. So a flood of held sockets can delay, never lock out, clients.
  uvicorn's ``limit_concurrency`` is deliberately not used: it counts idle
  connections too and would answer ``503`` to every real request while held
  sockets fill it.
- **Head size**: ``HTTP_MAX_HEAD_BYTES`` (default 16 KiB) bounds what h11 buffers
  while waiting for a request head; larger heads get 400 and a close.
- **accept() out of resources** (EMFILE, ENFILE, ENOBUFS, ENOMEM): the event
  loop's exception handler turns asyncio's traceback per failed accept into one
  log line per episode plus ``metrics_gateway_http_accept_errors_total{reason}``,
  and closes the oldest idle connections so accepting can resume.

Each kind of closure is counted in
``metrics_gateway_http_connections_closed_total{reason}`` (``read_timeout``,
``evicted``, ``refused``) and logged once per episode (an episode ends after
30 s without another).

The worker pins asyncio's event loop and h11 (not the uvloop and httptools the
package also installs, for plain ``uvicorn`` runs): the loop's accept() error
path and h11's connection states are part of what is handled here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
from typing import Any, ClassVar

import h11
from prometheus_client import Counter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.common.episodes import FailureEpisode

try:  # uvicorn.workers is deprecated in favour of the uvicorn-worker package
    from uvicorn_worker import UvicornWorker
except ImportError:  # pragma: no cover
    from uvicorn.workers import UvicornWorker

log = logging.getLogger("gateway.server")

CONNECTIONS_CLOSED = Counter(
    "metrics_gateway_http_connections_closed_total",
    "Client connections the server closed on its own: read_timeout (no complete request "
    "in time), evicted (idle, to make room at the connection cap), refused (cap reached, "
    "every connection busy).",
    ["reason"],
)
ACCEPT_ERRORS = Counter(
    "metrics_gateway_http_accept_errors_total",
    "accept() calls that failed for lack of a system resource (EMFILE: the open-file "
    "limit), by errno name.",
    ["reason"],
)

_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_QUIET_SECONDS = 30.0
_REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"connection: close\r\ncontent-length: 29\r\n\r\nrequest not received in time\n")


class ServerSettings(BaseSettings):
    """Per-worker connection limits (environment variables of the same name)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    http_request_read_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    http_max_connections: int = Field(default=0, ge=0)  # 0: gunicorn's worker_connections
    http_max_head_bytes: int = Field(default=16384, ge=1024, le=1024 * 1024)


def open_fds() -> int:
    """File descriptors this process has open now (0 where /proc is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_cap(wanted: int, nofile_soft: int | None = None, in_use: int | None = None) -> int:
    """`wanted` connections, but never more than the open-file limit leaves room for.

    Room = the limit, minus what the process already holds (`in_use`: imports,
    logs, the listening socket, metric files), minus a reserve for what it opens
    while serving (Redis and Prometheus connections, metric files): an eighth of
    the limit, at least 32.
    """
    if nofile_soft is None:
        nofile_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile_soft == resource.RLIM_INFINITY or nofile_soft <= 0:
        return max(1, wanted)
    if in_use is None:
        in_use = open_fds()
    reserve = max(32, nofile_soft // 8)
    return max(1, min(wanted, nofile_soft - in_use - reserve))


class QuietEpisode:
    """A FailureEpisode that ends after `quiet` seconds without a new event.

    For events with no natural "success" (a slow client timed out, an idle
    connection evicted): one line when they start, one when they stop.
    """

    def __init__(self, name: str, quiet: float = _QUIET_SECONDS) -> None:
        self.episode = FailureEpisode(name, log)
        self.quiet = quiet
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def event(self, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        self._last = loop.time()
        self.episode.failure(reason)
        if self._timer is None:
            self._timer = loop.call_later(self.quiet, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        idle = loop.time() - self._last
        if idle >= self.quiet:
            self._timer = None
            self.episode.success()
        else:
            self._timer = loop.call_later(self.quiet - idle, self._check, loop)


class ConnectionGuard:
    """One worker's open connections: the cap, eviction order and the episodes."""

    def __init__(self, max_connections: int, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.open: dict[GuardedH11Protocol, None] = {}  # insertion order = age
        self.timeouts = QuietEpisode(f"HTTP clients not sending a complete request within {read_timeout:g}s")
        self.full = QuietEpisode("HTTP connection cap")
        self.accept = QuietEpisode("HTTP accept()")
        self._last_shed = float("-inf")
        self.set_cap(max_connections)

    def set_cap(self, max_connections: int) -> None:
        self.max_connections = max(1, max_connections)
        self.full.episode.name = f"HTTP connection cap ({self.max_connections} per worker)"

    def admit(self, proto: GuardedH11Protocol) -> bool:
        """Make room for a new connection; False when there is none (every one busy)."""
        if len(self.open) >= self.max_connections:
            victim = next((p for p in self.open if p.idle), None)
            if victim is None:
                CONNECTIONS_CLOSED.labels("refused").inc()
                self.full.event(proto.loop, "every connection has a request in flight; refusing new ones")
                return False
            CONNECTIONS_CLOSED.labels("evicted").inc()
            self.full.event(proto.loop, "closing the oldest idle connections to admit new ones")
            victim.close_quietly()
        self.open[proto] = None
        return True

    def release(self, proto: GuardedH11Protocol) -> None:
        self.open.pop(proto, None)

    def shed(self, count: int) -> int:
        """Close up to `count` of the oldest idle connections (frees file descriptors)."""
        victims = [p for p in self.open if p.idle][:count]
        for p in victims:
            CONNECTIONS_CLOSED.labels("evicted").inc()
            p.close_quietly()
        return len(victims)

    def timed_out(self, proto: GuardedH11Protocol) -> None:
        CONNECTIONS_CLOSED.labels("read_timeout").inc()
        self.timeouts.event(proto.loop, "closing their connections (slow or silent clients)")

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Loop exception handler: accept() resource errors become one line per episode."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS and "accept" in str(
                context.get("message", "")):
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            try:
                ACCEPT_ERRORS.labels(name).inc()
            except OSError:
                pass  # a metric file could not be opened: the very shortage being reported
            self.accept.event(loop, f"{name} ({exc.strerror}); {len(self.open)} connections open, "
                                    f"closing idle ones to make room")
            # asyncio calls this once per failed accept, up to `backlog` times in one
            # tick: shed a tenth of the idle connections at most twice a second.
            if loop.time() - self._last_shed >= 0.5:
                self._last_shed = loop.time()
                self.shed(max(1, len(self.open) // 10))
            return
        loop.default_exception_handler(context)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the request read timeout and the connection cap.

    Bind a guard with :meth:`bound`; unbound (``uvicorn --http
    app.ops.server:GuardedH11Protocol``) it uses one made from ServerSettings.
    """

    guard: ClassVar[ConnectionGuard | None] = None

    @classmethod
    def bound(cls, guard: ConnectionGuard) -> type[GuardedH11Protocol]:
        return type("GuardedH11Protocol", (cls,), {"guard": guard})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self).guard is None:
            s = ServerSettings()
            type(self).guard = ConnectionGuard(connection_cap(s.http_max_connections or 1000),
                                               s.http_request_read_timeout_seconds)
        self._guard: ConnectionGuard = type(self).guard  # type: ignore[assignment]
        self._read_timer: asyncio.TimerHandle | None = None
        self._got_bytes = False

    @property
    def idle(self) -> bool:
        """No request in flight: waiting for (the rest of) a head, or kept alive."""
        return (not self.transport.is_closing()
                and (self.cycle is None or self.cycle.response_complete))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._guard.admit(self):
            transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)
        if self._owes_request():
            self._arm()  # from the first byte: trickling more does not buy time
        else:
            self._disarm()
            self._got_bytes = False

    def _owes_request(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self._guard.read_timeout, self._read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timeout(self) -> None:
        self._read_timer = None
        if not self._owes_request():
            return
        if self.conn.their_state is h11.IDLE and self.cycle is not None and not self._got_bytes:
            return  # kept alive with no new bytes: the keep-alive timer's business
        self._guard.timed_out(self)
        if self._got_bytes and self.conn.our_state is h11.IDLE:
            self.transport.write(_REQUEST_TIMEOUT_RESPONSE)
        self.transport.close()

    def close_quietly(self) -> None:
        """Close an idle connection (eviction): no response, nothing in flight."""
        self._disarm()
        self._guard.release(self)
        self.transport.close()


class GatewayUvicornWorker(UvicornWorker):  # type: ignore[misc]
    """gunicorn's uvicorn worker with the limits above, from gunicorn's own settings.

    ``worker_connections`` -> the connection cap, ``backlog`` -> listen backlog,
    ``keepalive`` -> keep-alive timeout; ``HTTP_REQUEST_READ_TIMEOUT_SECONDS``,
    ``HTTP_MAX_CONNECTIONS`` and ``HTTP_MAX_HEAD_BYTES`` from the environment.
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "asyncio", "http": "h11"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = ServerSettings()
        self.server_settings = settings
        wanted = settings.http_max_connections or int(self.cfg.worker_connections)
        # Built in the master (fork copies it); the cap is computed in the worker,
        # whose open-file limit is what counts.
        self.guard = ConnectionGuard(wanted, settings.http_request_read_timeout_seconds)
        self.config.http = GuardedH11Protocol.bound(self.guard)
        self.config.h11_max_incomplete_event_size = settings.http_max_head_bytes
        self.config.limit_concurrency = None

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        wanted = self.guard.max_connections
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = open_fds()
        self.guard.set_cap(connection_cap(wanted, nofile, in_use))
        loop.set_exception_handler(self.guard.exception_handler)
        # Create every series now: in multiprocess mode the first one opens this
        # worker's metric file, which must not wait for the moment fds run out.
        for reason in ("read_timeout", "evicted", "refused"):
            CONNECTIONS_CLOSED.labels(reason)
        for code in sorted(_RESOURCE_ERRNOS):
            ACCEPT_ERRORS.labels(errno.errorcode[code])
        log.info("HTTP limits: %d connections per worker (worker_connections/HTTP_MAX_CONNECTIONS=%d, "
                 "open-file limit %d, %d in use), request read timeout %gs, keep-alive %ss, head <= %d bytes",
                 self.guard.max_connections, wanted, nofile, in_use, self.guard.read_timeout,
                 self.config.timeout_keep_alive, self.server_settings.http_max_head_bytes)
        await super()._serve()
