"""Per-query result cache: TTL entries, last-good values, and one fetch in flight per key.

Three jobs, one key space (the final PromQL text):
- fresh: a TLRU cache whose entries live for their category's TTL;
- last good: an LRU of the latest good answer, served marked stale when upstream fails;
- in flight: concurrent requests for the same key wait on one future
  ("collapsed forwarding") instead of each asking Prometheus.
"""

from __future__ import annotations

import asyncio
import time

from cachetools import LRUCache, TLRUCache

from app.services.result import Fetched, UpstreamFailure

Outcome = Fetched | UpstreamFailure


def _ttu(_key: str, value: tuple[Fetched, float], now: float) -> float:
    return now + value[1]


class QueryCache:
    def __init__(self, max_entries: int, stale_max_age: float) -> None:
        self._fresh: TLRUCache[str, tuple[Fetched, float]] = TLRUCache(
            maxsize=max_entries, ttu=_ttu, timer=time.monotonic
        )
        self._last_good: LRUCache[str, Fetched] = LRUCache(maxsize=max_entries)
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self.stale_max_age = stale_max_age

    def fresh(self, key: str) -> Fetched | None:
        hit = self._fresh.get(key)
        return hit[0] if hit is not None else None

    def last_good(self, key: str) -> Fetched | None:
        good = self._last_good.get(key)
        if good is None or time.time() - good.fetched_at > self.stale_max_age:
            return None
        return good

    def store(self, key: str, fetched: Fetched, ttl: float) -> None:
        """Keep a good answer; one that carried warnings is not trusted as good."""
        if fetched.warnings:
            return
        if ttl > 0:
            self._fresh[key] = (fetched, ttl)
        self._last_good[key] = fetched

    def inflight(self, key: str) -> asyncio.Future[Outcome] | None:
        return self._inflight.get(key)

    def begin(self, key: str) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        return fut

    def finish(self, key: str, outcome: Outcome) -> None:
        fut = self._inflight.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def clear(self) -> None:
        self._fresh.clear()
        self._last_good.clear()
