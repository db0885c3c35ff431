"""Split by interval: where a long range query is cut, and how its extents are stored.

Why: a week-long panel evaluated as one query costs Prometheus one long evaluation
on one core, and its answer is one big body. Cut at step-aligned boundaries near
an interval (``RANGE_CACHE_SPLIT_SECONDS``, 24 h by default), the parts run
concurrently and each is stored apart, so the next refresh asks only for the part
that changed. The cut never moves an evaluation instant: parts are sets of grid
instants ``start + k*step`` of the caller's own grid, so their union is the answer.

Extents are stored in blocks of at most ``BLOCK_STEPS`` instants (a store entry
stays small, and the byte bound evicts old time first); a part is a whole number
of blocks, so part boundaries are block boundaries. Both are aligned to the grid's
phase (``start mod step``), not to the request, so every request on the same grid
shares them.
"""

from __future__ import annotations

from collections.abc import Sequence

Interval = tuple[int, int]

BLOCK_STEPS = 240  # grid instants per stored block, at most


def block_len(step: int, interval_ms: int) -> int:
    """Milliseconds per stored block: whole steps, at most BLOCK_STEPS and the interval."""
    return max(1, min(BLOCK_STEPS, interval_ms // step)) * step


def part_len(step: int, interval_ms: int) -> int:
    """Milliseconds per part: the whole number of blocks nearest the interval."""
    block = block_len(step, interval_ms)
    return max(1, round(interval_ms / block)) * block


def blocks(a: int, b: int, step: int, length: int) -> list[int]:
    """Indices of the blocks holding instants a..b (grid of phase a mod step)."""
    phase = a % step
    return list(range((a - phase) // length, (b - phase) // length + 1))


def block_span(index: int, phase: int, step: int, length: int) -> Interval:
    """The first and last grid instants of a block."""
    a = phase + index * length
    return a, a + length - step


def split(intervals: Sequence[Interval], step: int, length: int) -> list[Interval]:
    """The intervals cut at part boundaries (phase + k*length), each piece on the grid."""
    out: list[Interval] = []
    for a, b in intervals:
        phase = a % step
        while a <= b:
            boundary = phase + ((a - phase) // length + 1) * length  # the next part's first instant
            end = min(b, boundary - step)
            out.append((a, end))
            a = end + step
    return out
