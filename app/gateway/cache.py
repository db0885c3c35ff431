"""Figure cache stores: TTL entries and last-good values. Stores only store.

Two jobs, one key space (the kept labels and the final PromQL text):
- fresh: a TLRU cache whose entries live until their category's TTL grid step ends;
- last good: an LRU of the latest good answer, served marked stale when upstream fails.
Who fetches and who waits (single-flight) is the engine's business, not the store's.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager

from cachetools import LRUCache, TLRUCache

from app.gateway.result import Fetched


def _ttu(_key: str, value: tuple[Fetched, float], _now: float) -> float:
    return value[1]  # an absolute expiry, shared by every figure of one fetch


class QueryCache:
    def __init__(self, max_entries: int, stale_max_age: float) -> None:
        self._fresh: TLRUCache[str, tuple[Fetched, float]] = TLRUCache(
            maxsize=max_entries, ttu=_ttu, timer=time.monotonic
        )
        self._last_good: LRUCache[str, Fetched] = LRUCache(maxsize=max_entries)
        self.stale_max_age = stale_max_age

    def frozen_time(self) -> AbstractContextManager[float]:
        """Look up many keys at one instant: a request must not see half a batch expired."""
        return self._fresh.timer

    def fresh(self, key: str) -> Fetched | None:
        try:
            return self._fresh[key][0]
        except KeyError:
            return None

    def last_good(self, key: str) -> Fetched | None:
        good = self._last_good.get(key)
        if good is None or time.time() - good.fetched_at > self.stale_max_age:
            return None
        return good

    @staticmethod
    def expiry(ttl: float) -> float:
        """The expiry for answers fetched now, on a grid of TTL steps (as Trickster aligns).

        Every figure with the same TTL expires at the same instant, whichever route
        fetched it and when, so routes that share figures refetch them in step: at
        most one fetch per route per window instead of several small ones. An answer
        fetched in the last tenth of a step is kept to the end of the next one.
        """
        now = time.monotonic()
        if ttl <= 0:
            return now
        boundary = (math.floor(now / ttl) + 1) * ttl
        return boundary + ttl if boundary - now < ttl / 10 else boundary

    def store(self, key: str, fetched: Fetched, expires_at: float) -> None:
        """Keep a good answer; one that carried warnings is not trusted as good."""
        if fetched.warnings:
            return
        if expires_at > time.monotonic():
            self._fresh[key] = (fetched, expires_at)
        self._last_good[key] = fetched

    def clear(self) -> None:
        self._fresh.clear()
        self._last_good.clear()


class ResponseMemo:
    """Rendered bodies of healthy answers, reused for a fraction of a second.

    Under heavy load a warm figure should cost what serving bytes costs. Only
    answers whose figures all came from Prometheus (fresh or cached) are kept,
    never degraded ones, and for at most `seconds`, so the ages and timestamp a
    reader sees are off by less than that. A plain dict, not a TLRU cache: it is
    read on every warm request (app/gateway/fastpath.py), and a dict read is ~20x
    cheaper; its keys are few (routes x formats x bounded filters).
    """

    def __init__(self, seconds: float, max_entries: int = 256) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._bodies: dict[tuple[str, ...], tuple[bytes, str, float]] = {}

    def get(self, key: tuple[str, ...]) -> tuple[bytes, str] | None:
        entry = self._bodies.get(key)
        if entry is None or entry[2] <= time.monotonic():
            return None
        return entry[0], entry[1]

    def put(self, key: tuple[str, ...], body: bytes, media_type: str, ttl: float) -> None:
        """Keep a body for `seconds`, never longer than the figures' own TTL."""
        keep = min(self.seconds, ttl)
        if keep <= 0:
            return
        now = time.monotonic()
        if key not in self._bodies and len(self._bodies) >= self.max_entries:
            for k in [k for k, v in self._bodies.items() if v[2] <= now]:
                del self._bodies[k]
            while len(self._bodies) >= self.max_entries:
                del self._bodies[next(iter(self._bodies))]  # the oldest
        self._bodies[key] = (body, media_type, now + keep)
