"""The TTL grid and the one wall <-> monotonic conversion; imports nothing of the gateway.

Local entries expire on this process's monotonic clock (immune to clock steps);
shared ones on the wall clock, which the hosts of a fleet agree on (NTP).
"""

from __future__ import annotations

import math
import time


def grid_expiry(ttl: float, now: float) -> float:
    """The expiry of an answer fetched `now` (on any clock), on a grid of TTL steps.

    Every answer with the same TTL expires at the same instant, whichever route
    fetched it and when (as Trickster aligns), so routes and processes that share
    figures refetch them in step. An answer fetched in the last tenth of a step is
    kept to the end of the next one.
    """
    if ttl <= 0:
        return now
    boundary = (math.floor(now / ttl) + 1) * ttl
    return boundary + ttl if boundary - now < ttl / 10 else boundary


def to_monotonic(wall: float) -> float:
    """A wall-clock instant as this process's monotonic one."""
    return time.monotonic() + (wall - time.time())


def to_wall(monotonic: float) -> float:
    """A monotonic instant of this process as a wall-clock one."""
    return time.time() + (monotonic - time.monotonic())
