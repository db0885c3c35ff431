"""The range cache's arithmetic: Prometheus' time grid, extents, freshness, assembly.

The exactness against real Prometheus and VictoriaMetrics is proven by the
integration tests (test_range_cache_compliance.py, test_victoriametrics.py);
these pin the pieces those rely on, each with a case that fails without it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from app.gateway.caching.extents import label_key, normalise, storable, subtract
from app.gateway.caching.fragments import FLOAT_SEP, HIST_SEP, Extent, body_of, cut, extent_of
from app.gateway.caching.stores import MemoryExtentStore
from app.gateway.engines.ranges import RangeCache, pieces_of
from app.gateway.engines.splitting import BLOCK_STEPS, block_len, part_len, split
from app.gateway.promql.reach import Reach, Uncacheable, instant_reach, range_reach
from app.gateway.promql.request import Origin, instant_query, range_query
from app.gateway.promql.timing import fmt_ms, parse_duration, parse_time, ts_text
from app.gateway.result import Lookup
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError

S = 1000  # ms per second


# -- Prometheus' time grid ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "ms"), [
    ("1700000000", 1700000000000),
    ("1700000000.29", 1700000000290),  # float 1700000000.2899999619 still reads as .290
    ("1700000000.1234", 1700000000123),
    ("1700000000.1235", 1700000000124),  # Go rounds the fraction half away from zero
    ("1.0625", 1063),  # exactly half a millisecond: away from zero (Python's round() gives 1062)
    ("-1.0625", -1063),
    ("1.0005", 1000),  # the float is 1.000499999...: below the half
    ("-1.5", -1500),
    ("0.0005", 1),
    ("1e3", 1_000_000),
    ("2015-07-01T20:10:51.781Z", 1435781451781),
    ("2015-07-01T22:10:51.781+02:00", 1435781451781),
    ("2015-07-01T18:40:51.781-01:30", 1435781451781),
    ("2015-07-01T20:10:51.7819999Z", 1435781451781),  # nanoseconds truncated to the millisecond
    ("2015-07-01T20:10:51.1234567891Z", 1435781451123),  # digits past the ninth ignored
    ("1969-12-31T23:59:59.9995Z", -1),  # before the epoch: still truncated toward the past
    ("2015-07-01T20:10:51Z", 1435781451000),
])
def test_parse_time_reads_times_as_prometheus(text: str, ms: int) -> None:
    assert parse_time(text).ms == ms
    assert parse_time(text).text == text


def test_fmt_ms_round_trips_every_millisecond_fraction() -> None:
    for frac in range(1000):
        ms = 1_700_000_000_000 + frac
        assert parse_time(fmt_ms(ms)).ms == ms
    assert fmt_ms(1_700_000_000_000) == "1700000000"
    assert fmt_ms(1_700_000_000_500) == "1700000000.5"
    assert fmt_ms(-1500) == "-1.5"


@pytest.mark.parametrize(("text", "ms"), [
    ("15", 15_000), ("0.0015", 1), ("86400", 86_400_000), ("0.0001", 0),
    ("1s7ms", 1007),  # exact: 1.007 s as a float would truncate to 1006 ms
    ("1h30m", 5_400_000), ("250ms", 250),
])
def test_step_is_truncated_to_whole_milliseconds(text: str, ms: int) -> None:
    assert parse_duration(text).ms == ms


# -- intervals ------------------------------------------------------------------------------

def test_normalise_joins_overlapping_and_touching_intervals() -> None:
    assert normalise([(30, 40), (0, 10), (20, 20), (60, 70)], 10) == [(0, 40), (60, 70)]
    assert normalise([(0, 100), (10, 20)], 10) == [(0, 100)]
    assert normalise([], 10) == []


@pytest.mark.parametrize(("covered", "missing"), [
    ([], [(0, 100)]),
    ([(0, 100)], []),
    ([(-50, 200)], []),
    ([(0, 40)], [(50, 100)]),
    ([(60, 100)], [(0, 50)]),
    ([(20, 40), (70, 80)], [(0, 10), (50, 60), (90, 100)]),
    ([(110, 200)], [(0, 100)]),
])
def test_subtract_gives_the_missing_extents(covered: list[tuple[int, int]],
                                            missing: list[tuple[int, int]]) -> None:
    assert subtract(0, 100, covered, 10) == missing


# -- freshness: the latest sample time each evaluation step reads ---------------------------

@pytest.mark.parametrize(("expr", "relative", "fixed"), [
    ("demo_num_cpus", 0, None),
    ("rate(demo_cpu_usage_seconds_total[5m])", 0, None),
    ("demo_num_cpus offset 5m", -300 * S, None),
    ("demo_num_cpus offset -5m", 300 * S, None),  # reads the future
    ("demo_num_cpus @ 1700000000", None, 1_700_000_000 * S),  # fixed
    ("demo_num_cpus @ 1700000000 offset 1m", None, 1_699_999_940 * S),
    ("demo_num_cpus offset -1m + demo_num_cpus offset 10m", 60 * S, None),
    ("max_over_time((time() - max(demo_batch_last_success_timestamp_seconds) < 1000)[5m:10s] offset 5m)",
     -300 * S, None),
    ("max_over_time((demo_num_cpus offset -2m)[5m:10s] offset 5m)", -180 * S, None),
    ("max_over_time((demo_num_cpus offset -2m)[5m:10s] @ 1000)", None, 1120 * S),
    ("max_over_time((demo_num_cpus @ 50)[5m:10s])", None, 50 * S),
    ("42", None, None),
    ("time() + vector(1)", None, None),
])
def test_reach_from_the_syntax_tree(expr: str, relative: int | None, fixed: int | None) -> None:
    assert range_reach(expr) == Reach(relative, fixed)


def test_start_and_end_modifiers_make_a_range_query_uncacheable() -> None:
    with pytest.raises(Uncacheable):
        range_reach("demo_num_cpus @ end()")
    with pytest.raises(Uncacheable):
        range_reach("max_over_time(demo_num_cpus[5m:1m] @ start())")
    # In an instant query start() and end() are its own time: fixed.
    assert instant_reach("demo_num_cpus @ end() offset 1m", 500 * S) == Reach(None, 440 * S)


def test_first_live_instant() -> None:
    step, first, cutoff = 15 * S, 0, 600 * S
    # Plain selector: instants after the cutoff are live.
    assert Reach(0).first_live(first, step, cutoff) == 615 * S
    # Reading 5 minutes back: instants up to cutoff + 5m are settled.
    assert Reach(-300 * S).first_live(first, step, cutoff) == 915 * S
    # Reading the future (offset -5m) makes earlier instants live.
    assert Reach(300 * S).first_live(first, step, cutoff) == 315 * S
    # Fixed in the past: never live; fixed in the future: always live.
    assert Reach(None, 100 * S).first_live(first, step, cutoff) > 10**15
    assert Reach(None, 700 * S).first_live(first, step, cutoff) == first
    assert Reach().first_live(first, step, cutoff) > 10**15
    # Phase: the grid starts at first, not at 0.
    assert Reach(0).first_live(7 * S, step, cutoff) == 607 * S


# -- extents (bytes: each series' points as the upstream wrote them) ------------------------

def series(metric: dict[str, str], points: Sequence[tuple[int, Any]], kind: str = "values") -> dict[str, Any]:
    """A series with points at whole-ms times (ms) as a Prometheus matrix item."""
    return {"metric": metric, kind: list(points)}


def raw_of(*items: dict[str, Any], **extra: Any) -> bytes:
    """The envelope as Prometheus writes it: compact JSON, timestamps as MarshalTimestamp."""
    def dumps(x: Any) -> str:
        return json.dumps(x, separators=(",", ":"), ensure_ascii=False)

    out = []
    for item in items:
        fields = [f'"metric":{dumps(item["metric"])}']
        for kind in ("values", "histograms"):
            if item.get(kind):
                pts = ",".join(f"[{ts_text(t).decode()},{dumps(v)}]" for t, v in item[kind])
                fields.append(f'"{kind}":[{pts}]')
        out.append("{" + ",".join(fields) + "}")
    tail = "".join(f',"{k}":{dumps(v)}' for k, v in extra.items())
    return ('{"status":"success","data":{"resultType":"matrix","result":[' + ",".join(out) + "]}" + tail
            + "}").encode()


def values(body: bytes) -> list[Any]:
    return [s.get("values") for s in json.loads(body)["data"]["result"]]


def test_extent_of_accepts_points_on_the_grid_only() -> None:
    good = raw_of(series({"a": "1"}, [(10 * S, "1"), (20 * S, "2"), (40 * S, "4")]))
    ext = extent_of(good, 10 * S, 40 * S, 10 * S)
    assert ext is not None and ext.covered == [(10 * S, 40 * S)]
    assert ext.series[b'{"a":"1"}'].floats == b'[10,"1"],[20,"2"],[40,"4"]'
    assert ext.series[b'{"a":"1"}'].metric == b'{"a":"1"}'
    # Off the grid (an upstream that aligns start to the step), outside, repeated: refused,
    # with and without gaps (the dense check and the point-by-point one).
    # (Not caught: a repeated instant hidden by an equal number of gaps, e.g. 10, 20, 20, 40:
    # the dense check counts points, it does not read them; no upstream writes that.)
    for pts in ([(15 * S, "1")], [(50 * S, "1")], [(20 * S, "1"), (20 * S, "1")],
                [(10 * S, "1"), (20 * S, "1"), (20 * S, "1")],
                [(10 * S, "1"), (25 * S, "1"), (40 * S, "1")], [(30 * S, "1"), (10 * S, "1")]):
        assert extent_of(raw_of(series({}, pts)), 10 * S, 40 * S, 10 * S) is None, pts
    assert extent_of(raw_of(series({"a": "1"}, [(0, "1")]), series({"a": "1"}, [(10 * S, "1")])),
                     0, 40 * S, 10 * S) is None
    # Warnings, infos, stats, errors, other result types, not JSON: never stored.
    assert extent_of(raw_of(warnings=["partial"]), 0, 40 * S, 10 * S) is None
    assert extent_of(raw_of(infos=["x"]), 0, 40 * S, 10 * S) is None
    assert extent_of(raw_of(stats={}), 0, 40 * S, 10 * S) is None
    assert not storable({"status": "success", "data": {"resultType": "matrix", "result": [], "stats": {}}})
    assert extent_of(b'{"status":"error","errorType":"bad_data","error":"x"}', 0, 10, 10) is None
    assert extent_of(b'{"status":"success","data":{"resultType":"vector","result":[]}}', 0, 10, 10) is None
    assert extent_of(b'{"status":"success","data":{"resultType":"matrix","result":[', 0, 10, 10) is None


def test_assembled_bodies_write_timestamps_as_prometheus_does() -> None:
    """jsonutil.MarshalTimestamp: milliseconds as three digits ("…0.770", "…0.007"), none
    for whole seconds; json.dumps would write "…0.77" and the bytes would differ."""
    assert [ts_text(t) for t in (1700000000000, 1700000000770, 1700000000007, 1700000000500, -1250)] == [
        b"1700000000", b"1700000000.770", b"1700000000.007", b"1700000000.500", b"-1.250"]
    raw = raw_of(series({"__name__": "x", "job": "j"}, [(1_700_000_000_770, "1"), (1_700_000_001_770, "2")]))
    ext = extent_of(raw, 1_700_000_000_770, 1_700_000_001_770, 1000)
    assert ext is not None
    body = body_of([((1_700_000_000_770, 1_700_000_001_770), ext)], 1000)
    assert body == raw == (b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"__name__":"x",'
                           b'"job":"j"},"values":[[1700000000.770,"1"],[1700000001.770,"2"]]}]}}')


def test_cuts_find_the_instant_with_and_without_gaps() -> None:
    dense = b'[10,"1"],[20,"2"],[30,"3"],[40,"4"]'
    assert cut(dense, FLOAT_SEP, 20 * S, 30 * S, 10 * S) == b'[20,"2"],[30,"3"]'
    assert cut(dense, FLOAT_SEP, 0, 10 * S, 10 * S) == b'[10,"1"]'
    assert cut(dense, FLOAT_SEP, 50 * S, 60 * S, 10 * S) == b""
    gaps = b'[10,"1"],[40,"4"],[60,"6"]'
    assert cut(gaps, FLOAT_SEP, 20 * S, 50 * S, 10 * S) == b'[40,"4"]'
    assert cut(gaps, FLOAT_SEP, 20 * S, 30 * S, 10 * S) == b""
    hist = b'[10,{"count":"1","buckets":[[0,"1","2","1"],[0,"2","3","0"]]}],[20,{"count":"2","buckets":[]}]'
    assert cut(hist, HIST_SEP, 20 * S, 20 * S, 10 * S) == b'[20,{"count":"2","buckets":[]}]'
    assert cut(hist, HIST_SEP, 0, 10 * S, 10 * S) == b'[10,{"count":"1","buckets":[[0,"1","2","1"],[0,"2","3","0"]]}]'


def test_merge_keeps_both_extents_and_prefers_the_newer_where_they_overlap() -> None:
    old = extent_of(raw_of(series({"s": "a"}, [(0, "1"), (10 * S, "2")]),
                           series({"s": "gone"}, [(0, "9")])), 0, 20 * S, 10 * S)
    new = extent_of(raw_of(series({"s": "a"}, [(20 * S, "3"), (30 * S, "4")]),
                           series({"s": "b"}, [(30 * S, "5")])), 20 * S, 30 * S, 10 * S)
    assert old is not None and new is not None
    merged = old.merge(new, 10 * S)
    assert merged.covered == [(0, 30 * S)]
    assert merged.series[b'{"s":"a"}'].floats == b'[0,"1"],[10,"2"],[20,"3"],[30,"4"]'
    assert merged.series[b'{"s":"gone"}'].floats == b'[0,"9"]'
    # An instant both cover: the old extent's point there is dropped, the newer one kept.
    newer = extent_of(raw_of(series({"s": "a"}, [(10 * S, "20")])), 10 * S, 10 * S, 10 * S)
    assert newer is not None
    again = merged.merge(newer, 10 * S)
    assert again.series[b'{"s":"a"}'].floats == b'[0,"1"],[10,"20"],[20,"3"],[30,"4"]'
    # A series the newer extent does not have at an instant it covers has no point there.
    gone = again.merge(extent_of(raw_of(), 0, 0, 10 * S) or Extent([], {}), 10 * S)
    assert b'{"s":"gone"}' not in gone.series
    # A re-check time survives merges: extending an entry never postpones it.
    old.expires, new.expires = 100.0, 0.0
    assert old.merge(new, 10 * S).expires == 100.0 and new.merge(old, 10 * S).expires == 100.0


def test_encode_decode_round_trip_keeps_strings_and_histograms() -> None:
    hist = {"count": "3", "sum": "1.5", "buckets": [[0, "0.1", "0.2", "3"]]}
    raw = raw_of({"metric": {"__name__": "h"}, "histograms": [(10 * S, hist)]},
                 series({"__name__": "x"}, [(10 * S, "1e-07"), (20 * S, "NaN"), (30 * S, "+Inf")]))
    ext = extent_of(raw, 10 * S, 30 * S, 10 * S)
    assert ext is not None
    back = Extent.decode(ext.encode())
    assert back == ext
    assert body_of([((10 * S, 30 * S), back)], 10 * S) == raw


def test_assemble_sorts_series_as_prometheus_sorts_a_matrix() -> None:
    labels = [{"__name__": "b"}, {"__name__": "a", "z": "1"}, {"__name__": "a"},
              {"__name__": "a", "job": "x"}, {"A": "1"}, {"__name__": "a", "job": "X"}]
    ext = extent_of(raw_of(*(series(m, [(0, "1")]) for m in labels)), 0, 0, S)
    assert ext is not None
    got = [s["metric"] for s in json.loads(body_of([((0, 0), ext)], S))["data"]["result"]]
    # labels.Compare: pairs sorted by name, then name, value, length; byte order
    # ("A" < "__name__" < "job"; "X" < "x").
    assert got == [{"A": "1"}, {"__name__": "a"}, {"__name__": "a", "job": "X"},
                   {"__name__": "a", "job": "x"}, {"__name__": "a", "z": "1"}, {"__name__": "b"}]
    assert label_key({"b": "1", "a": "2"}) == (("a", "2"), ("b", "1"))


def test_assemble_takes_each_instant_from_its_own_source_only() -> None:
    a = extent_of(raw_of(series({}, [(0, "a0"), (10 * S, "a1"), (20 * S, "a2")])), 0, 20 * S, 10 * S)
    b = extent_of(raw_of(series({}, [(20 * S, "b2"), (30 * S, "b3")])), 20 * S, 30 * S, 10 * S)
    assert a is not None and b is not None
    body = body_of([((0, 10 * S), a), ((20 * S, 30 * S), b)], 10 * S)
    assert values(body) == [[[0, "a0"], [10, "a1"], [20, "b2"], [30, "b3"]]]


def test_long_ranges_are_cut_at_step_aligned_part_boundaries() -> None:
    day, step = 86400 * S, 600 * S
    assert block_len(step, day) == part_len(step, day) == day  # 144 steps: one block per part
    assert block_len(15 * S, day) == 240 * 15 * S and part_len(15 * S, day) == day  # 24 blocks of 1 h
    assert part_len(300 * S, day) == 240 * 300 * S  # 20 h: the whole number of blocks nearest 24 h
    phase = 7 * S
    first, last = phase + 3 * step, phase + 3 * day + 5 * step
    parts = split([(first, last)], step, day)
    assert [b - a for a, b in parts] == [day - 4 * step, day - step, day - step, 5 * step]
    assert all((a - phase) % step == 0 and (b - phase) % step == 0 for a, b in parts)
    assert all((a - phase) % day == 0 for a, _ in parts[1:])  # each later part starts a part
    assert parts[0][0] == first and parts[-1][1] == last
    assert all(b + step == a2 for (_, b), (a2, _) in itertools.pairwise(parts))


def test_a_short_missing_interval_across_a_part_boundary_is_one_fetch() -> None:
    """A refresh's new edge and its freshness window straddling a boundary (an hourly
    panel refreshed just after 23:00 and a 6 h part) are one upstream query, not two;
    a missing interval longer than a part is still cut at the boundaries."""
    hour, part = 3600 * S, 6 * 3600 * S
    req = range_query("up", "0", repr(2 * 86400), "3600")
    pieces = pieces_of([(part - hour, part)], req, part)
    assert [(p.a, p.b) for p in pieces] == [(part - hour, part)]
    pieces = pieces_of([(part - hour, part), (3 * part, 3 * part + hour)], req, part)
    assert [(p.a, p.b) for p in pieces] == [(part - hour, part), (3 * part, 3 * part + hour)]
    pieces = pieces_of([(0, 2 * part)], req, part)  # long: cut
    assert [(p.a, p.b) for p in pieces] == [(0, part - hour), (part, 2 * part - hour), (2 * part, 2 * part)]


# -- the store ------------------------------------------------------------------------------

def test_memory_store_is_bounded_in_bytes_and_expires() -> None:
    now = [0.0]
    store = MemoryExtentStore(max_bytes=1000, timer=lambda: now[0])

    async def run() -> None:
        await store.put_many([("a", b"x" * 300, 10), ("b", b"y" * 300, 10)])
        assert await store.get_many(["a"]) == [b"x" * 300]  # a is now most recent
        await store.put_many([("c", b"z" * 300, 10)])  # evicts b, the least recent
        assert await store.get_many(["a", "b", "c"]) == [b"x" * 300, None, b"z" * 300]
        assert store.size <= 1000
        await store.put_many([("huge", b"h" * 2000, 10), ("zero", b"0", 0)])
        assert await store.get_many(["huge", "zero"]) == [None, None]
        now[0] = 11
        assert await store.get_many(["a", "c"]) == [None, None]
        assert store.size == 0 and len(store) == 0

    asyncio.run(run())


# -- the cache over a deterministic upstream ------------------------------------------------

@dataclass
class FakeAnswer:
    status_code: int
    doc: dict[str, Any]

    @property
    def raw(self) -> bytes:
        return json.dumps(self.doc, separators=(",", ":")).encode()  # compact, as Prometheus writes


class GridUpstream:
    """Evaluates `x` like Prometheus would on a fixed data set: series "a" everywhere,
    series "b" only at instants divisible by 30 s; value = the instant. Records what
    it was asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.delay = 0.0
        self.warn = False

    async def api(self, method: str, path: str, params: Sequence[tuple[str, str]], *,
                  timeout: float, category: str = "api",
                  headers: Mapping[str, str] | None = None) -> FakeAnswer:
        p = dict(params)
        self.calls.append(p)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.evaluate(path, p)

    def evaluate(self, path: str, p: Mapping[str, str]) -> FakeAnswer:
        if path.endswith("/query"):
            t = parse_time(p.get("time", "0")).ms
            return FakeAnswer(200, {"status": "success", "data": {"resultType": "scalar",
                                                                  "result": [t / 1000, "1"]}})
        start, end, step = parse_time(p["start"]).ms, parse_time(p["end"]).ms, parse_duration(p["step"]).ms
        a, b = [], []
        t = start
        while t <= end:
            ts = t // 1000 if t % 1000 == 0 else t / 1000
            a.append([ts, str(t)])
            if t % 30_000 == 0:
                b.append([ts, "b"])
            t += step
        result = [{"metric": {"s": "a"}, "values": a}] + ([{"metric": {"s": "b"}, "values": b}] if b else [])
        doc: dict[str, Any] = {"status": "success", "data": {"resultType": "matrix", "result": result}}
        if self.warn:
            doc["warnings"] = ["partial response"]
        return FakeAnswer(200, doc)


