"""Figure cache stores: fresh answers and last-good values, in two classes. Stores only store.

One entry per key (the kept labels and the final PromQL text) holds two things:
- fresh: the answer reused until its expiry (a TTL grid step, or the short TTL of an
  answer carrying warnings);
- last good: the latest answer without warnings, served marked stale when upstream fails.

Keys live in one of two classes, each its own store, so that traffic of one
cannot push out the other:
- ``catalog``: the catalog's unfiltered figures. At most one key per catalog query,
  so the store is bounded by the catalog itself; nothing else ever evicts them,
  which is what keeps stale-if-error working for the summary whatever callers send.
- ``filtered``: variants with caller-chosen ``provider=`` / ``model=`` values. Unbounded
  in principle, so an LRU bounded by entries (CACHE_MAX_ENTRIES) and by bytes: it
  gets what CACHE_MAX_BYTES leaves after the catalog's figures.

Sizes are estimates (what CPython spends on the samples, their label tuples and
strings), good to a few tens of percent: enough to bound memory in bytes, not
only in entries. Which class a key is in, what is kept as good, who fetches and
who waits is the engine's business, not the store's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from app.gateway.caching.clock import grid_expiry
from app.gateway.caching.lru import SizedLRU
from app.gateway.result import Fetched

# What CPython 3.11 spends (sys.getsizeof, 64-bit) on the parts of a cached answer.
_FETCHED = 200  # the Fetched object, its tuples and floats
_SAMPLE = 48 + 24 + 40 + 8  # Sample (2 slots), its float, its labels tuple, the slot in samples
_PAIR = 8 + 56  # a (name, value) tuple and its slot; names are the catalog's own strings
_STR = 49  # an ASCII str object without its characters
_ENTRY = 300  # the entry, its key string overhead and the store's bookkeeping


def estimate_bytes(fetched: Fetched) -> int:
    """Approximate memory of one answer: what the byte bound of the store counts."""
    size = _FETCHED + sum(len(w) + _STR for w in fetched.warnings)
    for s in fetched.samples:
        size += _SAMPLE + sum(_PAIR + _STR + len(v) for _, v in s.labels)
    return size


class CacheClass(StrEnum):
    CATALOG = "catalog"  # the catalog's unfiltered figures: bounded by the catalog, never evicted by others
    FILTERED = "filtered"  # caller-chosen filter values: bounded LRU (entries and bytes)


@dataclass(slots=True)
class Entry:
    fresh: Fetched | None  # reusable until fresh.expires_at
    good: Fetched | None  # the last good answer (never one that carried warnings)


class QueryCache:
    def __init__(self, max_entries: int, stale_max_age: float, *, max_bytes: int = 128 * 1024 * 1024,
                 catalog_entries: int | None = None) -> None:
        """`catalog_entries`: how many unfiltered keys the catalog can produce (its query count)."""
        self.stale_max_age = stale_max_age
        self.max_bytes = max_bytes
        self._stores = {
            CacheClass.CATALOG: SizedLRU[str, Entry](catalog_entries or max_entries),
            CacheClass.FILTERED: SizedLRU[str, Entry](max_entries),
        }

    def fresh(self, key: str, cls: CacheClass, now: float | None = None) -> Fetched | None:
        """The answer for `key` if still fresh at `now` (one instant for a whole request:
        a request must not see half a batch expired)."""
        entry = self._stores[cls].get(key)
        if entry is None or entry.fresh is None:
            return None
        if entry.fresh.expires_at <= (time.monotonic() if now is None else now):
            return None
        return entry.fresh

    def last_good(self, key: str, cls: CacheClass) -> Fetched | None:
        entry = self._stores[cls].get(key)
        good = entry.good if entry is not None else None
        if good is None or time.time() - good.fetched_at > self.stale_max_age:
            return None
        return good

    @staticmethod
    def expiry(ttl: float, now: float | None = None) -> float:
        """The local expiry for answers fetched `now` (monotonic; this instant when
        left out), on the TTL grid (``caching.clock.grid_expiry``)."""
        return grid_expiry(ttl, time.monotonic() if now is None else now)

    def keep(self, key: str, cls: CacheClass, fetched: Fetched, *, good: bool) -> dict[CacheClass, int]:
        """Keep `fetched` as the key's fresh answer (while its expiry lies ahead) and, when
        `good`, as its last good one. Returns the evictions this caused, per class."""
        store = self._stores[cls]
        entry = store.get(key)
        fresh = fetched if fetched.expires_at > time.monotonic() else None
        last = fetched if good else (entry.good if entry is not None else None)
        if fresh is None and last is None:
            return {}
        size = _ENTRY + len(key)
        size += estimate_bytes(fresh) if fresh is not None else 0
        size += estimate_bytes(last) if last is not None and last is not fresh else 0
        evicted = {cls: store.put(key, Entry(fresh, last), size)}
        # The byte bound: filtered variants give way, the catalog's figures never do.
        filtered = self._stores[CacheClass.FILTERED]
        while self.bytes > self.max_bytes and filtered.pop_oldest():
            evicted[CacheClass.FILTERED] = evicted.get(CacheClass.FILTERED, 0) + 1
        return {c: n for c, n in evicted.items() if n}

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self._stores.values())

    def usage(self) -> dict[CacheClass, tuple[int, int]]:
        """(entries, estimated bytes) per class."""
        return {c: (len(s), s.bytes) for c, s in self._stores.items()}

    def clear(self) -> None:
        for s in self._stores.values():
            s.clear()



