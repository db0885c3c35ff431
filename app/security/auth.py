"""Bearer-token access control and request-size limits, as one pure ASGI middleware.

Rules (every HTTP request, before any route runs):

1. Size limits, on every path: a path longer than ``MAX_PATH_BYTES`` or a query
   string longer than ``MAX_QUERY_STRING_BYTES`` gets 414; a body larger than
   ``MAX_REQUEST_BODY_BYTES`` gets 413 (by Content-Length at once, or counted as
   a chunked body is read); a malformed Content-Length gets 400; so does a request
   with both Content-Length and Transfer-Encoding, with ``Connection: close``
   (RFC 9112 section 6.1: the framing is ambiguous -- the request smuggling shape --
   so the connection must not be reused). All as JSON.
2. Access control, when ``API_TOKENS`` or ``API_TOKENS_FILE`` is set, on
   ``/prometheus``, ``/vrops`` and ``/api`` (the Prometheus API) and everything below them: the request needs
   ``Authorization: Bearer <token>`` with one of the configured tokens. Missing
   (or not a Bearer credential): 401; present but wrong: 403. Both JSON, both
   with ``WWW-Authenticate: Bearer realm="gateway"`` (plus
   ``error="invalid_token"`` for 403) and ``Cache-Control: no-store``.
   The provided token is hashed (SHA-256) and compared with
   ``hmac.compare_digest`` against the hash of *every* configured token, no early
   exit, so neither which token matched nor the tokens' lengths show in timing.
   Tokens are accepted only in the Authorization header: never in the query
   string (it ends up in access logs, browser history and Referer headers) and
   never from cookies (no CSRF surface).
3. Tenants: a token configured with a scope (``API_TOKENS`` as a JSON object, see
   ``app.common.tenancy`` and docs/tenants.md) is resolved to its ``Tenant``, which
   is put into the ASGI scope for the routes (``tenant_of(request)``); the figure
   routes and the query API enforce it. A scoped token is refused (403,
   ``error="forbidden"``) on protected paths outside ``TENANT_PREFIXES`` (``/vrops``):
   their data carries no tenant labels, so they cannot be confined.
4. Accept headers whose ``version=`` parameter is not a dotted number lose that
   parameter (see ``sanitize_accept``: prometheus_client would answer them with a 500).
5. Open: ``/health``, ``/ready`` (orchestrators call them without secrets),
   ``/metrics`` (its own ``METRICS_TOKEN``, see app/monitoring), ``/status`` and
   its assets (static files with no data in them; the figures come from
   ``/prometheus/metrics/summary``, which *is* protected: see "Status page"
   below), and the OpenAPI document (``/openapi.json``: it holds no secret).

Status page: with tokens configured, the page loads but its browser-side fetch of
the summary must carry ``Authorization: Bearer <token>`` like any other client;
there is deliberately no same-origin exemption (any page or curl can claim the
Origin) and no ``?token=`` (leaks into logs and history). Deployments that show
the page to people without tokens put it behind a proxy that injects the header
for authenticated users.

Nothing here logs, counts or echoes a token: error bodies name only what was
missing, and the one start-up line gives the number of tokens, not their values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.common.clients import with_client
from app.common.exposition import sanitize_accept
from app.common.paths import route_path
from app.common.secrets import bearer_token, token_index
from app.common.tenancy import with_tenant
from app.security.settings import SecuritySettings, TokenSource

log = logging.getLogger("gateway.security")

PROTECTED_PREFIXES: tuple[str, ...] = ("/prometheus", "/vrops", "/api")
# Where a scoped (tenant) token may go: the routes that enforce a Tenant.
TENANT_PREFIXES: tuple[str, ...] = ("/prometheus", "/api")
REALM = 'Bearer realm="gateway"'


def _sanitized_scope(scope: Scope) -> Scope:
    headers = scope.get("headers", ())
    new_headers = None
    for i, (name, value) in enumerate(headers):
        if name == b"accept":
            clean = sanitize_accept(value)
            if clean is not None:
                if new_headers is None:
                    new_headers = list(headers)
                new_headers[i] = (name, clean)
    if new_headers is None:
        return scope
    return {**scope, "headers": new_headers}


class _BodyTooLarge(Exception):
    pass


def is_protected(path: str, prefixes: tuple[str, ...] = PROTECTED_PREFIXES) -> bool:
    """True for each prefix itself and everything below it (segment boundary, any case)."""
    p = path.lower()
    return any(p == pre or p.startswith(pre + "/") for pre in prefixes)


def bearer_credentials(scope: Scope) -> bytes | None:
    """The token of the first Authorization header if it is a Bearer credential."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return bearer_token(value)
    return None


def token_allowed(provided: bytes, tokens: list[bytes]) -> bool:
    """Constant-time membership (see ``app.common.secrets.token_index``)."""
    return token_index(provided, tokens) is not None


