"""A circuit breaker for the upstream: answer at once while it is known to be down.

After `threshold` consecutive failures the circuit opens and requests fail fast
(no connection attempt, no waiting for a deadline). After `reset_seconds` one
probe is let through (half-open); its outcome closes or re-opens the circuit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from app.gateway.metrics import BreakerState, set_breaker_state

# What one upstream outcome says about the upstream's health (docs/reliability.md,
# "What the breaker counts"): "up" (it answered as the API does, even if the query was
# at fault), "down" (transport failure, not the API, a 5xx of its own), "unknown" (a
# client's query ran out of time: says nothing either way; a probe asks the upstream).
Verdict = Literal["up", "down", "unknown"]

# Prometheus errorTypes that are the query's fault (the upstream answered).
QUERY_ERRORS = frozenset({"bad_data", "execution", "not_found", "too_large", "canceled"})
# Upstream HTTP statuses that refuse the gateway itself (its credentials), not a query.
REFUSES_GATEWAY = frozenset({401, 403, 407})


def judge(error_type: str | None, status: int | None, *, client_query: bool) -> Verdict:
    """The breaker's reading of one outcome.

    `error_type`: None for a success, else the failure vocabulary of the upstream client
    (Prometheus' errorType when it sent an envelope); `status`: the upstream's HTTP status
    (None when it never answered); `client_query`: the expression is a caller's (the query
    API), not one of the catalog's figures.
    """
    if error_type is None:
        return "up"
    if error_type in ("unreachable", "transport"):
        return "down"
    if error_type == "pool":
        return "unknown"  # our own connection pool was full: nothing was asked
    if error_type == "timeout":
        if status is not None:  # Prometheus' own timeout envelope: it answered
            return "up" if client_query else "down"
        return "unknown" if client_query else "down"
    if status is not None and 400 <= status < 500:
        return "down" if status in REFUSES_GATEWAY else "up"
    if error_type in QUERY_ERRORS:
        return "up"
    return "down"


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

    def inconclusive(self) -> None:
        """An outcome that says nothing about the upstream: a half-open probe slot it held is freed."""
        self._probing = False

    def record(self, verdict: Verdict) -> None:
        if verdict == "up":
            self.success()
        elif verdict == "down":
            self.failure()
        else:
            self.inconclusive()

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state == "half_open" or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._set("open")
