"""The figure gateway: a catalog of PromQL figures served as JSON and Prometheus text.

Public surface::

    from app.gateway import create_gateway_router, GatewaySettings
    app.include_router(create_gateway_router())   # brings its own lifespan

Rooms: ``upstream`` (the one pooled Prometheus API client, breaker), ``engine``
(single-flight, batches), ``cache`` (stores only), ``result`` (one result type,
one lookup vocabulary), ``promql`` (syntax-tree tools), ``catalog/``, ``render/``,
``service`` (lifetimes, memo) and ``router`` (parse and pick).
"""

from __future__ import annotations

from app.gateway.routes.figures import create_gateway_router
from app.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_gateway_router"]