def _json_response(status: int, error: str, detail: str,
                   extra: dict[str, str] | None = None) -> tuple[Message, Message]:
    body = json.dumps({"error": error, "detail": detail, "status_code": status}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """Pure ASGI: size limits for every request, bearer tokens for the protected prefixes."""

    def __init__(self, app: ASGIApp, settings: SecuritySettings | None = None,
                 tokens: TokenSource | None = None,
                 protected_prefixes: tuple[str, ...] = PROTECTED_PREFIXES) -> None:
        self.app = app
        self.settings = settings or SecuritySettings()
        self.tokens = tokens or TokenSource(self.settings)
        self.prefixes = protected_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self.tokens.enabled and is_protected(route_path(scope), self.prefixes):
                refused, scope = self._granted(scope)
                if refused is not None:
                    await send({"type": "websocket.close", "code": 1008})
                    return
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        rejection = self._check_limits(scope)
        if rejection is None and self.tokens.enabled and is_protected(route_path(scope), self.prefixes):
            rejection, scope = self._granted(scope)
        if rejection is not None:
            for message in rejection:
                await send(message)
            return

        scope = _sanitized_scope(scope)
        if not self._may_have_body(scope):
            await self.app(scope, receive, send)
            return
        await self._call_counting_body(scope, receive, send)

    # -- limits -------------------------------------------------------------------------

    def _check_limits(self, scope: Scope) -> tuple[Message, Message] | None:
        s = self.settings
        raw_path = scope.get("raw_path") or scope.get("path", "").encode()
        if len(raw_path) > s.max_path_bytes:
            return _json_response(414, "uri_too_long", f"path longer than {s.max_path_bytes} bytes")
        if len(scope.get("query_string", b"")) > s.max_query_string_bytes:
            return _json_response(414, "uri_too_long",
                                  f"query string longer than {s.max_query_string_bytes} bytes")
        headers = scope.get("headers", ())
        names = {name for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            return _json_response(400, "bad_request",
                                  "both Content-Length and Transfer-Encoding: ambiguous framing refused",
                                  {"Connection": "close"})
        for name, value in headers:
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18:
                    return _json_response(400, "bad_request", "malformed Content-Length")
                if int(value) > s.max_request_body_bytes:
                    return _json_response(413, "payload_too_large",
                                          f"request body larger than {s.max_request_body_bytes} bytes")
        return None

    @staticmethod
    def _may_have_body(scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return True
        return False

    async def _call_counting_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.settings.max_request_body_bytes
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            for message in _json_response(413, "payload_too_large",
                                          f"request body larger than {limit} bytes"):
                await send(message)

    # -- tokens -------------------------------------------------------------------------

    def _granted(self, scope: Scope) -> tuple[tuple[Message, Message] | None, Scope]:
        """(rejection or None, the scope carrying the token's tenant and client)."""
        provided = bearer_credentials(scope)
        if provided is None:
            return _json_response(401, "unauthorized",
                                  "this API needs an 'Authorization: Bearer <token>' header",
                                  {"WWW-Authenticate": REALM}), scope
        tokens, tenants = self.tokens.grants()
        index = token_index(provided, tokens)
        if index is None:
            return _json_response(403, "forbidden", "the bearer token is not accepted",
                                  {"WWW-Authenticate": REALM + ', error="invalid_token"'}), scope
        tenant = tenants[index]
        if tenant.scoped and not is_protected(route_path(scope), TENANT_PREFIXES):
            return _json_response(403, "forbidden", "this token is confined to a tenant; this path "
                                  "serves data without tenant labels"), scope
        return None, with_client(with_tenant(scope, tenant), self.tokens.client_at(index))


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"},
                   "status_code": {"type": "integer"}},
    "required": ["error", "detail"],
}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


def _document_security(app: FastAPI, prefixes: tuple[str, ...], auth: bool) -> None:
    """Declare the limits' answers (every operation) and, with tokens, the bearer scheme
    (protected operations) in the OpenAPI document. No token value, ever."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema and app.openapi_schema.get("x-security-documented"):
            return app.openapi_schema
        schema = original()
        if auth:
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearerAuth"] = {
                "type": "http", "scheme": "bearer",
                "description": "One of API_TOKENS / API_TOKENS_FILE. 401 when missing, 403 when wrong.",
            }
        for path, item in schema.get("paths", {}).items():
            for op in item.values():
                if not isinstance(op, dict):
                    continue
                responses = op.setdefault("responses", {})
                responses.setdefault("400", _error_response(
                    "Malformed Content-Length, or both Content-Length and Transfer-Encoding"))
                responses.setdefault("413", _error_response("Request body too large"))
                responses.setdefault("414", _error_response("Path or query string too long"))
                if auth and is_protected(path, prefixes):
                    op["security"] = [{"bearerAuth": []}]
                    responses.setdefault("401", _error_response("Missing bearer token"))
                    responses.setdefault("403", _error_response("Bearer token not accepted"))
        schema["x-security-documented"] = True
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_security(app: FastAPI, settings: SecuritySettings | None = None) -> SecuritySettings:
    """Add the security middleware (and CORS when origins are listed) to ``app``.

    Call it before ``install_monitoring(app)`` so that rejected requests are still
    counted by the HTTP metrics (the monitoring middleware then wraps this one).
    Idempotent per app. Returns the settings in force.
    """
    if getattr(app.state, "security_installed", False):
        installed: SecuritySettings = app.state.security_settings
        return installed
    settings = settings or SecuritySettings()
    tokens = TokenSource(settings)
    app.add_middleware(SecurityMiddleware, settings=settings, tokens=tokens)
    if settings.cors_allow_origins:
        # Added after, so it wraps the security middleware: preflights are answered
        # without a token (browsers never send one on a preflight).
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", "Accept"],
            allow_credentials=False,
            max_age=600,
        )
    _document_security(app, PROTECTED_PREFIXES, tokens.enabled)
    app.state.security_installed = True
    app.state.security_settings = settings
    log.info("API access control %s (%d token(s) in API_TOKENS, %d of them scoped to a tenant, file %s); "
             "CORS origins: %s", "enabled" if tokens.enabled else "disabled (no API_TOKENS)",
             len(settings.api_tokens), sum(t.scoped for t in settings.token_tenants()),
             settings.api_tokens_file or "none", ", ".join(settings.cors_allow_origins) or "none")
    return settings
