"""rendered bodies of healthy figure answers."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


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
    before routing (app/gateway/fastpath.py).
    """

    def __init__(self, seconds: float, max_entries: int = 256, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._bodies: OrderedDict[tuple[str, ...], _Body] = OrderedDict()

    def get(self, key: tuple[str, ...]) -> tuple[bytes, str] | None:
        hit = self._bodies.get(key)
        if hit is None:
            return None
        if hit.until <= time.monotonic():
            self._drop(key)
            return None
        self._bodies.move_to_end(key)
        return hit.body, hit.media_type

    def put(self, key: tuple[str, ...], body: bytes, media_type: str, until: float) -> None:
        """Keep `body` until `until` (time.monotonic()); a body over the byte bound is not kept."""
        if until <= time.monotonic() or len(body) > self.max_bytes:
            return
        self._drop(key)
        self._bodies[key] = _Body(body, media_type, until)
        self.bytes += len(body)
        while len(self._bodies) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._bodies)))

    def _drop(self, key: tuple[str, ...]) -> None:
        old = self._bodies.pop(key, None)
        if old is not None:
            self.bytes -= len(old.body)
