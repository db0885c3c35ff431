"""one fetch in flight per key; background fetches that outlive their request."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One fetch in flight per key: later askers wait on the first one's future
    ("collapsed forwarding") instead of each asking upstream."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._inflight

    def join(self, key: str) -> tuple[asyncio.Future[T], bool]:
        """The key's future and whether the caller leads (must fetch and settle it)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut, False
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        return fut, True

    def settle(self, key: str, fut: asyncio.Future[T], outcome: T) -> None:
        """Settle `fut`; unregister it only if it is still the key's fetch in flight
        (a later request may have begun a new one after this one settled)."""
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.done():
            fut.set_result(outcome)
