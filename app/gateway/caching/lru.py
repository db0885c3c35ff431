"""The one least-recently-used map bounded in entries and in bytes; imports nothing of the gateway."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """key -> value in least-recently-used order, each value with its size in bytes.

    Evicts the oldest past `max_entries` or `max_bytes`; a value larger than the
    whole byte bound is not kept. Keeps a running byte total (``bytes``) so an owner
    can bound bytes across several maps.
    """

    def __init__(self, max_entries: float = math.inf, max_bytes: float = math.inf) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def peek(self, key: K) -> V | None:
        """The value without refreshing its place."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> int:
        """Insert or replace; returns how many entries were evicted to stay within bounds."""
        self.pop(key)
        if size > self.max_bytes:
            return 0
        self._items[key] = (value, size)
        self.bytes += size
        evicted = 0
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self.pop_oldest()
            evicted += 1
        return evicted

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]

    def pop_oldest(self) -> bool:
        if not self._items:
            return False
        _, (_, size) = self._items.popitem(last=False)
        self.bytes -= size
        return True

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
