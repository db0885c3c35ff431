"""The exact range cache behind /api/v1/query_range and /api/v1/query.

Why it can be exact: Prometheus evaluates a range query at ``start + k*step``
(whole milliseconds) and each instant's value depends only on the data and that
instant (lookback, ranges, subqueries and ``offset`` are relative to it; ``@ T``
is absolute). Two requests with the same query, step and ``start mod step``
therefore evaluate at the same instants with the same values, so an answer can
be assembled from per-instant points fetched earlier, series by series (a series
absent from one extent has no points there). The cache never moves ``start`` or
``end`` (Trickster-style alignment would change answers) and never stores what
may still change:

- the *live* instants, those whose latest read sample time (computed from the
  syntax tree: ``offset``, ``@``, subqueries; a negative offset reads the
  future), or who themselves, are within ``RANGE_CACHE_LIVE_WINDOW_SECONDS``
  of now or later, are
  refetched and kept only ``RANGE_CACHE_LIVE_TTL_SECONDS``, for the very same
  request (its viewers opening a dashboard at once);
- answers with warnings, infos, errors, ``stats``, or points off the expected
  grid are passed on whole and never stored; a multi-piece answer whose piece
  is such is refetched whole, so what the caller sees is always one upstream
  answer or an assembly of exact per-instant points;
- ``@ start()`` / ``@ end()`` make every instant depend on the range: such
  range queries are only coalesced, never cached.

Storage goes through ``ExtentStore`` (store only: bytes by key with a time to
live), so the in-process store here and a shared tier later are interchangeable.
Extents are bytes (``caching/fragments.py``: each series' points as the upstream
wrote them), kept in blocks and fetched in parts cut near an interval
(``engines/splitting.py``), so a store entry stays small, the byte bound evicts old
time first, and a long range costs one concurrent upstream query per part.
Identical fetches in flight are coalesced with ``SingleFlight``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from app.common import tracing
from app.gateway.caching.extents import Interval, intersect, normalise, subtract
from app.gateway.caching.flight import Background, SingleFlight
from app.gateway.caching.fragments import Extent, body_of, extent_of
from app.gateway.caching.shared_ranges import SharedFlights
from app.gateway.caching.stores import ExtentStore
from app.gateway.engines import splitting
from app.gateway.engines.fleet import FleetAnswer
from app.gateway.engines.instants import Instants
from app.gateway.engines.passthrough import (
    BYPASS_PARAMS,
    Answer,
    ApiClient,
    Passthrough,
    _key,
    _params_key,
    count,
    settled,
    unfinished,
)
from app.gateway.engines.scheduler import Rejected
from app.gateway.engines.scheduler import heavy as run_heavy
from app.gateway.promql.reach import AT_LEAST_NOW, Reach, Uncacheable, reach
from app.gateway.promql.request import InstantQuery, RangeQuery
from app.gateway.promql.timing import fmt_ms
from app.gateway.result import ApiResult, Lookup
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError

log = logging.getLogger("gateway.ranges")

# Prometheus refuses a range query of more than 11,000 steps ((end-start)/step > 11000).
MAX_STEPS = 11_000
MAX_PIECES = 3  # more missing pieces than this: fetch one span instead
# A whole answer is remembered at most this long (its extents stay longer): a window
# moves with every refresh, so old bodies should leave room for extents.
MEMO_MAX_SECONDS = 600.0
# Handling more bytes than this runs in a worker thread, off the event loop. Bytes are
# handled in C (validated, cut, joined once): a 6.5 MB week-long answer is a few ms.
THREAD_BYTES = 32 * 1024 * 1024

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Piece:
    """One upstream fetch: the grid instants [a, b] and the strings sent for them."""

    a: int
    b: int
    start: str
    end: str


@dataclass(frozen=True, slots=True)
class _Fetched:
    answer: Answer
    extent: Extent | None  # None: not storable per instant (warnings, error, off grid)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How the cache answers one range query: derived once from the request."""

    reach: Reach  # what the query reads (the live instants follow from it)
    base: str  # the key of the query's grid: scope, query, step, phase, parameters
    live_from: int  # the first live instant (ms)
    memo_key: str  # the whole answer remembered
    memo_ttl: float
    full_key: str  # the whole request passed through, coalesced


_Flight = _Fetched | UpstreamError
_Request = ApiResult | UpstreamError


