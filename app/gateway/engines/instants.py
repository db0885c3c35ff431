"""Instant queries of the query API through the extent store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from app.gateway.caching.extents import storable
from app.gateway.caching.flight import SingleFlight
from app.gateway.caching.stores import ExtentStore
from app.gateway.engines.passthrough import (
    BYPASS_PARAMS,
    Passthrough,
    _key,
    _params_key,
    count,
    settled,
    unfinished,
)
from app.gateway.promql.reach import AT_LEAST_NOW, Uncacheable, instant_reach
from app.gateway.promql.timing import fmt_ms, ms_of, repr_time
from app.gateway.result import ApiResult, Lookup
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError

_Instant = ApiResult | UpstreamError
# One answer for the fleet: (key, deadline, steps, make, category) -> the answer some
# process made (RangeCache._fleet: the shared tier's lock and hand-over).
Share = Callable[[str, float, int, Callable[[], Coroutine[Any, Any, ApiResult]], str], Awaitable[ApiResult]]


class Instants:
    """/api/v1/query: evaluated at an explicit time, kept like an extent when settled."""

    def __init__(self, settings: GatewaySettings, upstream: Passthrough, store: ExtentStore,
                 clock: Callable[[], float], share: Share | None = None) -> None:
        self.settings = settings
        self.share = share
        self.upstream = upstream
        self.store = store
        self.clock = clock
        self.live_window_ms = int(settings.range_cache_live_window_seconds * 1000)
        self.flights: SingleFlight[_Instant] = SingleFlight()

    async def query(self, *, scope: str, expr: str, time: float | None,
                    params: Sequence[tuple[str, str]], deadline: float,
                    headers: Mapping[str, str] | None = None) -> ApiResult:
        """An instant query. Without `time` it is evaluated at a now the gateway picks,
        sent upstream explicitly and reported (``evaluated_at``; Prometheus' ``value[0]``
        carries it too), and reused for at most the figure TTL. With `time`, an answer
        that reads only settled data is kept like a settled extent."""
        if any(name in BYPASS_PARAMS for name, _ in params) or self.settings.range_cache_max_bytes <= 0:
            query = [("query", expr), *([("time", repr_time(time))] if time is not None else []), *params]
            return await self.upstream.answer("/api/v1/query", query, deadline, headers, None)
        base = _key("instant", scope, expr, _params_key(params))
        if time is None:
            key, ttl, t_ms = f"{base}:now", self.settings.ttl_for("api"), None
        else:
            t_ms = ms_of(time)
            try:
                rch = instant_reach(expr, t_ms).union(AT_LEAST_NOW)
                latest = rch.latest(t_ms)
                is_settled = latest is None or latest <= int(self.clock() * 1000) - self.live_window_ms
            except (Uncacheable, ValueError, RuntimeError):
                query = [("query", expr), ("time", repr_time(time)), *params]
                return await self.upstream.answer("/api/v1/query", query, deadline, headers,
                                                  _key("instant-pass", scope, expr, t_ms, _params_key(params)))
            ttl = (self.settings.range_cache_ttl_seconds if is_settled
                   else self.settings.range_cache_live_ttl_seconds)
            key = f"{base}:t{t_ms}"
        data = (await self.store.get_many([key]))[0]
        if data is not None:
            # "<evaluation time ms>\n" then upstream's own bytes: sent as they came.
            t_text, _, body = data.partition(b"\n")
            count("instant", Lookup.HIT)
            return ApiResult(200, None, Lookup.HIT, int(t_text) / 1000, raw=body)
        # Identical instant queries are answered once: in this process (SingleFlight) and,
        # with the shared tier, across the fleet (the range queries' lock and hand-over).
        fut, leader = self.flights.lead(
            key, lambda: self._fetch(key, expr, t_ms, params, ttl, deadline, headers),
            self.upstream.background, catch=UpstreamError, unfinished=unfinished)
        outcome: ApiResult = (await settled([fut], deadline))[0]
        lookup = outcome.lookup if leader else Lookup.COALESCED
        if not leader or lookup is Lookup.MISS:  # (a fleet hit or hand-over counted itself)
            count("instant", lookup)
        return ApiResult(outcome.status_code, None, lookup, outcome.evaluated_at, raw=outcome.raw)

    async def _fetch(self, key: str, expr: str, t_ms: int | None, params: Sequence[tuple[str, str]],
                     ttl: float, deadline: float, headers: Mapping[str, str] | None) -> ApiResult:
        async def evaluate() -> ApiResult:
            t = t_ms if t_ms is not None else int(self.clock() * 1000)
            query = [("query", expr), ("time", fmt_ms(t)), *list(params)]
            answer = await self.upstream.ask("/api/v1/query", query, "instant", deadline, headers)
            if answer.status_code == 200 and storable(answer.doc):
                await self.store.put_many([(key, b"%d\n" % t + answer.raw, ttl)])
            return ApiResult(answer.status_code, None, Lookup.MISS, t / 1000, raw=answer.raw)

        if self.share is None:
            return await evaluate()
        return await self.share(key, deadline, 0, evaluate, "instant")
