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
time first, and a long range costs one concurrent upstream query per part. Identical fetches in
flight are coalesced with the engine's ``SingleFlight``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import promql_parser as pp

from app.gateway import metrics as gm
from app.gateway.caching.fragments import Extent, Interval, body_of, extent_of, intersect, normalise, subtract
from app.gateway.caching.fragments import label_key as label_key
from app.gateway.engine import SingleFlight
from app.gateway.engines import splitting
from app.gateway.result import Lookup, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.shared import ALONE, SharedAnswer, SharedFlights
from app.gateway.upstream import UpstreamError

log = logging.getLogger("gateway.ranges")

# Prometheus refuses a range query of more than 11,000 steps ((end-start)/step > 11000).
MAX_STEPS = 11_000
MAX_PIECES = 3  # more missing pieces than this: fetch one span instead
KEY_VERSION = "rc2"
# Parameters that make an answer uncacheable (Prometheus' per-query statistics).
BYPASS_PARAMS = frozenset({"stats"})
# A whole answer is remembered at most this long (its extents stay longer): a window
# moves with every refresh, so old bodies should leave room for extents.
MEMO_MAX_SECONDS = 600.0
# Handling more bytes than this runs in a worker thread, off the event loop. Bytes are
# handled in C (validated, cut, joined once): a 6.5 MB week-long answer is a few ms.
THREAD_BYTES = 32 * 1024 * 1024

_T = TypeVar("_T")


# -- the upstream seam ---------------------------------------------------------------------

class Answer(Protocol):
    """What the upstream client's ``api()`` returns (``app.gateway.upstream.ApiAnswer``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def doc(self) -> dict[str, Any]: ...

    @property
    def raw(self) -> bytes: ...


class ApiClient(Protocol):
    async def api(self, method: str, path: str, params: Sequence[tuple[str, str]], *,
                  timeout: float, category: str = "api",
                  headers: Mapping[str, str] | None = None) -> Answer: ...


class ApiResult:
    """An answer for the query API: the envelope to send and how it was had.

    `raw` is the body to send as is when there is one (upstream's own bytes, or a
    remembered answer); `doc` is then decoded only if someone asks for it.
    """

    __slots__ = ("_doc", "evaluated_at", "lookup", "raw", "status_code")

    def __init__(self, status_code: int, doc: dict[str, Any] | None, lookup: Lookup,
                 evaluated_at: float | None = None, raw: bytes | None = None) -> None:
        if doc is None and raw is None:
            raise ValueError("an ApiResult needs a doc or a raw body")
        self.status_code = status_code
        self._doc = doc
        self.lookup = lookup  # hit / partial / miss / coalesced: the X-Gateway-Cache header
        self.evaluated_at = evaluated_at  # an instant query's evaluation time (unix s)
        self.raw = raw

    @property
    def doc(self) -> dict[str, Any]:
        """The envelope (status, data, warnings, infos, errorType, error)."""
        if self._doc is None:
            assert self.raw is not None
            self._doc = json.loads(self.raw)
        return self._doc


# -- time as Prometheus reads it -----------------------------------------------------------

def _go_round(x: float) -> int:
    """Go's math.Round: half away from zero (Python's round() is half to even)."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def ms_of(seconds: float) -> int:
    """Unix seconds to whole milliseconds exactly as Prometheus' parseTime does.

    (Modf; the fraction rounded to ms; time.Unix normalisation; FromTime.) The
    evaluation grid must be Prometheus' own, to the millisecond.
    """
    frac, whole = math.modf(seconds)
    frac = _go_round(frac * 1000) / 1000
    total_ns = int(whole) * 1_000_000_000 + int(frac * 1e9)
    sec, ns = divmod(total_ns, 1_000_000_000)
    return sec * 1000 + ns // 1_000_000


def step_ms_of(step: float) -> int:
    """A float step in seconds to Prometheus' interval: Duration(step*1e9), then whole ms."""
    return int(step * 1e9) // 1_000_000


