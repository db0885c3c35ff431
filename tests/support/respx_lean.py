"""respx for the gateway's own upstream transport (app/gateway/upstream/transport.py).

respx's default mocker patches httpcore's pools; the gateway's upstream client speaks
through `LeanTransport`, whose `handle_async_request` takes and returns httpx's own
types. This mocker patches both, so `respx.mock` keeps mocking every httpx client the
tests build (the TestClient's in-process transport is left alone, as before).
Registered as respx's default by tests/conftest.py.
"""

from __future__ import annotations

from typing import Any

import httpx
from respx.mocks import HTTPCoreMocker

from app.gateway.upstream.transport import LeanTransport


class LeanAndHttpcoreMocker(HTTPCoreMocker):
    name = "httpcore+lean"
    targets = [*HTTPCoreMocker.targets, "app.gateway.upstream.transport.LeanTransport"]

    @classmethod
    def to_httpx_request(cls, **kwargs: Any) -> httpx.Request:
        request = kwargs["request"]
        if isinstance(request, httpx.Request):
            return request
        return super().to_httpx_request(**kwargs)  # type: ignore[no-any-return]

    @classmethod
    async def prepare_async_request(cls, httpx_request: httpx.Request, **kwargs: Any) -> tuple[httpx.Request, Any]:
        await httpx_request.aread()
        if not isinstance(kwargs["request"], httpx.Request):
            kwargs["request"].stream = httpx_request.stream
        return httpx_request, kwargs

    @classmethod
    async def from_async_httpx_response(cls, httpx_response: httpx.Response, target: Any, **kwargs: Any) -> Any:
        if isinstance(target, LeanTransport):
            return httpx_response
        return super().from_sync_httpx_response(httpx_response, target, **kwargs)
