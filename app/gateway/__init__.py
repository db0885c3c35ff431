"""The figure gateway: a catalog of PromQL figures served as JSON and Prometheus text.

Public surface::

    from app.gateway import create_gateway_router, GatewaySettings
    app.include_router(create_gateway_router())   # brings its own lifespan

Wings (docs/architecture.md): ``routes/`` (the HTTP edge: parse and pick),
``service`` (the composition root), ``engines/`` (who answers, under which policy),
``caching/`` (stores and single flights), ``upstream/`` (the one client),
``render/``, ``result`` (one result type), ``catalog/`` and ``promql/`` (the language).
"""

from __future__ import annotations

from app.gateway.routes.figures import create_gateway_router
from app.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_gateway_router"]
