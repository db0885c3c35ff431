"""No route of the app has a plain-def dependency: FastAPI runs those in its thread pool, a
thread round trip per request (it was a measurable part of a cold /summary's overhead over
Prometheus' own time: the tenant lookup ran in a worker thread)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.main import create_app


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def _routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, through included routers (FastAPI includes them lazily)."""
    for r in routes:
        if isinstance(r, APIRoute):
            yield r
        elif hasattr(r, "original_router"):
            yield from _routes(r.original_router.routes)


def test_every_dependency_of_every_route_is_async() -> None:
    app = create_app()
    routes = list(_routes(app.routes))
    assert len(routes) > 10
    sync = {f"{route.path}: {getattr(call, '__qualname__', call)}"
            for route in routes for call in _calls(route.dependant)
            if call is not None and not inspect.iscoroutinefunction(call)}
    assert not sync, f"plain-def dependencies (run in the thread pool): {sorted(sync)}"
