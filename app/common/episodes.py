"""One log line per failure episode, not one per request.

A dependency that is down for ten minutes under 100 requests per second must
not write 60,000 identical lines; it writes one when the episode starts and one
when it ends, with how long it lasted and how many failures it absorbed.
"""

from __future__ import annotations

import logging
import time


class FailureEpisode:
    """Tracks whether a dependency is currently failing and logs transitions only.

    `settle_seconds`: the episode ends only after successes without a failure for that
    long. For a dependency made of parts that fail alone (a Redis Cluster whose one
    master is down while the others answer), successes and failures interleave for as
    long as the part is down: one episode, not one per success.
    """

    def __init__(self, name: str, logger: logging.Logger, settle_seconds: float = 0.0) -> None:
        self.name = name
        self._log = logger
        self.settle_seconds = settle_seconds
        self.failing = False
        self.started_at = 0.0
        self._ok_since: float | None = None
        self.failures = 0

    def failure(self, reason: str) -> bool:
        """Record a failure; returns True when this failure opened a new episode."""
        self.failures += 1
        self._ok_since = None
        if self.failing:
            return False
        self.failing = True
        self.started_at = time.monotonic()
        self._log.warning("%s failing: %s", self.name, reason)
        return True

    def success(self, note: str = "") -> bool:
        """Record a success; returns True when this success closed an episode (`note`: what
        else the closing line should say, e.g. what changed during the episode)."""
        if not self.failing:
            return False
        if self.settle_seconds:
            now = time.monotonic()
            if self._ok_since is None:
                self._ok_since = now
            if now - self._ok_since < self.settle_seconds:
                return False
            self._ok_since = None
        lasted = time.monotonic() - self.started_at
        self._log.warning(
            "%s recovered after %.1fs (%d failures absorbed)%s", self.name, lasted, self.failures,
            f"; {note}" if note else "",
        )
        self.failing = False
        self.failures = 0
        return True
