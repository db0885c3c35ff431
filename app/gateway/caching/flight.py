"""One fetch in flight per key, and the background tasks that outlive their request.

The gateway's one single-flight mechanism: ``SingleFlight.lead`` starts the leader's
work as a background task (so a caller that disconnects does not cancel a fetch
others wait for) and settles its future exactly once, whatever happens; ``wait``
collects outcomes within a deadline. ``Background.drain`` is the seam tests use to
let fetches finish instead of sleeping. Imports nothing of the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background:
    """Tasks that must outlive the request that started them; cancelled on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until no background work is left (work may start more work)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


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

    def lead(self, key: str, work: Callable[[], Coroutine[Any, Any, T]], background: Background, *,
             catch: type[BaseException], unfinished: Callable[[], T]) -> tuple[asyncio.Future[T], bool]:
        """Join `key`; a leader runs `work` in `background` and settles the future with
        its result, with the `catch` exception it raised, or with `unfinished()` when it
        ended otherwise (cancelled, a bug): waiters are never left hanging."""
        fut, leader = self.join(key)
        if leader:
            background.spawn(self._run(key, fut, work, catch, unfinished))
        return fut, leader

    async def _run(self, key: str, fut: asyncio.Future[T], work: Callable[[], Coroutine[Any, Any, T]],
                   catch: type[BaseException], unfinished: Callable[[], T]) -> None:
        outcome = unfinished()
        try:
            outcome = await work()
        except catch as exc:
            outcome = exc  # type: ignore[assignment]  # T includes the caught error
        finally:
            self.settle(key, fut, outcome)


async def wait(futures: Sequence[asyncio.Future[Any]], deadline: float,
               late: Callable[[], Exception]) -> list[Any]:
    """Every outcome by `deadline` (event-loop time), raising the first that is an
    exception (even when another is not settled: what went wrong says more than that
    time ran out, e.g. a part refused its turn); `late()` when one is not settled in time."""
    if futures:
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        await asyncio.wait(futures, timeout=remaining)
    for fut in futures:
        if fut.done() and isinstance(fut.result(), BaseException):
            raise fut.result()
    out: list[Any] = []
    for fut in futures:
        if not fut.done():
            raise late()
        outcome = fut.result()
        if isinstance(outcome, BaseException):
            raise outcome
        out.append(outcome)
    return out
