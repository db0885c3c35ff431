"""Figure answers served before FastAPI's routing: memoized bodies as bytes, and a cold
/summary.

A warm ``/summary`` is a memoized body (ResponseMemo); what it costs is the stack
around it. Measured on the 2-core dev machine (direct ASGI calls): a bare FastAPI
route ~37 us, the warm ``/summary`` route ~62 us, of which FastAPI's router,
exception and exit-stack middleware, dependency solving and Response building are
~50 us. This pure ASGI middleware, installed *inside* the security and HTTP-metrics
middleware (so tokens, limits and request metrics apply unchanged), answers a
figure request whose body is memoized straight from the memo: ~13 us.

Only requests whose answer the route would take from the memo anyway: GET, no
query string (no filters, no ``format=``), a figure route, a body in the memo.
And a cold ``/summary`` (GET, no query string), which takes no parameters at all: it
is answered here by the service call its route makes (`GatewayService.summary_answer`),
which saves the route's ~0.1 ms of a few-millisecond cold request (docs/benchmarks.md).
Everything else, and every other miss, goes on to the routes, which fill the memo.
Keys and the JSON-or-text choice come from here for both (`memo_key`, `kind_of`),
so the two can never disagree about what a memoized body answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from app.common import tracing
from app.common.exposition import negotiate, wants_json
from app.common.paths import route_path
from app.common.tenancy import TENANT_SCOPE_KEY, UNCONFINED, Tenant
from app.gateway.catalog.model import CATEGORIES
from app.gateway.service import SUMMARY_MEMO_KEY, GatewayService

MemoKey = tuple[str, ...]
# The scope key under which the fast path leaves the full memo key it looked up and
# missed, so the route does not ask the memo again for the same key (`missed`).
MISSED_SCOPE_KEY = "gateway.memo_missed"


def kind_of(accept: str | None, fmt: str | None) -> str:
    """"json", or the content type the exposition encoder picks for `accept`."""
    return "json" if wants_json(accept, fmt) else negotiate(accept)[1]


def memo_key(name: str, kind: str | None, filters: Mapping[str, Sequence[str]] | None = None) -> MemoKey:
    """The memo key of a figure route's answer: route name, kind, filters."""
    if name == "summary":
        return SUMMARY_MEMO_KEY
    return (name, kind or "", *(f"{k}={','.join(v)}" for k, v in sorted((filters or {}).items())))


class MemoFastPath:
    """Pure ASGI: answer memoized figure bodies without routing. The service is the
    one the gateway router's lifespan put in ``app.state.gateway``."""

    def __init__(self, app: ASGIApp, prefix: str = "/prometheus/metrics") -> None:
        self.app = app
        self.prefix = prefix.rstrip("/") + "/"
        self._names = frozenset(("summary", "all", *CATEGORIES))

    def _key(self, scope: Scope) -> MemoKey | None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("query_string"):
            return None
        path = route_path(scope)
        if not path.startswith(self.prefix):
            return None
        name = path[len(self.prefix):]
        if name not in self._names:
            return None
        if name == "summary":
            return memo_key(name, None)
        accept = None
        for header, value in scope.get("headers", ()):
            if header == b"accept":
                accept = value.decode("latin-1")
                break
        return memo_key(name, kind_of(accept, None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self._key(scope)
        if key is not None:
            app = scope.get("app")
            service = getattr(getattr(app, "state", None), "gateway", None)
            # Memo keys lead with the caller's tenant id (what the security middleware
            # resolved the token to): one tenant's body is never another's.
            tenant = scope.get(TENANT_SCOPE_KEY)
            tenant_id = tenant.id if isinstance(tenant, Tenant) else UNCONFINED.id
            hit = service.memo.get((tenant_id, *key)) if service is not None else None
            if hit is not None:
                tracing.count_lookup("memo")
                await _send_body(send, *hit)
                return
            if isinstance(service, GatewayService):
                if key == SUMMARY_MEMO_KEY:
                    # A cold /summary takes no parameters: answered here, by the same
                    # service call as its route, without routing or dependency solving.
                    rendered = await service.summary_answer(tenant if isinstance(tenant, Tenant) else UNCONFINED)
                    await _send_body(send, rendered.body, rendered.media_type)
                    return
                scope[MISSED_SCOPE_KEY] = (tenant_id, *key)
        await self.app(scope, receive, send)


async def _send_body(send: Send, body: bytes, media_type: str) -> None:
    if media_type.startswith("text/") and "charset=" not in media_type.lower():
        media_type += "; charset=utf-8"  # as starlette's Response says it
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", media_type.encode("latin-1")),
    ]})
    await send({"type": "http.response.body", "body": body})


def missed(scope: Scope, tenant_id: str, key: MemoKey) -> bool:
    """Did the fast path just ask the memo for this very key, and miss? (Then the route
    need not ask again: one lookup per miss.)"""
    return scope.get(MISSED_SCOPE_KEY) == (tenant_id, *key)
