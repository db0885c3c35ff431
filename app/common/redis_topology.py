"""One log line per change of a Redis Cluster's slot map.

redis-py follows MOVED and ASK redirects itself and refreshes its map of which
master serves which slot after a failover or a slot migration: the commands that
meet a redirect succeed, so nothing fails and nothing would be told. An operator
still wants to know that the cluster changed under the fleet (a master failed
over to its replica, slots moved to another master), once per episode, not once
per redirected command; and a metric says how often it happens.

The watch reads the client's own slot map (no command to Redis), at most once per
`interval`, after the caller's commands. Changes seen within `quiet` seconds of a
logged one belong to the same episode: counted, not logged again. While the caller
is in a failure episode of its own (`quiet_while`: a master died, the commands sent
to it failed), the change is not logged but handed to the line that ends that
episode (`note`): one line per failover, not two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.asyncio import RedisCluster

from app.common.redis import AsyncRedis

SLOTS = 16384


def slot_map(client: RedisCluster) -> tuple[str | None, ...]:
    """The master (host:port) this client sends each slot to, as it knows it now."""
    cache = client.nodes_manager.slots_cache
    out: list[str | None] = []
    for slot in range(SLOTS):
        nodes = cache.get(slot)
        out.append(nodes[0].name if nodes else None)
    return tuple(out)


class TopologyWatch:
    """Notices a Redis Cluster client's slot map changing; logs once per episode."""

    def __init__(self, client: AsyncRedis, name: str, logger: logging.Logger, *,
                 on_change: Callable[[], None] | None = None, interval: float = 1.0,
                 quiet: float = 30.0, quiet_while: Callable[[], bool] | None = None) -> None:
        self.client = client if isinstance(client, RedisCluster) else None
        self.name = name
        self._log = logger
        self._on_change = on_change
        self._quiet_while = quiet_while
        self.note = ""  # a change seen during the caller's failure episode, for its closing line
        self.interval = interval
        self.quiet = quiet
        self._next_check = 0.0
        self._quiet_until = 0.0
        self._last: tuple[str | None, ...] | None = None
        self.changes = 0  # slot-map changes seen (each failover or finished migration)

    def check(self) -> None:
        """Compare the client's slot map with the last one seen (cheap; rate-limited)."""
        if self.client is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.interval
        current = slot_map(self.client)
        if not any(current):
            return  # not initialised yet (or every node lost): nothing to compare
        last, self._last = self._last, current
        if last is None or last == current:
            return
        self.changes += 1
        if self._on_change is not None:
            self._on_change()
        moved = sum(1 for a, b in zip(last, current, strict=True) if a != b)
        before = ",".join(sorted({n for n in last if n}))
        after = ",".join(sorted({n for n in current if n}))
        what = f"cluster slot map changed (a failover or a slot migration): {moved} slots now served by " \
               f"another master; masters {before} -> {after}"
        if now < self._quiet_until:
            return
        self._quiet_until = now + self.quiet
        if self._quiet_while is not None and self._quiet_while():
            self.note = what
            return
        self._log.warning("%s: %s; redirects are followed, entries lost with a failed master are refetched",
                          self.name, what)
