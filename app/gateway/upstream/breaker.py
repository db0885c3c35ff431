"""A circuit breaker for the upstream: answer at once while it is known to be down.

After `threshold` consecutive failures the circuit opens and requests fail fast
(no connection attempt, no waiting for a deadline). After `reset_seconds` one
probe is let through (half-open); its outcome closes or re-opens the circuit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.gateway.metrics import BreakerState, set_breaker_state


class CircuitBreaker:
    """`on_change` reports each state change (by default to the upstream breaker's gauge;
    the shared cache tier passes its own)."""

    def __init__(self, threshold: int, reset_seconds: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] = set_breaker_state) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._probe_at = 0.0
        self.state: BreakerState = "closed"
        on_change("closed")

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            self._on_change(state)

    def allow(self) -> bool:
        """May a request go upstream now? (At most one probe while half-open.)"""
        if self.state == "closed":
            return True
        if self.state == "open" and self._clock() - self._opened_at >= self.reset_seconds:
            self._set("half_open")
            self._probing = False
        # A probe whose outcome never came (its caller was cancelled, or gave up before
        # asking) is written off after another reset period: a lost probe must not keep
        # the circuit half-open for ever.
        if self.state == "half_open" and (not self._probing or self._clock() - self._probe_at >= self.reset_seconds):
            self._probing = True
            self._probe_at = self._clock()
            return True
        return False

    def retry_after(self) -> float:
        return max(0.0, self.reset_seconds - (self._clock() - self._opened_at))

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state == "half_open" or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._set("open")
