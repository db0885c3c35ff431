"""One answer for the whole fleet: the query API's lock and hand-over through the shared tier."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from app.common import tracing
from app.gateway.caching.shared import ALONE
from app.gateway.caching.shared_ranges import SharedAnswer, SharedFlights
from app.gateway.engines.passthrough import count
from app.gateway.result import ApiResult, Lookup, UpstreamFailure
from app.gateway.upstream.answers import UpstreamError


class FleetAnswer:
    """Identical range or instant queries across the fleet answered by one process
    (``answer``); without a shared tier each process answers alone."""

    def __init__(self, fleet: SharedFlights | None) -> None:
        self.fleet = fleet

    async def answer(self, key: str, deadline: float, total: int,
                     make: Callable[[], Coroutine[Any, Any, ApiResult]], category: str = "range") -> ApiResult:
        """One process of the fleet answers a request; the others wait for its answer.

        Without the shared tier, or when it fails, this process answers alone (as a
        single process does). A holder that dies blocks the others for at most one
        lease (one of them takes over); a failure reaches that flight's waiters only.
        An instant answer travels with its evaluation time (``<ms>\n`` before the body).
        """
        fleet = self.fleet
        if fleet is None or not fleet.available:
            return await make()
        loop = asyncio.get_running_loop()
        with tracing.span("shared tier claim"):
            claim = await fleet.claim(key, deadline - loop.time())
        if claim is None:
            return await make()
        if claim.body is not None:
            count(category, Lookup.HIT, total, 0, 0)
            return _shared_result(200, claim.body, Lookup.HIT, category)
        if claim.holder is not None:
            with tracing.span("shared tier wait"):
                got = await fleet.wait(key, claim.token, claim.holder, deadline)
            if isinstance(got, SharedAnswer):
                count(category, Lookup.COALESCED, 0, 0, total)
                return _shared_result(got.status_code, got.body, Lookup.COALESCED, category)
            if isinstance(got, UpstreamFailure):
                raise UpstreamError(got.error_type, got.message)
            if got is ALONE:
                return await make()
        # The lock is ours (claimed, or taken over from a holder that vanished).
        async with fleet.holding(key, claim.token):
            try:
                result = await make()
            except UpstreamError as exc:
                await fleet.publish(key, claim.token, UpstreamFailure(exc.error_type, exc.message))
                raise
        body = result.raw if result.raw is not None else json.dumps(
            result.doc, ensure_ascii=False, separators=(",", ":")).encode()
        if category == "instant":
            body = b"%d\n" % round((result.evaluated_at or 0) * 1000) + body
        await fleet.publish(key, claim.token, SharedAnswer(result.status_code, body))
        return result


def _shared_result(status: int, body: bytes, lookup: Lookup, category: str) -> ApiResult:
    """An answer handed over by another process of the fleet (see FleetAnswer.answer)."""
    if category != "instant":
        return ApiResult(status, None, lookup, raw=body)
    t_text, _, raw = body.partition(b"\n")
    return ApiResult(status, None, lookup, int(t_text) / 1000, raw=raw)
