"""Interval arithmetic on the evaluation grid, and which answers may be stored.

The range cache's extents themselves (each series' points as the upstream wrote
them) are in ``fragments.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


def label_key(metric: Mapping[str, str]) -> LabelKey:
    """A label set in Prometheus' order: pairs sorted by name. Comparing these tuples is
    labels.Compare (name, then value, then length; code point order = UTF-8 byte order)."""
    return tuple(sorted(metric.items()))


_ENVELOPE_KEYS = frozenset({"status", "data"})


_DATA_KEYS = frozenset({"resultType", "result"})




def storable(doc: Mapping[str, Any]) -> bool:
    """A plain success: nothing but status and data (no warnings, infos, stats)."""
    data = doc.get("data")
    return (doc.get("status") == "success" and set(doc) <= _ENVELOPE_KEYS
            and isinstance(data, dict) and set(data) <= _DATA_KEYS and "result" in data)
