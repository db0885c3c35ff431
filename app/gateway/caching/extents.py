"""per-instant extents: interval arithmetic, validation, assembly."""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.gateway.promql.timing import _go_round, _json_ts, prom_ts

Interval = tuple[int, int]  # [first, last] grid instants in ms, both included


LabelKey = tuple[tuple[str, str], ...]


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