class Clock:
    """One clock for the cache's "now" and the store's expiry."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_cache(now: float, **overrides: Any) -> tuple[RangeCache, GridUpstream, Clock]:
    settings = GatewaySettings(range_cache_live_window_seconds=60, **overrides)
    upstream = GridUpstream()
    clock = Clock(now)
    cache = RangeCache(settings, upstream, MemoryExtentStore(10_000_000, timer=clock), clock=clock)
    return cache, upstream, clock


async def ask(cache: RangeCache, start: float, end: float, step: float = 15,
              expr: str = "x") -> tuple[dict[str, Any], Lookup]:
    deadline = asyncio.get_running_loop().time() + 5
    r = await cache.query_range(range_query(expr, repr(start), repr(end), repr(step),
                                            origin=Origin(deadline=deadline)))
    return r.doc, r.lookup


def direct(start: float, end: float, step: float = 15) -> dict[str, Any]:
    return GridUpstream().evaluate("/api/v1/query_range",
                                   {"start": str(start), "end": str(end), "step": str(step)}).doc


def test_range_answers_are_assembled_from_extents_and_only_new_edges_are_fetched() -> None:
    now = 100_000.0
    cache, upstream, clock = make_cache(now)

    async def run() -> None:
        start, end = now - 3600, now
        doc, lookup = await ask(cache, start, end)
        assert lookup is Lookup.MISS and doc == direct(start, end)
        # Same request again: the settled part from the store, the live minute refetched.
        clock.now = now + 10  # live records (5 s) expired
        doc, lookup = await ask(cache, start, end)
        assert lookup is Lookup.PARTIAL and doc == direct(start, end)
        assert float(upstream.calls[-1]["start"]) >= now - 60 - 15
        # 15 s later, shifted window: only the new edge (and the live window) is fetched.
        clock.now = now + 15
        doc, lookup = await ask(cache, start + 15, end + 15)
        assert lookup is Lookup.PARTIAL and doc == direct(start + 15, end + 15)
        fetched = parse_time(upstream.calls[-1]["end"]).ms - parse_time(upstream.calls[-1]["start"]).ms
        assert fetched <= 90_000
        # A window entirely in the past: a hit, no upstream request.
        calls = len(upstream.calls)
        doc, lookup = await ask(cache, start + 600, start + 1800)
        assert lookup is Lookup.HIT and doc == direct(start + 600, start + 1800)
        assert len(upstream.calls) == calls
        # Another phase (start mod step) is another grid: not served from this one.
        doc, lookup = await ask(cache, start + 607, start + 1800)
        assert lookup is Lookup.MISS and doc == direct(start + 607, start + 1800)

    asyncio.run(run())


def test_gaps_in_the_middle_are_filled_and_series_absent_in_an_extent_stay_absent() -> None:
    now = 100_000.0
    cache, upstream, _clock = make_cache(now)

    async def run() -> None:
        base = now - 7200
        await ask(cache, base, base + 600)
        await ask(cache, base + 1200, base + 1800)
        doc, lookup = await ask(cache, base, base + 1800)
        assert lookup is Lookup.PARTIAL and doc == direct(base, base + 1800)
        asked = [(float(c["start"]), float(c["end"])) for c in upstream.calls[2:]]
        assert asked == [(base + 615, base + 1185)]

    asyncio.run(run())


def test_live_window_is_judged_on_what_the_query_reads() -> None:
    now = 100_000.0
    cache, upstream, _clock = make_cache(now, range_cache_live_ttl_seconds=0)

    async def run() -> None:
        start, end = now - 1800, now - 600
        # Ends 10 min ago: settled for a plain selector, fetched once.
        await ask(cache, start, end)
        await ask(cache, start, end)
        assert len(upstream.calls) == 1
        # offset -15m reads the future for the last 15 minutes of instants: always refetched.
        await ask(cache, start, end, expr="x offset -15m")
        await ask(cache, start, end, expr="x offset -15m")
        assert len(upstream.calls) == 3
        assert parse_time(upstream.calls[-1]["start"]).ms >= parse_time(repr(now - 15 * 60 - 60 - 15)).ms
        # @ a fixed past time: settled whatever the range, except the live window itself
        # (every instant that recent is refetched, whatever it reads).
        await ask(cache, now - 900, now - 120, expr="x @ 1000")
        await ask(cache, now - 900, now - 120, expr="x @ 1000")
        assert len(upstream.calls) == 4
        await ask(cache, now - 300, now, expr="time()")
        await ask(cache, now - 300, now, expr="time()")
        assert len(upstream.calls) == 6
        assert parse_time(upstream.calls[-1]["start"]).ms > parse_time(repr(now - 75)).ms
        # @ end(): every instant depends on the range, never stored.
        await ask(cache, start, end, expr="x @ end()")
        await ask(cache, start, end, expr="x @ end()")
        assert len(upstream.calls) == 8

    asyncio.run(run())


def test_identical_requests_in_flight_are_coalesced() -> None:
    now = 100_000.0
    cache, upstream, _clock = make_cache(now)
    upstream.delay = 0.05

    async def run() -> list[Lookup]:
        results = await asyncio.gather(*(ask(cache, now - 3600, now) for _ in range(25)))
        assert all(doc == direct(now - 3600, now) for doc, _ in results)
        return [lookup for _, lookup in results]

    lookups = asyncio.run(run())
    assert len(upstream.calls) == 1
    assert lookups.count(Lookup.MISS) == 1 and lookups.count(Lookup.COALESCED) == 24


def test_answers_with_warnings_are_passed_on_and_never_stored() -> None:
    now = 100_000.0
    cache, upstream, _clock = make_cache(now)
    upstream.warn = True

    async def run() -> None:
        doc, _ = await ask(cache, now - 3600, now - 1800)
        assert doc["warnings"] == ["partial response"]
        doc, _ = await ask(cache, now - 3600, now - 1800)
        assert doc["warnings"] == ["partial response"]

    asyncio.run(run())
    assert len(upstream.calls) == 2


def test_a_range_of_many_blocks_is_stored_in_blocks() -> None:
    now = 10_000_000.0
    cache, upstream, _clock = make_cache(now)

    async def run() -> None:
        start = now - 3 * BLOCK_STEPS * 15 - 600
        doc, _ = await ask(cache, start, now - 600)
        assert doc == direct(start, now - 600)
        doc, lookup = await ask(cache, start + 150, now - 900)
        assert lookup is Lookup.HIT and doc == direct(start + 150, now - 900)

    asyncio.run(run())
    assert len(upstream.calls) == 1
    assert len(cache.store) >= 3  # type: ignore[arg-type]


def test_instant_query_at_now_reports_its_time_and_is_reused_for_the_ttl() -> None:
    cache, upstream, clock = make_cache(100_000.0, cache_ttl_seconds=15)

    async def run() -> None:
        deadline = asyncio.get_running_loop().time() + 5
        first = await cache.query(instant_query("x", origin=Origin(deadline=deadline)))
        assert first.lookup is Lookup.MISS and first.evaluated_at == 100_000.0
        assert upstream.calls[-1]["time"] == "100000"  # sent explicitly
        clock.now += 5
        again = await cache.query(instant_query("x", origin=Origin(deadline=deadline)))
        assert again.lookup is Lookup.HIT and again.evaluated_at == 100_000.0
        assert again.doc == first.doc
        # stats bypass the cache.
        await cache.query(instant_query("x", params=[("stats", "all")], origin=Origin(deadline=deadline)))
        assert len(upstream.calls) == 2

    asyncio.run(run())


def test_upstream_failure_reaches_every_waiter() -> None:
    now = 100_000.0
    cache, upstream, _clock = make_cache(now)

    async def broken(*args: Any, **kwargs: Any) -> FakeAnswer:
        await asyncio.sleep(0.01)
        raise UpstreamError("unreachable", "cannot connect")

    upstream.api = broken  # type: ignore[method-assign]

    async def run() -> list[BaseException | tuple[dict[str, Any], Lookup]]:
        return await asyncio.gather(*(ask(cache, now - 600, now) for _ in range(3)),
                                    return_exceptions=True)

    for outcome in asyncio.run(run()):
        assert isinstance(outcome, UpstreamError) and outcome.error_type == "unreachable"


def test_stored_blocks_hold_the_upstream_bytes() -> None:
    raw = raw_of(series({"a": "1"}, [(0, "1.5")]))
    ext = extent_of(raw, 0, 0, S)
    assert ext is not None
    stored = ext.encode()
    assert b'{"a":"1"}' in stored and b'[0,"1.5"]' in stored and len(stored) < len(raw)