def fmt_ms(ms: int) -> str:
    """Milliseconds as decimal seconds that every parser reads back to the same ms."""
    sign = "-" if ms < 0 else ""
    sec, frac = divmod(abs(ms), 1000)
    return f"{sign}{sec}" if frac == 0 else f"{sign}{sec}.{frac:03d}".rstrip("0")


# -- what a query reads: freshness from the syntax tree -----------------------------------

class Uncacheable(Exception):
    """The query's per-instant values depend on more than the instant (``@ start()``)."""


@dataclass(frozen=True, slots=True)
class Reach:
    """The latest sample time a query reads when evaluated at t (ms):
    ``max(t + relative, fixed)``; both None: it reads no data (``42``, ``time()``)."""

    relative: int | None = None
    fixed: int | None = None

    def union(self, other: Reach) -> Reach:
        return Reach(_max(self.relative, other.relative), _max(self.fixed, other.fixed))

    def latest(self, t: int) -> int | None:
        rel = None if self.relative is None else t + self.relative
        return _max(rel, self.fixed)

    def first_live(self, first: int, step: int, cutoff: int) -> int:
        """The first grid instant (``first + k*step``) whose latest read is after `cutoff`.

        Instants before it read only data at least a live window old. Returns an
        instant after any range when no instant is live.
        """
        if self.fixed is not None and self.fixed > cutoff:
            return first
        if self.relative is None:
            return 2**62
        # t + relative > cutoff  <=>  t > cutoff - relative
        k = (cutoff - self.relative - first) // step + 1
        return first + max(k, 0) * step


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _offset_ms(offset: timedelta | None) -> int:
    return 0 if offset is None else _go_round(offset.total_seconds() * 1000)


def _at_ms(at: Any, preprocess_time: int | None) -> int | None:
    """The absolute evaluation time of an ``@`` modifier (None when there is none)."""
    if at is None:
        return None
    kind = str(at.type).rsplit(".", 1)[-1]
    if kind == "At":
        # The text form ("@ 1700000000.000"): reading .at panics for negative times, and
        # a negative time prints as 0, still an upper bound of what is read.
        return ms_of(float(str(at).split()[-1]))
    if preprocess_time is None:
        raise Uncacheable(f"@ {kind.lower()}() depends on the range")
    return preprocess_time


def reach(node: Any, preprocess_time: int | None = None) -> Reach:
    """What `node` reads, as a Reach. `preprocess_time` is what ``start()``/``end()``
    mean (an instant query's time); None for a range query, where they make the
    query uncacheable."""
    if isinstance(node, pp.VectorSelector):
        off = _offset_ms(node.offset)
        at = _at_ms(node.at, preprocess_time)
        return Reach(fixed=at - off) if at is not None else Reach(relative=-off)
    if isinstance(node, pp.MatrixSelector):
        return reach(node.vector_selector, preprocess_time)
    if isinstance(node, pp.SubqueryExpr):
        inner = reach(node.expr, preprocess_time)
        off = _offset_ms(node.offset)
        at = _at_ms(node.at, preprocess_time)
        # Inner evaluation times are at most (t or @) - offset.
        if at is not None:
            shifted = None if inner.relative is None else at - off + inner.relative
            return Reach(fixed=_max(inner.fixed, shifted))
        rel = None if inner.relative is None else inner.relative - off
        return Reach(relative=rel, fixed=inner.fixed)
    if isinstance(node, pp.NumberLiteral | pp.StringLiteral):
        return Reach()
    children: list[Any]
    if isinstance(node, pp.Call):
        children = list(node.args)
    elif isinstance(node, pp.AggregateExpr):
        children = [node.expr] + ([node.param] if node.param is not None else [])
    elif isinstance(node, pp.BinaryExpr):
        children = [node.lhs, node.rhs]
    elif isinstance(node, pp.ParenExpr | pp.UnaryExpr):
        children = [node.expr]
    else:
        raise Uncacheable(f"unknown syntax node {type(node).__name__}")
    out = Reach()
    for child in children:
        out = out.union(reach(child, preprocess_time))
    return out


