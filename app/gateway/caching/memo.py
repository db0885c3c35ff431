"""Rendered bodies of healthy figure answers."""

from __future__ import annotations

import time
from dataclasses import dataclass

from app.gateway.caching.lru import SizedLRU


@dataclass(slots=True)
class _Body:
    body: bytes
    media_type: str
    until: float


class ResponseMemo:
    """Rendered bodies of healthy answers, kept until a given instant.

    Under heavy load a warm figure should cost what serving bytes costs. Which
    bodies are kept and for how long is the service's call; the memo is bounded
    in entries and in bytes (bodies of big answers weigh megabytes), evicting
    the least recently used. A dict read: it is asked on every warm request,
    before routing (app/gateway/routes/fastpath.py).
    """

    def __init__(self, seconds: float, max_entries: int = 256, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._bodies: SizedLRU[tuple[str, ...], _Body] = SizedLRU(max_entries, max_bytes)

    def get(self, key: tuple[str, ...]) -> tuple[bytes, str] | None:
        hit = self._bodies.get(key)
        if hit is None:
            return None
        if hit.until <= time.monotonic():
            self._bodies.pop(key)
            return None
        return hit.body, hit.media_type

    def put(self, key: tuple[str, ...], body: bytes, media_type: str, until: float) -> None:
        """Keep `body` until `until` (time.monotonic()); a body over the byte bound is not kept."""
        if until <= time.monotonic() or len(body) > self.max_bytes:
            return
        self._bodies.put(key, _Body(body, media_type, until), len(body))

    @property
    def bytes(self) -> int:
        return self._bodies.bytes
