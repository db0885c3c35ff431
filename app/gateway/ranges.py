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
Extents are kept in blocks of ``BLOCK_STEPS`` grid instants, so a store entry
stays small and the byte bound evicts old time first. Identical fetches in
flight are coalesced with the engine's ``SingleFlight``.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import promql_parser as pp

from app.common import tracing
from app.gateway import metrics as gm
from app.gateway.engine import SingleFlight
from app.gateway.result import Lookup, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.shared import ALONE, SharedAnswer, SharedFlights
from app.gateway.upstream import UpstreamError

log = logging.getLogger("gateway.ranges")

# Prometheus refuses a range query of more than 11,000 steps ((end-start)/step > 11000).
MAX_STEPS = 11_000
BLOCK_STEPS = 240  # grid instants per stored block (1 h at a 15 s step)
MAX_PIECES = 3  # more missing pieces than this: fetch one span instead
KEY_VERSION = "rc1"
# Parameters that make an answer uncacheable (Prometheus' per-query statistics).
BYPASS_PARAMS = frozenset({"stats"})
# A whole answer is remembered at most this long (its extents stay longer): a window
# moves with every refresh, so old bodies should leave room for extents.
MEMO_MAX_SECONDS = 600.0
# Assembling more points than this runs in a worker thread, off the event loop.
THREAD_POINTS = 20_000

Interval = tuple[int, int]  # [first, last] grid instants in ms, both included
LabelKey = tuple[tuple[str, str], ...]
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


def _json_ts(ms: int) -> int | float:
    """A timestamp as Prometheus writes it (seconds; a fraction only when there is one)."""
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


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


# -- extents: covered instants and their points --------------------------------------------

def normalise(intervals: Iterable[Interval], step: int) -> list[Interval]:
    """Sorted, disjoint intervals; touching ones (b + step == a') joined."""
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if a > b:
            continue
        if out and a <= out[-1][1] + step:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def subtract(a: int, b: int, covered: Sequence[Interval], step: int) -> list[Interval]:
    """The parts of [a, b] not in `covered` (normalised, on the same grid)."""
    out: list[Interval] = []
    cur = a
    for ca, cb in covered:
        if cb < cur:
            continue
        if ca > b:
            break
        if ca > cur:
            out.append((cur, min(ca - step, b)))
        cur = max(cur, cb + step)
        if cur > b:
            break
    if cur <= b:
        out.append((cur, b))
    return out


def intersect(covered: Sequence[Interval], a: int, b: int) -> list[Interval]:
    return [(max(ca, a), min(cb, b)) for ca, cb in covered if cb >= a and ca <= b]


