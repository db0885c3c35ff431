"""ExtentStore: bytes by key with a TTL (memory, tiered)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from app.gateway import metrics as gm
from app.gateway.caching.lru import SizedLRU


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
        self._timer = timer
        self._entries: SizedLRU[str, tuple[bytes, float]] = SizedLRU(max_bytes=max_bytes)

    @property
    def size(self) -> int:
        return self._entries.bytes

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._timer()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._entries.peek(key)
            if entry is None:
                out.append(None)
            elif entry[1] <= now:
                self._entries.pop(key)
                out.append(None)
            else:
                self._entries.get(key)  # most recently used now
                out.append(entry[0])
        gm.range_cache_bytes(self.size)
        return out

    async def put_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        now = self._timer()
        for key, value, ttl in items:
            self._entries.pop(key)
            if ttl > 0:
                self._entries.put(key, (value, now + ttl), len(key) + len(value) + self.OVERHEAD)
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