@lru_cache(maxsize=2048)
def range_reach(expr: str) -> Reach:
    """The Reach of a range query (raises Uncacheable; ValueError when it does not parse)."""
    return reach(pp.parse(expr))


# Every instant within the live window of now is live, whatever the query reads: some
# upstreams answer an instant near now differently depending on the range asked
# (VictoriaMetrics adjusts the last points of a range ending near or after now).
AT_LEAST_NOW = Reach(relative=0)


def instant_reach(expr: str, t: int) -> Reach:
    return reach(pp.parse(expr), preprocess_time=t)


_ENVELOPE_KEYS = frozenset({"status", "data"})
_DATA_KEYS = frozenset({"resultType", "result"})


def storable(doc: Mapping[str, Any]) -> bool:
    """A plain success: nothing but status and data (no warnings, infos, stats)."""
    data = doc.get("data")
    return (doc.get("status") == "success" and set(doc) <= _ENVELOPE_KEYS
            and isinstance(data, dict) and set(data) <= _DATA_KEYS and "result" in data)


# -- the store (store only) ----------------------------------------------------------------

class ExtentStore(Protocol):
    """Bytes by key with a time to live, nothing more: what is in them and who fetches
    is the range cache's business. A shared tier (Redis) can implement this."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        """Store (key, value, ttl seconds) items; a ttl <= 0 stores nothing."""
        ...


class MemoryExtentStore:
    """The in-process ExtentStore: an LRU bounded in bytes, entries expiring on their TTL."""

    OVERHEAD = 96  # per entry: key, tuple, dict slot; a rough but bounded estimate

    def __init__(self, max_bytes: int, timer: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._timer = timer
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def _cost(self, key: str, value: bytes) -> int:
        return len(key) + len(value) + self.OVERHEAD

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.size -= self._cost(key, value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._timer()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                out.append(None)
            elif entry[1] <= now:
                self._drop(key)
                out.append(None)
            else:
                self._entries.move_to_end(key)
                out.append(entry[0])
        gm.range_cache_bytes(self.size)
        return out

    async def put_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        now = self._timer()
        for key, value, ttl in items:
            if key in self._entries:
                self._drop(key)
            cost = self._cost(key, value)
            if ttl <= 0 or cost > self.max_bytes:
                continue
            self._entries[key] = (value, now + ttl)
            self.size += cost
            while self.size > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
        gm.range_cache_bytes(self.size)

    def __len__(self) -> int:
        return len(self._entries)


class RemoteExtentStore(ExtentStore, Protocol):
    """An ExtentStore that can say how long each value has left (the shared tier's)."""

    async def get_many_ttl(self, keys: Sequence[str]) -> list[tuple[bytes | None, float]]: ...


class TieredExtentStore:
    """A small local store in front of a remote one (local -> shared -> upstream).

    Reads try the local tier first and copy what the remote one had into it for no
    longer than the remote keeps it (a live extent lives seconds there too); writes go
    to both, so another process of the fleet finds them. Stores only store.
    """

    def __init__(self, local: ExtentStore, remote: RemoteExtentStore) -> None:
        self.local = local
        self.remote = remote

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out = await self.local.get_many(keys)
        missing = [i for i, v in enumerate(out) if v is None]
        if not missing:
            return out
        got = await self.remote.get_many_ttl([keys[i] for i in missing])
        fill: list[tuple[str, bytes, float]] = []
        for i, (value, ttl) in zip(missing, got, strict=True):
            if value is not None:
                out[i] = value
                fill.append((keys[i], value, ttl))
        if fill:
            await self.local.put_many(fill)
        return out

    async def put_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        await self.local.put_many(items)
        await self.remote.put_many(items)


# -- the cache -----------------------------------------------------------------------------

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


_Flight = _Fetched | UpstreamError
_Request = ApiResult | UpstreamError
_Passed = Answer | UpstreamError
_Instant = ApiResult | UpstreamError


def _key(*parts: object) -> str:
    raw = json.dumps(parts, separators=(",", ":"), ensure_ascii=False)
    return f"{KEY_VERSION}:{hashlib.sha256(raw.encode()).hexdigest()[:40]}"


def _params_key(params: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The parameters that change an answer, for keys: all but `timeout`, stable by name
    (repeated names keep their order: Prometheus reads the first)."""
    return sorted((p for p in params if p[0] != "timeout"), key=lambda p: p[0])


class RangeCache:
    """query_range and query through the extent store; see the module docstring."""

    def __init__(self, settings: GatewaySettings, client: ApiClient, store: ExtentStore,
                 fleet: SharedFlights | None = None) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.fleet = fleet  # fleet-wide single flight through the shared tier, when on
        self.live_window_ms = int(settings.range_cache_live_window_seconds * 1000)
        self.split_ms = max(1, int(settings.range_cache_split_seconds * 1000))
        self.recheck_horizon_ms = int(settings.range_cache_recheck_horizon_seconds * 1000)
        self.pieces: SingleFlight[_Flight] = SingleFlight()
        self.passed: SingleFlight[_Passed] = SingleFlight()
        self.instants: SingleFlight[_Instant] = SingleFlight()
        self.requests: SingleFlight[_Request] = SingleFlight()
        self._tasks: set[asyncio.Task[None]] = set()
        self.clock: Callable[[], float] = time.time

    # -- range queries ---------------------------------------------------------------------

    async def query_range(self, *, scope: str, expr: str, start: float, end: float, step: float,
                          params: Sequence[tuple[str, str]], deadline: float,
                          headers: Mapping[str, str] | None = None) -> ApiResult:
        """The answer Prometheus gives for this range query, from stored extents where exact.

        `deadline` is an event-loop time (``loop.time()``) by which to answer.
        """
        step_ms = step_ms_of(step)
        first, end_ms = ms_of(start), ms_of(end)
        base_params = [("query", expr), ("start", repr_time(start)), ("end", repr_time(end)),
                       ("step", repr_time(step)), *params]
        if (any(name in BYPASS_PARAMS for name, _ in params) or step_ms <= 0 or end_ms < first
                or (end_ms - first) // step_ms > MAX_STEPS or self.settings.range_cache_max_bytes <= 0):
            return await self._pass("/api/v1/query_range", base_params, deadline, headers, None)
        full_key = _key("range-pass", scope, expr, first, end_ms, step_ms, _params_key(params))
        try:
            rch = range_reach(expr).union(AT_LEAST_NOW)
        except (Uncacheable, ValueError, RuntimeError):
            # @ start()/end(), or a query upstream will refuse: coalesce, never store.
            return await self._pass("/api/v1/query_range", base_params, deadline, headers, full_key)
        last = first + (end_ms - first) // step_ms * step_ms
        base = _key("range", scope, expr, step_ms, first % step_ms, _params_key(params))

        now_ms = int(self.clock() * 1000)
        live_from = rch.first_live(first, step_ms, now_ms - self.live_window_ms)
        total = (last - first) // step_ms + 1
        # The very same request answered before: its body, for as long as its most
        # recent instant allows (seconds when it has live instants, the re-check interval
        # when it has recently settled ones).
        memo_key = f"{base}:ans:{first}:{last}"
        memo_ttl = min(self.settings.range_cache_ttl_seconds, MEMO_MAX_SECONDS)
        if live_from <= last:
            memo_ttl = self.settings.range_cache_live_ttl_seconds
        elif rch.first_live(first, step_ms, now_ms - self.live_window_ms - self.recheck_horizon_ms) <= last:
            memo_ttl = min(memo_ttl, self.settings.range_cache_recheck_seconds)
        remembered = (await self.store.get_many([memo_key]))[0]
        if remembered is not None:
            self._count("range", Lookup.HIT, total, 0, 0)
            return ApiResult(200, None, Lookup.HIT, raw=remembered)
        # Identical requests in flight wait for the first one's answer (a dashboard opened
        # by many viewers at once): assembled once, sent to all.
        fut, leader = self.requests.join(memo_key)
        if leader:
            self._spawn(self._lead(memo_key, fut, self._fleet(memo_key, deadline, total, lambda: self._range_answer(
                scope=scope, expr=expr, start=start, end=end, step=step, params=params,
                deadline=deadline, headers=headers, rch=rch, first=first, last=last,
                step_ms=step_ms, base=base, live_from=live_from, memo_key=memo_key,
                memo_ttl=memo_ttl, base_params=base_params, full_key=full_key))))
        result: ApiResult = (await self._wait([fut], deadline))[0]
        if leader:
            return result
        self._count("range", Lookup.COALESCED, 0, 0, total)
        return ApiResult(result.status_code, None if result.raw is not None else result.doc,
                         Lookup.COALESCED, raw=result.raw)

    async def _lead(self, key: str, fut: asyncio.Future[_Request],
                    work: Coroutine[Any, Any, ApiResult]) -> None:
        outcome: _Request = UpstreamError("internal", "range answer ended without a result")
        try:
            outcome = await work
        except UpstreamError as exc:
            outcome = exc
        finally:
            self.requests.settle(key, fut, outcome)

    async def _fleet(self, key: str, deadline: float, total: int,
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
        claim = await fleet.claim(key, deadline - loop.time())
        if claim is None:
            return await make()
        if claim.body is not None:
            self._count(category, Lookup.HIT, total, 0, 0)
            return _shared_result(200, claim.body, Lookup.HIT, category)
        if claim.holder is not None:
            got = await fleet.wait(key, claim.token, claim.holder, deadline)
            if isinstance(got, SharedAnswer):
                self._count(category, Lookup.COALESCED, 0, 0, total)
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

    async def _range_answer(self, *, scope: str, expr: str, start: float, end: float, step: float,
                            params: Sequence[tuple[str, str]], deadline: float,
                            headers: Mapping[str, str] | None, rch: Reach, first: int, last: int,
                            step_ms: int, base: str, live_from: int, memo_key: str, memo_ttl: float,
                            base_params: list[tuple[str, str]], full_key: str) -> ApiResult:
        """The answer of one range query: stored extents, the missing ones fetched."""
        total = (last - first) // step_ms + 1
        settled_last = min(last, live_from - step_ms)
        length = splitting.block_len(step_ms, self.split_ms)
        blocks = splitting.blocks(first, settled_last, step_ms, length) if settled_last >= first else []
        # Live points are reused by the very same request only: an upstream may answer an
        # instant near now differently in another range (VictoriaMetrics does).
        live_key = f"{base}:live:{first}:{last}"
        raw = await self.store.get_many([self._block_key(base, length, bi) for bi in blocks] + [live_key])
        # Each source with the instants it may give this request (not cut here: only the
        # two edge blocks are cut, once, when the answer is assembled).
        sources: list[tuple[Extent, int]] = [(Extent.decode(data), settled_last) for data in raw[:-1]
                                             if data is not None]
        if raw[-1] is not None:
            sources.append((Extent.decode(raw[-1]), last))
        covered = normalise([iv for e, upto in sources for iv in intersect(e.covered, first, upto)], step_ms)
        missing = subtract(first, last, covered, step_ms)
        pieces = self._pieces(missing, first, last, step_ms, start, end,
                              splitting.part_len(step_ms, self.split_ms))

        futures: list[asyncio.Future[_Flight]] = []
        leads: list[bool] = []
        for piece in pieces:
            fkey = f"{base}|{piece.a}|{piece.b}|{piece.start}|{piece.end}"
            fut, leader = self.pieces.join(fkey)
            leads.append(leader)
            if leader:
                self._spawn(self._fetch_piece(fkey, fut, piece, expr, step_ms, params, rch, base,
                                              live_key, deadline, headers))
            futures.append(fut)
        fetched = await self._wait(futures, deadline)

        fetched_steps = min(total, sum((p.b - p.a) // step_ms + 1 for p in pieces))
        cached_steps = total - fetched_steps
        led = any(leads)
        led_steps = sum((p.b - p.a) // step_ms + 1 for p, lead in zip(pieces, leads, strict=True) if lead)
        if not covered and len(pieces) == 1 and (pieces[0].a, pieces[0].b) == (first, last):
            # The whole answer is one upstream answer: pass it on as it came.
            lookup = Lookup.MISS if led else Lookup.COALESCED
            self._count("range", lookup, 0, led_steps, total - led_steps)
            answer = fetched[0].answer
            if fetched[0].extent is not None:
                await self.store.put_many([(memo_key, answer.raw, memo_ttl)])
            return ApiResult(answer.status_code, None, lookup, raw=answer.raw)
        if any(f.extent is None for f in fetched):
            # A piece carried warnings, an error or points off the grid: not assembled;
            # the caller gets upstream's own answer for the whole range.
            self._count("range", Lookup.MISS, 0, led_steps, 0)
            return await self._pass("/api/v1/query_range", base_params, deadline, headers, full_key)

        segments: list[tuple[Interval, Extent]] = []
        taken: list[Interval] = []
        for f in fetched:
            assert f.extent is not None
            segments.append((f.extent.covered[0], f.extent))
            taken.append(f.extent.covered[0])
        for source, upto in sources:
            free = normalise(taken, step_ms)
            for a, b in intersect(source.covered, first, upto):
                for part in subtract(a, b, free, step_ms):
                    segments.append((part, source))
                    taken.append(part)
        segments.sort(key=lambda seg: seg[0])
        size = sum(e.size() for _, e in segments)
        body = await _cpu(body_of, segments, step_ms, heavy=size > THREAD_BYTES)
        await self.store.put_many([(memo_key, body, memo_ttl)])
        if not fetched:
            lookup = Lookup.HIT
        elif cached_steps > 0:
            lookup = Lookup.PARTIAL
        else:
            lookup = Lookup.MISS if led else Lookup.COALESCED
        self._count("range", lookup, cached_steps, led_steps, fetched_steps - led_steps)
        return ApiResult(200, None, lookup, raw=body)

    @staticmethod
    def _block_key(base: str, length: int, index: int) -> str:
        return f"{base}:b{length}:{index}"

    @staticmethod
    def _pieces(missing: list[Interval], first: int, last: int, step: int,
                start: float, end: float, part: int) -> list[_Piece]:
        """What to fetch: the missing intervals (one span when there are many) cut at part
        boundaries, in chunks Prometheus accepts; a piece at the request's own edge is sent
        with its own string. The live tail is fetched with the part it ends."""
        if len(missing) > MAX_PIECES:
            missing = [(missing[0][0], missing[-1][1])]
        out: list[_Piece] = []
        for a, b in splitting.split(missing, step, part):
            while a <= b:
                chunk_end = min(b, a + (MAX_STEPS - 1) * step)
                out.append(_Piece(a, chunk_end,
                                  repr_time(start) if a == first else fmt_ms(a),
                                  repr_time(end) if chunk_end == last else fmt_ms(chunk_end)))
                a = chunk_end + step
        return out

    async def _fetch_piece(self, fkey: str, fut: asyncio.Future[_Flight], piece: _Piece, expr: str,
                           step_ms: int, params: Sequence[tuple[str, str]], rch: Reach, base: str,
                           live_key: str, deadline: float, headers: Mapping[str, str] | None) -> None:
        outcome: _Flight = UpstreamError("internal", "range fetch ended without an answer")
        try:
            cutoff = int(self.clock() * 1000) - self.live_window_ms
            query = [("query", expr), ("start", piece.start), ("end", piece.end),
                     ("step", fmt_ms(step_ms)), *list(params)]
            try:
                answer = await self._ask("/api/v1/query_range", query, "range", deadline, headers)
            except UpstreamError as exc:
                outcome = exc
                return
            extent = None
            if answer.status_code == 200:
                extent = await _cpu(extent_of, answer.raw, piece.a, piece.b, step_ms,
                                    heavy=len(answer.raw) > THREAD_BYTES)
            outcome = _Fetched(answer, extent)
            if extent is not None:
                await self._keep(base, live_key, extent, piece, step_ms, rch, cutoff)
        finally:
            self.pieces.settle(fkey, fut, outcome)

    async def _keep(self, base: str, live_key: str, extent: Extent, piece: _Piece, step_ms: int,
                    rch: Reach, cutoff: int) -> None:
        """Settled instants into their blocks (merged with what is there), live ones into
        the request's live record for seconds only."""
        live_from = rch.first_live(piece.a, step_ms, cutoff)
        settled_last = min(piece.b, live_from - step_ms)
        length = splitting.block_len(step_ms, self.split_ms)
        blocks = splitting.blocks(piece.a, settled_last, step_ms, length) if settled_last >= piece.a else []
        keys = [self._block_key(base, length, bi) for bi in blocks]
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
                    span = splitting.block_span(bi, phase, step_ms, length)
                    part = settled.clip(*span, step_ms)
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

    # -- instant queries -------------------------------------------------------------------

    async def query(self, *, scope: str, expr: str, time: float | None,
                    params: Sequence[tuple[str, str]], deadline: float,
                    headers: Mapping[str, str] | None = None) -> ApiResult:
        """An instant query. Without `time` it is evaluated at a now the gateway picks,
        sent upstream explicitly and reported (``evaluated_at``; Prometheus' ``value[0]``
        carries it too), and reused for at most the figure TTL. With `time`, an answer
        that reads only settled data is kept like a settled extent."""
        if any(name in BYPASS_PARAMS for name, _ in params) or self.settings.range_cache_max_bytes <= 0:
            query = [("query", expr), *([("time", repr_time(time))] if time is not None else []), *params]
            return await self._pass("/api/v1/query", query, deadline, headers, None)
        base = _key("instant", scope, expr, _params_key(params))
        if time is None:
            key, ttl, t_ms = f"{base}:now", self.settings.ttl_for("api"), None
        else:
            t_ms = ms_of(time)
            try:
                rch = instant_reach(expr, t_ms).union(AT_LEAST_NOW)
                latest = rch.latest(t_ms)
                settled = latest is None or latest <= int(self.clock() * 1000) - self.live_window_ms
            except (Uncacheable, ValueError, RuntimeError):
                query = [("query", expr), ("time", repr_time(time)), *params]
                return await self._pass("/api/v1/query", query, deadline, headers,
                                        _key("instant-pass", scope, expr, t_ms, _params_key(params)))
            ttl = (self.settings.range_cache_ttl_seconds if settled
                   else self.settings.range_cache_live_ttl_seconds)
            key = f"{base}:t{t_ms}"
        data = (await self.store.get_many([key]))[0]
        if data is not None:
            # "<evaluation time ms>\n" then upstream's own bytes: sent as they came.
            t_text, _, body = data.partition(b"\n")
            self._count("instant", Lookup.HIT)
            return ApiResult(200, None, Lookup.HIT, int(t_text) / 1000, raw=body)
        # Identical instant queries are answered once: in this process (SingleFlight) and,
        # with the shared tier, across the fleet (the range queries' lock and hand-over).
        fut, leader = self.instants.join(key)
        if leader:
            self._spawn(self._fetch_instant(key, fut, expr, t_ms, params, ttl, deadline, headers))
        outcome: ApiResult = (await self._wait([fut], deadline))[0]
        lookup = outcome.lookup if leader else Lookup.COALESCED
        if not leader or lookup is Lookup.MISS:  # (a fleet hit or hand-over counted itself)
            self._count("instant", lookup)
        return ApiResult(outcome.status_code, None, lookup, outcome.evaluated_at, raw=outcome.raw)

    async def _fetch_instant(self, key: str, fut: asyncio.Future[_Instant], expr: str, t_ms: int | None,
                             params: Sequence[tuple[str, str]], ttl: float, deadline: float,
                             headers: Mapping[str, str] | None) -> None:
        outcome: _Instant = UpstreamError("internal", "instant fetch ended without an answer")

        async def evaluate() -> ApiResult:
            t = t_ms if t_ms is not None else int(self.clock() * 1000)
            query = [("query", expr), ("time", fmt_ms(t)), *list(params)]
            answer = await self._ask("/api/v1/query", query, "instant", deadline, headers)
            if answer.status_code == 200 and storable(answer.doc):
                await self.store.put_many([(key, b"%d\n" % t + answer.raw, ttl)])
            return ApiResult(answer.status_code, None, Lookup.MISS, t / 1000, raw=answer.raw)

        try:
            outcome = await self._fleet(key, deadline, 0, evaluate, category="instant")
        except UpstreamError as exc:
            outcome = exc
        finally:
            self.instants.settle(key, fut, outcome)

    async def _ask(self, path: str, params: Sequence[tuple[str, str]], category: str, deadline: float,
                   headers: Mapping[str, str] | None) -> Answer:
        """One upstream API request with what is left of the caller's deadline (event-loop time)."""
        return await self.client.api("POST", path, list(params), category=category, headers=headers,
                                     timeout=deadline - asyncio.get_running_loop().time())

    # -- pass-through ----------------------------------------------------------------------

    async def _pass(self, path: str, params: Sequence[tuple[str, str]], deadline: float,
                    headers: Mapping[str, str] | None, key: str | None) -> ApiResult:
        """Upstream's own answer, never stored; coalesced with identical requests when keyed."""
        category = "range" if path.endswith("range") else "instant"
        params = list(params)
        if key is None:
            answer = await self._ask(path, params, category, deadline, headers)
            gm.cache_outcome(category, Lookup.MISS)
            return ApiResult(answer.status_code, answer.doc, Lookup.MISS, raw=answer.raw)
        fut, leader = self.passed.join(key)
        if leader:
            self._spawn(self._fetch_pass(key, fut, path, params, category, deadline, headers))
        outcome = (await self._wait([fut], deadline))[0]
        lookup = Lookup.MISS if leader else Lookup.COALESCED
        gm.cache_outcome(category, lookup)
        return ApiResult(outcome.status_code, outcome.doc, lookup, raw=outcome.raw)

    async def _fetch_pass(self, key: str, fut: asyncio.Future[_Passed], path: str,
                          params: Sequence[tuple[str, str]], category: str, deadline: float,
                          headers: Mapping[str, str] | None) -> None:
        outcome: _Passed = UpstreamError("internal", "fetch ended without an answer")
        try:
            outcome = await self._ask(path, params, category, deadline, headers)
        except UpstreamError as exc:
            outcome = exc
        finally:
            self.passed.settle(key, fut, outcome)

    # -- plumbing --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        """A fetch shared with other requests must outlive the one that started it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _wait(futures: Sequence[asyncio.Future[_T]], deadline: float) -> list[Any]:
        """Every outcome, or the first upstream error; a timeout past the deadline."""
        if futures:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(futures, timeout=remaining)
        out: list[Any] = []
        for fut in futures:
            if not fut.done():
                raise UpstreamError("timeout", "request deadline reached before the upstream answered")
            outcome = fut.result()
            if isinstance(outcome, UpstreamError):
                raise outcome
            out.append(outcome)
        return out

    @staticmethod
    def _count(category: str, lookup: Lookup, cached: int = 0, fetched: int = 0,
               coalesced: int = 0) -> None:
        """One lookup; evaluation steps served from the store, fetched by this request,
        or fetched by another request it waited on."""
        gm.cache_outcome(category, lookup)
        gm.range_steps(cached, fetched, coalesced)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _shared_result(status: int, body: bytes, lookup: Lookup, category: str) -> ApiResult:
    """An answer handed over by another process of the fleet (see RangeCache._fleet)."""
    if category != "instant":
        return ApiResult(status, None, lookup, raw=body)
    t_text, _, raw = body.partition(b"\n")
    return ApiResult(status, None, lookup, int(t_text) / 1000, raw=raw)


def repr_time(seconds: float) -> str:
    """A float time or step as a decimal string Prometheus parses to the same value."""
    text = repr(float(seconds))
    return text[:-2] if text.endswith(".0") else text


async def _cpu(fn: Callable[..., _T], *args: Any, heavy: bool) -> _T:
    """Run CPU work in a worker thread when it is big enough to stall the event loop."""
    if heavy:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