def steps_in(intervals: Iterable[Interval], step: int) -> int:
    return sum((b - a) // step + 1 for a, b in intervals)


def _inside(ts: int, covered: Sequence[Interval]) -> bool:
    i = bisect.bisect_right(covered, (ts, 2**63)) - 1
    return i >= 0 and covered[i][0] <= ts <= covered[i][1]


@dataclass(slots=True)
class SeriesPoints:
    metric: dict[str, str]
    floats: list[tuple[int, Any]] = field(default_factory=list)  # (ms, value string)
    hists: list[tuple[int, Any]] = field(default_factory=list)  # (ms, native histogram object)

    def points(self) -> int:
        return len(self.floats) + len(self.hists)


@dataclass(slots=True)
class Extent:
    """Exact upstream points for every instant in `covered` (series absent: no point)."""

    covered: list[Interval]
    series: dict[LabelKey, SeriesPoints]

    def clip(self, a: int, b: int) -> Extent:
        covered = intersect(self.covered, a, b)
        out: dict[LabelKey, SeriesPoints] = {}
        for key, s in self.series.items():
            floats = [p for p in s.floats if a <= p[0] <= b]
            hists = [p for p in s.hists if a <= p[0] <= b]
            if floats or hists:
                out[key] = SeriesPoints(s.metric, floats, hists)
        return Extent(covered, out)

    def merge(self, newer: Extent, step: int) -> Extent:
        """Both extents' instants; where both cover an instant, `newer`'s points."""
        out: dict[LabelKey, SeriesPoints] = {}
        for key, s in self.series.items():
            floats = [p for p in s.floats if not _inside(p[0], newer.covered)]
            hists = [p for p in s.hists if not _inside(p[0], newer.covered)]
            if floats or hists:
                out[key] = SeriesPoints(s.metric, floats, hists)
        for key, s in newer.series.items():
            have = out.get(key)
            if have is None:
                out[key] = SeriesPoints(s.metric, list(s.floats), list(s.hists))
            else:
                have.floats = sorted(have.floats + s.floats, key=_ts)
                have.hists = sorted(have.hists + s.hists, key=_ts)
        return Extent(normalise(self.covered + newer.covered, step), out)

    def points(self) -> int:
        return sum(s.points() for s in self.series.values())

    def encode(self) -> bytes:
        doc = {"c": self.covered,
               "s": [[s.metric, s.floats, s.hists] for s in self.series.values()]}
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> Extent:
        doc = json.loads(data)
        series: dict[LabelKey, SeriesPoints] = {}
        for metric, floats, hists in doc["s"]:
            series[label_key(metric)] = SeriesPoints(
                metric, [(int(t), v) for t, v in floats], [(int(t), h) for t, h in hists])
        return cls([(int(a), int(b)) for a, b in doc["c"]], series)


def _ts(p: tuple[int, Any]) -> int:
    return p[0]


def label_key(metric: Mapping[str, str]) -> LabelKey:
    """A label set in Prometheus' order: pairs sorted by name. Comparing these tuples is
    labels.Compare (name, then value, then length; code point order = UTF-8 byte order)."""
    return tuple(sorted(metric.items()))


_ENVELOPE_KEYS = frozenset({"status", "data"})
_DATA_KEYS = frozenset({"resultType", "result"})
_SERIES_KEYS = frozenset({"metric", "values", "histograms"})


def storable(doc: Mapping[str, Any]) -> bool:
    """A plain success: nothing but status and data (no warnings, infos, stats)."""
    data = doc.get("data")
    return (doc.get("status") == "success" and set(doc) <= _ENVELOPE_KEYS
            and isinstance(data, dict) and set(data) <= _DATA_KEYS and "result" in data)


def extent_of(doc: Mapping[str, Any], a: int, b: int, step: int) -> Extent | None:
    """The fetched answer for [a, b] as an Extent, or None when it cannot be trusted
    per instant: not a plain success, not a matrix, a point off the grid or outside
    [a, b] (an upstream that aligns or extends ranges), a repeated series or point."""
    if not storable(doc) or doc["data"].get("resultType") != "matrix":
        return None
    result = doc["data"]["result"]
    if not isinstance(result, list):
        return None
    series: dict[LabelKey, SeriesPoints] = {}
    try:
        for s in result:
            if not isinstance(s, dict) or not set(s) <= _SERIES_KEYS:
                return None
            metric = s.get("metric")
            if not isinstance(metric, dict) or not all(isinstance(v, str) for v in metric.values()):
                return None
            key = label_key(metric)
            if key in series:
                return None
            floats = _grid_points(s.get("values") or [], a, b, step)
            hists = _grid_points(s.get("histograms") or [], a, b, step)
            if floats is None or hists is None:
                return None
            series[key] = SeriesPoints(dict(metric), floats, hists)
    except (TypeError, ValueError, IndexError):
        return None
    return Extent([(a, b)], series)


def _grid_points(points: Sequence[Any], a: int, b: int, step: int) -> list[tuple[int, Any]] | None:
    out: list[tuple[int, Any]] = []
    last = a - step
    for ts, value in points:
        ms = _go_round(float(ts) * 1000)
        if ms <= last or ms > b or (ms - a) % step:
            return None
        out.append((ms, value))
        last = ms
    return out


def assemble(segments: Sequence[tuple[Interval, Extent]]) -> list[dict[str, Any]]:
    """A matrix result from per-instant sources, sorted as Prometheus sorts a matrix."""
    merged: dict[LabelKey, SeriesPoints] = {}
    for (a, b), extent in segments:
        for key, s in extent.series.items():
            floats = [p for p in s.floats if a <= p[0] <= b]
            hists = [p for p in s.hists if a <= p[0] <= b]
            if not floats and not hists:
                continue
            have = merged.get(key)
            if have is None:
                merged[key] = SeriesPoints(s.metric, floats, hists)
            else:
                have.floats.extend(floats)
                have.hists.extend(hists)
    out: list[dict[str, Any]] = []
    for key in sorted(merged):
        s = merged[key]
        item: dict[str, Any] = {"metric": dict(key)}
        if s.floats:
            item["values"] = [[_json_ts(t), v] for t, v in sorted(s.floats, key=_ts)]
        if s.hists:
            item["histograms"] = [[_json_ts(t), h] for t, h in sorted(s.hists, key=_ts)]
        out.append(item)
    return out


def prom_ts(t: int | float) -> str:
    """A timestamp (seconds) written as Prometheus writes it (jsonutil.MarshalTimestamp):
    whole seconds, and the milliseconds as three digits when there are any ("…34.770",
    where json.dumps would write "…34.77"), so assembled bodies equal upstream's bytes."""
    ms = t * 1000 if isinstance(t, int) else round(t * 1000)
    sign = "-" if ms < 0 else ""
    sec, frac = divmod(abs(ms), 1000)
    return f"{sign}{sec}" if frac == 0 else f"{sign}{sec}.{frac:03d}"


def _assembled_body(segments: Sequence[tuple[Interval, Extent]]) -> bytes:
    def dumps(x: Any) -> str:
        return json.dumps(x, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    items = []
    for item in assemble(segments):
        fields = [f'"metric":{dumps(item["metric"])}']
        for name in ("values", "histograms"):
            if name in item:
                points = ",".join(f"[{prom_ts(t)},{dumps(v)}]" for t, v in item[name])
                fields.append(f'"{name}":[{points}]')
        items.append("{" + ",".join(fields) + "}")
    return ('{"status":"success","data":{"resultType":"matrix","result":[' + ",".join(items) + "]}}").encode()


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


@dataclass(frozen=True, slots=True)
class _Evaluated:
    answer: Answer
    t: int  # the evaluation time sent upstream (ms)


_Flight = _Fetched | UpstreamError
_Request = ApiResult | UpstreamError
_Passed = Answer | UpstreamError
_Instant = _Evaluated | UpstreamError


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
        tracing.note({"gateway.query_hash": tracing.query_hash(expr)})
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
        # recent instant allows (seconds when it has live instants).
        memo_key = f"{base}:ans:{first}:{last}"
        memo_ttl = (self.settings.range_cache_live_ttl_seconds if live_from <= last
                    else min(self.settings.range_cache_ttl_seconds, MEMO_MAX_SECONDS))
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
                     make: Callable[[], Coroutine[Any, Any, ApiResult]]) -> ApiResult:
        """One process of the fleet answers a request; the others wait for its answer.

        Without the shared tier, or when it fails, this process answers alone (as a
        single process does). A holder that dies blocks the others for at most one
        lease (one of them takes over); a failure reaches that flight's waiters only.
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
            self._count("range", Lookup.HIT, total, 0, 0)
            return ApiResult(200, None, Lookup.HIT, raw=claim.body)
        if claim.holder is not None:
            with tracing.span("shared tier wait"):
                got = await fleet.wait(key, claim.token, claim.holder, deadline)
            if isinstance(got, SharedAnswer):
                self._count("range", Lookup.COALESCED, 0, 0, total)
                return ApiResult(got.status_code, None, Lookup.COALESCED, raw=got.body)
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
        blocks = self._blocks(first, settled_last, step_ms) if settled_last >= first else []
        # Live points are reused by the very same request only: an upstream may answer an
        # instant near now differently in another range (VictoriaMetrics does).
        live_key = f"{base}:live:{first}:{last}"
        with tracing.span("cache lookup", {"gateway.keys": len(blocks) + 1}):
            raw = await self.store.get_many([f"{base}:b{bi}" for bi in blocks] + [live_key])
        stored: list[Extent] = []
        for data in raw[:-1]:
            if data is not None:
                stored.append(Extent.decode(data).clip(first, settled_last))
        live = Extent.decode(raw[-1]).clip(first, last) if raw[-1] is not None else None
        covered = normalise([iv for e in stored for iv in e.covered]
                            + (live.covered if live is not None else []), step_ms)
        missing = subtract(first, last, covered, step_ms)
        pieces = self._pieces(missing, first, last, step_ms, start, end)

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
            return ApiResult(answer.status_code, answer.doc, lookup, raw=answer.raw)
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
        for source in [*stored, *([live] if live is not None else [])]:
            free = normalise(taken, step_ms)
            for a, b in source.covered:
                for part in subtract(a, b, free, step_ms):
                    segments.append((part, source))
                    taken.append(part)
        segments.sort(key=lambda seg: seg[0])
        points = sum(e.points() for _, e in segments)
        with tracing.span("assembly", {"gateway.segments": len(segments), "gateway.points": points}):
            body = await _cpu(_assembled_body, segments, heavy=points > THREAD_POINTS)
        await self.store.put_many([(memo_key, body, memo_ttl)])
        if not fetched:
            lookup = Lookup.HIT
        elif cached_steps > 0:
            lookup = Lookup.PARTIAL
        else:
            lookup = Lookup.MISS if led else Lookup.COALESCED
        self._count("range", lookup, cached_steps, led_steps, fetched_steps - led_steps)
        return ApiResult(200, None, lookup, raw=body)

    def _blocks(self, a: int, b: int, step: int) -> list[int]:
        phase = a % step
        return list(range(((a - phase) // step) // BLOCK_STEPS, ((b - phase) // step) // BLOCK_STEPS + 1))

    @staticmethod
    def _block_span(bi: int, phase: int, step: int) -> Interval:
        a = phase + bi * BLOCK_STEPS * step
        return a, a + (BLOCK_STEPS - 1) * step

    @staticmethod
    def _pieces(missing: list[Interval], first: int, last: int, step: int,
                start: float, end: float) -> list[_Piece]:
        """What to fetch: the missing intervals (one span when there are many), in chunks
        Prometheus accepts; a piece at the request's own edge is sent with its own string."""
        if len(missing) > MAX_PIECES:
            missing = [(missing[0][0], missing[-1][1])]
        out: list[_Piece] = []
        for a, b in missing:
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
                with tracing.span("range piece", {"gateway.range.start": piece.start, "gateway.range.end": piece.end,
                                                  "gateway.range.steps": (piece.b - piece.a) // step_ms + 1}):
                    answer = await self._ask("/api/v1/query_range", query, "range", deadline, headers)
            except UpstreamError as exc:
                outcome = exc
                return
            extent = None
            if answer.status_code == 200:
                data = answer.doc.get("data")
                result = data.get("result") if isinstance(data, dict) else None
                size = len(result) if isinstance(result, list) else 0
                heavy = size * ((piece.b - piece.a) // step_ms + 1) > THREAD_POINTS
                extent = await _cpu(extent_of, answer.doc, piece.a, piece.b, step_ms, heavy=heavy)
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
        blocks = self._blocks(piece.a, settled_last, step_ms) if settled_last >= piece.a else []
        keys = [f"{base}:b{bi}" for bi in blocks]
        old = await self.store.get_many(keys) if keys else []

        def build() -> list[tuple[str, bytes, float]]:
            items: list[tuple[str, bytes, float]] = []
            if blocks:
                settled = extent.clip(piece.a, settled_last)
                phase = piece.a % step_ms
                for bi, key, data in zip(blocks, keys, old, strict=True):
                    part = settled.clip(*self._block_span(bi, phase, step_ms))
                    if data is not None:
                        part = Extent.decode(data).merge(part, step_ms)
                    items.append((key, part.encode(), self.settings.range_cache_ttl_seconds))
            if live_from <= piece.b:
                live = extent.clip(max(piece.a, live_from), piece.b)
                items.append((live_key, live.encode(), self.settings.range_cache_live_ttl_seconds))
            return items

        items = await _cpu(build, heavy=extent.points() > THREAD_POINTS)
        await self.store.put_many(items)

    # -- instant queries -------------------------------------------------------------------

    async def query(self, *, scope: str, expr: str, time: float | None,
                    params: Sequence[tuple[str, str]], deadline: float,
                    headers: Mapping[str, str] | None = None) -> ApiResult:
        """An instant query. Without `time` it is evaluated at a now the gateway picks,
        sent upstream explicitly and reported (``evaluated_at``; Prometheus' ``value[0]``
        carries it too), and reused for at most the figure TTL. With `time`, an answer
        that reads only settled data is kept like a settled extent."""
        tracing.note({"gateway.query_hash": tracing.query_hash(expr)})
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
        fut, leader = self.instants.join(key)
        if leader:
            self._spawn(self._fetch_instant(key, fut, expr, t_ms, params, ttl, deadline, headers))
        outcome: _Evaluated = (await self._wait([fut], deadline))[0]
        lookup = Lookup.MISS if leader else Lookup.COALESCED
        self._count("instant", lookup)
        return ApiResult(outcome.answer.status_code, outcome.answer.doc, lookup, outcome.t / 1000,
                         raw=outcome.answer.raw)

    async def _fetch_instant(self, key: str, fut: asyncio.Future[_Instant], expr: str, t_ms: int | None,
                             params: Sequence[tuple[str, str]], ttl: float, deadline: float,
                             headers: Mapping[str, str] | None) -> None:
        outcome: _Instant = UpstreamError("internal", "instant fetch ended without an answer")
        try:
            t = t_ms if t_ms is not None else int(self.clock() * 1000)
            query = [("query", expr), ("time", fmt_ms(t)), *list(params)]
            try:
                answer = await self._ask("/api/v1/query", query, "instant", deadline, headers)
            except UpstreamError as exc:
                outcome = exc
                return
            outcome = _Evaluated(answer, t)
            if answer.status_code == 200 and storable(answer.doc):
                await self.store.put_many([(key, b"%d\n" % t + answer.raw, ttl)])
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


def repr_time(seconds: float) -> str:
    """A float time or step as a decimal string Prometheus parses to the same value."""
    text = repr(float(seconds))
    return text[:-2] if text.endswith(".0") else text


async def _cpu(fn: Callable[..., _T], *args: Any, heavy: bool) -> _T:
    """Run CPU work in a worker thread when it is big enough to stall the event loop."""
    if heavy:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
