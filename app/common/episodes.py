"""One log line per failure episode, not one per request.

A dependency that is down for ten minutes under 100 requests per second must
not write 60,000 identical lines; it writes one when the episode starts and one
when it ends, with how long it lasted and how many failures it absorbed.
"""

from __future__ import annotations

import logging
import time


class FailureEpisode:
    """Tracks whether a dependency is currently failing and logs transitions only."""

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self.name = name
        self._log = logger
        self.failing = False
        self.started_at = 0.0
        self.failures = 0

    def failure(self, reason: str) -> bool:
        """Record a failure; returns True when this failure opened a new episode."""
        self.failures += 1
        if self.failing:
            return False
        self.failing = True
        self.started_at = time.monotonic()
        self._log.warning("%s failing: %s", self.name, reason)
        return True

    def success(self) -> bool:
        """Record a success; returns True when this success closed an episode."""
        if not self.failing:
            return False
        lasted = time.monotonic() - self.started_at
        self._log.warning(
            "%s recovered after %.1fs (%d failures absorbed)", self.name, lasted, self.failures
        )
        self.failing = False
        self.failures = 0
        return True
