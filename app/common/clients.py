"""Clients: who is asking, by name, and the limits the gateway holds it to.

Every bearer token is a client. ``API_TOKENS`` objects may name it and give it limits
(``{"tok": {"name": "grafana-staging", "env": "staging", "limits": {"max_concurrent_queries":
2}}}``); a token without a name is a client too (keyed by a hash of its token, labelled
``unnamed`` in metrics), and so is every caller of an open gateway (keyed by its address,
labelled ``anonymous``). The security middleware puts the caller's :class:`Client` into
the ASGI scope beside its tenant; the gateway reads it with :func:`client_of`.

Limits given per token override the defaults of the gateway's settings field by field
(``CLIENT_*``); a field left out keeps the default. It lives in ``app.common`` because
security writes it and the gateway reads it, and neither may import the other.

Metric labels come only from configured names (bounded by the configuration); keys,
which may be derived from tokens or addresses, never leave the process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import Scope

#: The ASGI scope key under which the security middleware leaves the caller's Client.
CLIENT_SCOPE_KEY = "metrics_gateway.client"

NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
UNNAMED = "unnamed"
ANONYMOUS = "anonymous"
_DURATION = re.compile(r"\A(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z")
_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1)


class ClientConfigError(ValueError):
    """A client definition that cannot be used. The message never holds a token."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may ask; None: the default of the settings (or no limit there).

    Durations are seconds; every count and size must be positive (a queue may be 0: no waiting).
    """

    max_concurrent_queries: int | None = None   # upstream queries at once
    max_queued_queries: int | None = None       # waiting for a slot, within their deadline
    max_range_seconds: float | None = None      # end - start of a range query
    max_lookback_seconds: float | None = None   # how far before now a query may read
    max_points_per_series: int | None = None    # (end - start) / step + 1
    max_series: int | None = None               # series in one answer
    max_response_bytes: int | None = None       # bytes of one upstream answer
    max_query_length: int | None = None         # characters of the expression
    blocked_queries: tuple[str, ...] | None = None  # regular expressions refused anywhere in a query

    def over(self, defaults: Limits) -> Limits:
        """These limits, with `defaults` wherever a field is None."""
        return replace(defaults, **{f.name: getattr(self, f.name) for f in fields(self)
                                    if getattr(self, f.name) is not None})


NO_LIMITS = Limits()
_INTS = {"max_concurrent_queries", "max_queued_queries", "max_points_per_series", "max_series",
         "max_response_bytes", "max_query_length"}
_SECONDS = {"max_range_seconds", "max_lookback_seconds"}


def seconds_of(value: Any, what: str) -> float:
    """A positive duration: a number of seconds or a Prometheus-style string ("7d", "1h30m")."""
    if isinstance(value, bool):
        raise ClientConfigError(f"{what}: a number of seconds or a duration like '7d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and (m := _DURATION.match(value)):
        seconds = float(sum(int(g) * u for g, u in zip(m.groups(), _UNITS, strict=True) if g))
    else:
        raise ClientConfigError(f"{what}: a number of seconds or a duration like '7d'")
    if not seconds > 0:
        raise ClientConfigError(f"{what}: must be positive")
    return seconds


def limits_from_config(value: Any) -> Limits:
    """A token's ``limits`` object, validated (unknown keys refused, so a typo is not silent)."""
    if value is None:
        return NO_LIMITS
    if not isinstance(value, Mapping):
        raise ClientConfigError("'limits' must be a JSON object")
    known = {f.name for f in fields(Limits)}
    unknown = set(value) - known
    if unknown:
        raise ClientConfigError(f"unknown limit(s) {sorted(unknown)}; known: {sorted(known)}")
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key in _INTS:
            least = 0 if key == "max_queued_queries" else 1  # 0: no waiting, refused at once
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ClientConfigError(f"limit {key}: an integer of at least {least}")
            out[key] = v
        elif key in _SECONDS:
            out[key] = seconds_of(v, f"limit {key}")
        else:
            if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
                raise ClientConfigError(f"limit {key}: a list of regular expressions")
            for pattern in v:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ClientConfigError(f"limit {key}: {pattern!r} is not a regular expression: {exc}") from None
            out[key] = tuple(v)
    return Limits(**out)


@dataclass(frozen=True, slots=True)
class Client:
    """One caller: its configured ``name`` (None when it has none), its scheduling ``key``
    (the name, or a stand-in that is never shown), and its own ``limits`` (over the defaults)."""

    key: str
    name: str | None = None
    limits: Limits = NO_LIMITS

    @property
    def label(self) -> str:
        """The metric label: the configured name, or ``unnamed`` / ``anonymous``."""
        if self.name is not None:
            return self.name
        return ANONYMOUS if self.key.startswith("addr:") else UNNAMED


def make_client(name: Any, limits: Any, fallback_key: str) -> Client:
    """A validated client; named clients are keyed by name (two tokens of one name, as in a
    rotation, are one client), unnamed ones by `fallback_key`."""
    if name is not None and (not isinstance(name, str) or not NAME.match(name)):
        raise ClientConfigError("'name' must be 1-64 letters, digits, '_', '.', '-' (starting with a letter "
                                "or digit)")
    if name in (UNNAMED, ANONYMOUS):
        raise ClientConfigError(f"'name' {name!r} is reserved")
    return Client(key=f"name:{name}" if name is not None else fallback_key, name=name,
                  limits=limits_from_config(limits))


def client_of(conn: HTTPConnection) -> Client:
    """The caller's Client: what the security middleware resolved its token to, or, on an
    open gateway, an anonymous client keyed by its address."""
    found = conn.scope.get(CLIENT_SCOPE_KEY)
    if isinstance(found, Client):
        return found
    host = conn.client.host if conn.client is not None else "unknown"
    return Client(key=f"addr:{host}")


def with_client(scope: Scope, client: Client) -> Scope:
    """A copy of the ASGI scope carrying `client` (the scope itself is left unchanged)."""
    return {**scope, CLIENT_SCOPE_KEY: client}
