"""Upstream's own answer, coalesced, never stored; the query API engines' upstream seam and keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from app.gateway import metrics as gm
from app.gateway.caching.flight import Background, SingleFlight, wait
from app.gateway.engines.scheduler import upstream_slot
from app.gateway.result import ApiResult, Lookup
from app.gateway.upstream.answers import UpstreamError

KEY_VERSION = "rc2"  # rc2: extents stored as upstream bytes (msgpack-framed fragments)
# Parameters that make an answer uncacheable (Prometheus' per-query statistics).
BYPASS_PARAMS = frozenset({"stats"})


class Answer(Protocol):
    """What the upstream client's ``api()`` returns (``app.gateway.upstream.answers.ApiAnswer``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def doc(self) -> dict[str, Any]: ...

    @property
    def raw(self) -> bytes: ...


class ApiClient(Protocol):
    async def api(self, method: str, path: str, params: Sequence[tuple[str, str]], *,
                  timeout: float, category: str = "api",
                  headers: Mapping[str, str] | None = None, max_bytes: int | None = None) -> Answer: ...


_Passed = Answer | UpstreamError


def _key(*parts: object) -> str:
    raw = json.dumps(parts, separators=(",", ":"), ensure_ascii=False)
    return f"{KEY_VERSION}:{hashlib.sha256(raw.encode()).hexdigest()[:40]}"


def _params_key(params: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The parameters that change an answer, for keys: all but `timeout`, stable by name
    (repeated names keep their order: Prometheus reads the first)."""
    return sorted((p for p in params if p[0] != "timeout"), key=lambda p: p[0])


def late() -> UpstreamError:
    return UpstreamError("timeout", "request deadline reached before the upstream answered")


def unfinished() -> UpstreamError:
    return UpstreamError("internal", "fetch ended without an answer")


async def settled(futures: Sequence[asyncio.Future[Any]], deadline: float) -> list[Any]:
    """Every outcome, or the first upstream error; a timeout past the deadline."""
    return await wait(futures, deadline, late)


def count(category: str, lookup: Lookup, cached: int = 0, fetched: int = 0, coalesced: int = 0) -> None:
    """One lookup; evaluation steps served from the store, fetched by this request,
    or fetched by another request it waited on."""
    gm.cache_outcome(category, lookup)
    gm.range_steps(cached, fetched, coalesced)


class Passthrough:
    """Upstream API requests made with what is left of the caller's deadline."""

    def __init__(self, client: ApiClient, background: Background) -> None:
        self.client = client
        self.background = background
        self.flights: SingleFlight[_Passed] = SingleFlight()

    async def ask(self, path: str, params: Sequence[tuple[str, str]], category: str, deadline: float,
                  headers: Mapping[str, str] | None) -> Answer:
        """One upstream API request with what is left of the caller's deadline (event-loop time),
        in its turn (app/gateway/engines/scheduler.py: the client's slot, its byte limit)."""
        async with upstream_slot(category, deadline) as ticket:
            # Outside a request (no ticket): the client's own defaults.
            extra: dict[str, Any] = {} if ticket is None else {"max_bytes": ticket.limits.max_response_bytes}
            answer = await self.client.api("POST", path, list(params), category=category, headers=headers,
                                           timeout=deadline - asyncio.get_running_loop().time(), **extra)
            if ticket is not None:
                ticket.scheduler.upstream.sizes.add(ticket.client.key, len(answer.raw))
            return answer

    async def answer(self, path: str, params: Sequence[tuple[str, str]], deadline: float,
                     headers: Mapping[str, str] | None, key: str | None) -> ApiResult:
        """Upstream's own answer, never stored; coalesced with identical requests when keyed."""
        category = "range" if path.endswith("range") else "instant"
        params = list(params)
        if key is None:
            answer = await self.ask(path, params, category, deadline, headers)
            gm.cache_outcome(category, Lookup.MISS)
            return ApiResult(answer.status_code, answer.doc, Lookup.MISS, raw=answer.raw)
        fut, leader = self.flights.lead(key, lambda: self.ask(path, params, category, deadline, headers),
                                        self.background, catch=UpstreamError, unfinished=unfinished)
        outcome: Answer = (await settled([fut], deadline))[0]
        lookup = Lookup.MISS if leader else Lookup.COALESCED
        gm.cache_outcome(category, lookup)
        return ApiResult(outcome.status_code, outcome.doc, lookup, raw=outcome.raw)
