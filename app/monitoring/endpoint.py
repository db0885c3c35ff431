"""GET /metrics: the service's own metrics in Prometheus or OpenMetrics text.

- Content negotiation by prometheus_client's ``choose_encoder``: text 0.0.4 by
  default, OpenMetrics when the Accept header asks for it.
- gzip when Accept-Encoding allows it (Prometheus always does).
- Optional bearer token, separate from any API auth: compared in constant
  time; a missing or wrong token gets a 401 JSON body with WWW-Authenticate.
- Collecting, encoding, compressing (and in multiprocess mode merging every
  worker's files) happen in a worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.common.secrets import bearer_token, token_matches
from app.monitoring.registry import Rendered, render

TokenProvider = Callable[[], str | None]
METRICS_PATH = "/metrics"
_REALM = 'Bearer realm="metrics"'


def _unauthorized(authorization: str | None) -> Response:
    if bearer_token(authorization) is None:
        challenge, detail = _REALM, "a bearer token is required for /metrics"
    else:
        challenge, detail = _REALM + ', error="invalid_token"', "invalid metrics token"
    return JSONResponse(
        {"error": "unauthorized", "detail": detail},
        status_code=401,
        headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"},
    )


def _scrape(
    token_provider: TokenProvider, authorization: str | None, accept: str | None,
    accept_encoding: str | None,
) -> Rendered | None:
    """Check the token and render; None means unauthorized. Blocking (thread)."""
    expected = token_provider()
    if expected and not token_matches(expected, authorization):
        return None
    return render(accept, accept_encoding)


Endpoint = Callable[[Request], Awaitable[Response]]


def make_metrics_endpoint(token_provider: TokenProvider) -> Endpoint:
    """The Starlette endpoint serving /metrics, protected by ``token_provider()`` if set."""

    async def metrics(request: Request) -> Response:
        headers = request.headers
        authorization = headers.get("authorization")
        rendered = await run_in_threadpool(
            _scrape, token_provider, authorization, headers.get("accept"),
            headers.get("accept-encoding"),
        )
        if rendered is None:
            return _unauthorized(authorization)
        response_headers = {
            "Content-Type": rendered.content_type,
            "Cache-Control": "no-store",
            "Vary": "Accept, Accept-Encoding",
        }
        if rendered.gzipped:
            response_headers["Content-Encoding"] = "gzip"
        return Response(rendered.body, status_code=200, headers=response_headers)

    metrics.__name__ = "metrics"
    return metrics