class RangeCache:
    """query_range and query through the extent store; see the module docstring."""

    def __init__(self, settings: GatewaySettings, client: ApiClient, store: ExtentStore,
                 fleet: SharedFlights | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.live_window_ms = int(settings.range_cache_live_window_seconds * 1000)
        self.split_ms = max(1, int(settings.range_cache_split_seconds * 1000))
        self.background = Background()
        self.upstream = Passthrough(client, self.background)
        self.one = FleetAnswer(fleet)  # one answer for the fleet (lock and hand-over)
        self.blocks = Blocks(settings, store, clock)
        self.instants = Instants(settings, self.upstream, store, clock, share=self.one.answer)
        self.pieces: SingleFlight[_Flight] = SingleFlight()
        self.requests: SingleFlight[_Request] = SingleFlight()

    async def query(self, request: InstantQuery) -> ApiResult:
        """An instant query (``Instants.query``), beside the range queries it shares a store with."""
        return await self.instants.query(request)

    # -- range queries ---------------------------------------------------------------------

    async def query_range(self, request: RangeQuery) -> ApiResult:
        """The answer Prometheus gives for this range query, from stored extents where exact."""
        req, deadline = request, request.origin.deadline
        step_ms, first, end_ms = req.step.ms, req.first, req.end.ms
        if (req.named(*BYPASS_PARAMS) or step_ms <= 0 or end_ms < first
                or (end_ms - first) // step_ms > MAX_STEPS or self.settings.range_cache_max_bytes <= 0):
            return await self.upstream.answer("/api/v1/query_range", req.upstream(), deadline,
                                              req.origin.headers, None)
        full_key = _key("range-pass", req.origin.scope, req.query.text, first, end_ms, step_ms,
                        _params_key(req.params))
        try:
            if req.query.tree is None:
                raise ValueError("a query the gateway cannot read")
            rch = reach(req.query.tree).union(AT_LEAST_NOW)
        except (Uncacheable, ValueError, RuntimeError):
            # @ start()/end(), or a query upstream will refuse: coalesce, never store.
            return await self.upstream.answer("/api/v1/query_range", req.upstream(), deadline,
                                              req.origin.headers, full_key)
        plan = self._plan(req, rch, full_key)
        total = req.steps
        remembered = (await self.store.get_many([plan.memo_key]))[0]
        if remembered is not None:
            count("range", Lookup.HIT, total, 0, 0)
            return ApiResult(200, None, Lookup.HIT, raw=remembered)
        # Identical requests in flight wait for the first one's answer (a dashboard opened
        # by many viewers at once): assembled once, sent to all.
        fut, leader = self.requests.lead(
            plan.memo_key,
            lambda: self.one.answer(plan.memo_key, deadline, total, lambda: self._range_answer(req, plan)),
            self.background, catch=UpstreamError, unfinished=unfinished)
        result: ApiResult = (await settled([fut], deadline))[0]
        if leader:
            return result
        count("range", Lookup.COALESCED, 0, 0, total)
        return ApiResult(result.status_code, None if result.raw is not None else result.doc,
                         Lookup.COALESCED, raw=result.raw)

    def _plan(self, req: RangeQuery, rch: Reach, full_key: str) -> _Plan:
        """Keys and lifetimes of a cacheable range query, from what it reads and the clock."""
        first, last, step_ms = req.first, req.last, req.step.ms
        base = _key("range", req.origin.scope, req.query.text, step_ms, first % step_ms, _params_key(req.params))
        now_ms = int(self.clock() * 1000)
        live_from = rch.first_live(first, step_ms, now_ms - self.live_window_ms)
        # The very same request answered before: its body, for as long as its most
        # recent instant allows (seconds when it has live instants, the re-check interval
        # when it has recently settled ones).
        memo_ttl = min(self.settings.range_cache_ttl_seconds, MEMO_MAX_SECONDS)
        if live_from <= last:
            memo_ttl = self.settings.range_cache_live_ttl_seconds
        elif rch.first_live(first, step_ms, now_ms - self.live_window_ms - self.blocks.recheck_horizon_ms) <= last:
            memo_ttl = min(memo_ttl, self.settings.range_cache_recheck_seconds)
        return _Plan(rch, base, live_from, f"{base}:ans:{first}:{last}", memo_ttl, full_key)

    async def _range_answer(self, req: RangeQuery, plan: _Plan) -> ApiResult:
        """The answer of one range query: stored extents, the missing ones fetched."""
        first, last, step_ms, total = req.first, req.last, req.step.ms, req.steps
        # Live points are reused by the very same request only: an upstream may answer an
        # instant near now differently in another range (VictoriaMetrics does).
        live_key = f"{plan.base}:live:{first}:{last}"
        sources = await self.blocks.read(req, plan, live_key, self.split_ms)
        covered = normalise([iv for e, upto in sources for iv in intersect(e.covered, first, upto)], step_ms)
        missing = subtract(first, last, covered, step_ms)
        pieces = pieces_of(missing, req, splitting.part_len(step_ms, self.split_ms))

        futures: list[asyncio.Future[_Flight]] = []
        leads: list[bool] = []
        for piece in pieces:
            fkey = f"{plan.base}|{piece.a}|{piece.b}|{piece.start}|{piece.end}"
            fut, leader = self.pieces.lead(
                fkey, functools.partial(self._fetch_piece, piece, req, plan, live_key),
                self.background, catch=UpstreamError, unfinished=unfinished)
            leads.append(leader)
            futures.append(fut)
        fetched = await settled(futures, req.origin.deadline)

        fetched_steps = min(total, sum((p.b - p.a) // step_ms + 1 for p in pieces))
        cached_steps = total - fetched_steps
        led = any(leads)
        led_steps = sum((p.b - p.a) // step_ms + 1 for p, lead in zip(pieces, leads, strict=True) if lead)
        if not covered and len(pieces) == 1 and (pieces[0].a, pieces[0].b) == (first, last):
            # The whole answer is one upstream answer: pass it on as it came.
            lookup = Lookup.MISS if led else Lookup.COALESCED
            count("range", lookup, 0, led_steps, total - led_steps)
            answer = fetched[0].answer
            if fetched[0].extent is not None:
                await self.store.put_many([(plan.memo_key, answer.raw, plan.memo_ttl)])
            return ApiResult(answer.status_code, None, lookup, raw=answer.raw)
        if any(f.extent is None for f in fetched):
            # A piece carried warnings, an error or points off the grid: not assembled;
            # the caller gets upstream's own answer for the whole range.
            count("range", Lookup.MISS, 0, led_steps, 0)
            return await self.upstream.answer("/api/v1/query_range", req.upstream(), req.origin.deadline,
                                              req.origin.headers, plan.full_key)

        segments = _segments([f.extent for f in fetched if f.extent is not None], sources, first, step_ms)
        size = sum(e.size() for _, e in segments)
        with tracing.span("assembly", {"gateway.segments": len(segments), "gateway.bytes": size}):
            body = await _cpu(body_of, segments, step_ms, heavy=size > THREAD_BYTES)
        await self.store.put_many([(plan.memo_key, body, plan.memo_ttl)])
        if not fetched:
            lookup = Lookup.HIT
        elif cached_steps > 0:
            lookup = Lookup.PARTIAL
        else:
            lookup = Lookup.MISS if led else Lookup.COALESCED
        count("range", lookup, cached_steps, led_steps, fetched_steps - led_steps)
        return ApiResult(200, None, lookup, raw=body)

    async def _fetch_piece(self, piece: _Piece, req: RangeQuery, plan: _Plan, live_key: str) -> _Flight:
        cutoff = int(self.clock() * 1000) - self.live_window_ms
        step_ms = req.step.ms
        query = [("query", req.query.text), ("start", piece.start), ("end", piece.end),
                 ("step", req.step.text), *req.params]
        with tracing.span("range piece", {"gateway.range.start": piece.start, "gateway.range.end": piece.end,
                                          "gateway.range.steps": (piece.b - piece.a) // step_ms + 1}):
            answer = await self.upstream.ask("/api/v1/query_range", query, "range", req.origin.deadline,
                                             req.origin.headers)
        extent = None
        if answer.status_code == 200:
            extent = await _cpu(extent_of, answer.raw, piece.a, piece.b, step_ms,
                                heavy=len(answer.raw) > THREAD_BYTES)
        if extent is not None:
            with suppress(Rejected):  # no turn left to store it: answered, not kept
                await self.blocks.keep(plan.base, live_key, extent, piece, step_ms, plan.reach, cutoff,
                                       self.split_ms)
        return _Fetched(answer, extent)

    async def aclose(self) -> None:
        await self.background.aclose()


def pieces_of(missing: list[Interval], req: RangeQuery, part: int) -> list[_Piece]:
    """What to fetch: the missing intervals (one span when there are many) cut at part
    boundaries, in chunks Prometheus accepts; a piece at the request's own edge is sent
    with the caller's text. The live tail is fetched with the part it ends.

    An interval no longer than a part is one fetch even when it crosses a boundary
    (a refresh's new edge and freshness window straddling midnight): cutting it would
    double the upstream queries for no concurrency worth having."""
    first, last, step = req.first, req.last, req.step.ms
    if len(missing) > MAX_PIECES:
        missing = [(missing[0][0], missing[-1][1])]
    short = [(a, b) for a, b in missing if b - a < part]
    long = splitting.split([(a, b) for a, b in missing if b - a >= part], step, part)
    out: list[_Piece] = []
    for a, b in sorted(short + long):
        while a <= b:
            chunk_end = min(b, a + (MAX_STEPS - 1) * step)
            out.append(_Piece(a, chunk_end,
                              req.start.text if a == first else fmt_ms(a),
                              req.end.text if chunk_end == last else fmt_ms(chunk_end)))
            a = chunk_end + step
    return out


def _segments(fetched: list[Extent], sources: list[tuple[Extent, int]], first: int,
              step: int) -> list[tuple[Interval, Extent]]:
    """Which source gives which instants: the fetched pieces first, then the stored
    sources for what is left, in time order."""
    segments: list[tuple[Interval, Extent]] = []
    taken: list[Interval] = []
    for extent in fetched:
        segments.append((extent.covered[0], extent))
        taken.append(extent.covered[0])
    for source, upto in sources:
        free = normalise(taken, step)
        for a, b in intersect(source.covered, first, upto):
            for part in subtract(a, b, free, step):
                segments.append((part, source))
                taken.append(part)
    segments.sort(key=lambda seg: seg[0])
    return segments


class Blocks:
    """A query's settled extents in blocks of its grid (engines/splitting.py), and its
    live instants under the request's own key: read for a request, kept from a piece."""

    def __init__(self, settings: GatewaySettings, store: ExtentStore, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.recheck_horizon_ms = int(settings.range_cache_recheck_horizon_seconds * 1000)

    @staticmethod
    def key(base: str, length: int, index: int) -> str:
        return f"{base}:b{length}:{index}"

    async def read(self, req: RangeQuery, plan: _Plan, live_key: str, split_ms: int) -> list[tuple[Extent, int]]:
        """Each stored source with the last instant it may give this request (not cut
        here: only the two edge blocks are cut, once, when the answer is assembled)."""
        first, last, step_ms = req.first, req.last, req.step.ms
        settled_last = min(last, plan.live_from - step_ms)
        length = splitting.block_len(step_ms, split_ms)
        blocks = splitting.blocks(first, settled_last, step_ms, length) if settled_last >= first else []
        with tracing.span("cache lookup", {"gateway.keys": len(blocks) + 1}):
            raw = await self.store.get_many([self.key(plan.base, length, bi) for bi in blocks] + [live_key])
        sources = [(Extent.decode(data), settled_last) for data in raw[:-1] if data is not None]
        if raw[-1] is not None:
            sources.append((Extent.decode(raw[-1]), last))
        return sources

    async def keep(self, base: str, live_key: str, extent: Extent, piece: _Piece, step_ms: int,
                   rch: Reach, cutoff: int, split_ms: int) -> None:
        """Settled instants into their blocks (merged with what is there), live ones into
        the request's live record for seconds only."""
        live_from = rch.first_live(piece.a, step_ms, cutoff)
        settled_last = min(piece.b, live_from - step_ms)
        length = splitting.block_len(step_ms, split_ms)
        blocks = splitting.blocks(piece.a, settled_last, step_ms, length) if settled_last >= piece.a else []
        keys = [self.key(base, length, bi) for bi in blocks]
        old = await self.store.get_many(keys) if keys else []
        # Instants settled only recently (within the re-check horizon past the freshness
        # window) are kept briefly: a block holding any is refetched after
        # RANGE_CACHE_RECHECK_SECONDS, whatever is merged into it meanwhile, so a sample
        # later than the freshness window corrects the cache within that bound.
        now = self.clock()
        recent_from = rch.first_live(piece.a, step_ms, cutoff - self.recheck_horizon_ms)
        recheck_at = now + self.settings.range_cache_recheck_seconds

        def build() -> list[tuple[str, bytes, float]]:
            items: list[tuple[str, bytes, float]] = []
            if blocks:
                settled = extent.clip(piece.a, settled_last, step_ms)
                phase = piece.a % step_ms
                for bi, key, data in zip(blocks, keys, old, strict=True):
                    part = settled.clip(*splitting.block_span(bi, phase, step_ms, length), step_ms)
                    if part.covered and part.covered[-1][1] >= recent_from:
                        part.expires = recheck_at
                    if data is not None:
                        part = Extent.decode(data).merge(part, step_ms)
                    ttl = self.settings.range_cache_ttl_seconds
                    if part.expires > 0:
                        ttl = min(ttl, part.expires - now)
                    items.append((key, part.encode(), ttl))
            if live_from <= piece.b:
                live = extent.clip(max(piece.a, live_from), piece.b, step_ms)
                items.append((live_key, live.encode(), self.settings.range_cache_live_ttl_seconds))
            return items

        items = await _cpu(build, heavy=extent.size() > THREAD_BYTES)
        await self.store.put_many(items)


async def _cpu(fn: Callable[..., _T], *args: Any, heavy: bool) -> _T:
    """Run CPU work in a worker thread when it is big enough to stall the event loop (in the
    scheduler's heavy lane: its turn, counted against the client that asked; Rejected when
    its turn would come after the request's deadline)."""
    if heavy:
        return await run_heavy(fn, *args)
    return fn(*args)
