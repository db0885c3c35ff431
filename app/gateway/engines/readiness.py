"""One shared readiness probe, through the client's breaker."""

from __future__ import annotations

import asyncio

from app.common import tracing
from app.gateway.caching.flight import Background, SingleFlight
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.client import PrometheusClient

READY_QUERY = "vector(1)"

Readiness = tuple[bool, str]


class ReadinessProbe:
    """Can the upstream evaluate a query? One probe answers every caller.

    /ready is open to anyone: asked directly, each call would be an upstream
    request outside cache, coalescing and breaker, so a crowd of callers could
    take the pool from the figures. Here concurrent callers share one probe in
    flight, its outcome is reused for READY_CACHE_SECONDS, and the probe goes
    through the client's breaker (while the circuit is open: not ready, at once).
    """

    def __init__(self, settings: GatewaySettings, client: PrometheusClient, background: Background) -> None:
        self.settings = settings
        self.client = client
        self.background = background
        self._flight: SingleFlight[Readiness] = SingleFlight()
        self._last: tuple[float, Readiness] | None = None  # (valid until, loop time; outcome)

    def expire(self) -> None:
        """Forget the last outcome: the next call probes again."""
        self._last = None

    async def ready(self) -> Readiness:
        loop = asyncio.get_running_loop()
        if self._last is not None and loop.time() < self._last[0]:
            return self._last[1]
        fut, _ = self._flight.lead("ready", self._probe, self.background,
                                   catch=UpstreamError, unfinished=lambda: (False, "internal"))
        # Shielded: a caller giving up (its own readiness budget) must not cancel the shared probe.
        outcome = await asyncio.shield(fut)
        return (False, outcome.error_type) if isinstance(outcome, UpstreamError) else outcome

    async def _probe(self) -> Readiness:
        try:
            with tracing.quiet():  # no trace per probe
                await self.client.query(READY_QUERY, timeout=self.settings.request_deadline_seconds, category="ready")
            outcome: Readiness = (True, "ready")
        except UpstreamError as exc:
            outcome = (False, exc.error_type)
        self._last = (asyncio.get_running_loop().time() + self.settings.ready_cache_seconds, outcome)
        return outcome
