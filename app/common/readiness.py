"""Readiness checks that features register; `/ready` (app.ops.health) runs them all.

A feature that depends on something (the gateway on Prometheus, vROps on Redis)
registers one named check in its lifespan; the readiness route knows no feature.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.datastructures import State

Check = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class Readiness:
    checks: dict[str, tuple[Check, bool]] = field(default_factory=dict)

    def register(self, name: str, check: Check, *, required: bool = True) -> None:
        self.checks[name] = (check, required)

    def unregister(self, name: str) -> None:
        self.checks.pop(name, None)


def readiness_of(state: State) -> Readiness:
    """The app's registry (created on first use)."""
    reg: Readiness | None = getattr(state, "readiness", None)
    if reg is None:
        reg = Readiness()
        state.readiness = reg
    return reg
