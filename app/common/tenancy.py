"""Tenants: what one bearer token may see, carried from the security middleware to the routes.

A gateway that serves staging and production dashboards, or teams that should see
only their own services, confines a token to label values (``{"env": "staging"}``)
and/or names an upstream tenant for it (``X-Scope-OrgID`` for Mimir). The security
middleware (``app.security``) resolves the token to a :class:`Tenant` and puts it in
the ASGI scope under :data:`TENANT_SCOPE_KEY`; routes read it with :func:`tenant_of`
(a FastAPI dependency). It lives in ``app.common`` because security writes it and the
gateway reads it, and neither may import the other.

A tenant's ``id`` is derived from what it may see (its matchers and upstream
headers), never from its token: two tokens with the same scope share cached answers,
a token rotation keeps them, and no cache key, log line or Redis key holds a token.
The id is ``""`` for the unconfined scope, so unconfined callers keep sharing one
key space.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import Scope

#: The ASGI scope key under which the security middleware leaves the caller's Tenant.
TENANT_SCOPE_KEY = "metrics_gateway.tenant"

LABEL_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
HEADER_NAME = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token
MAX_LABEL_VALUE_LENGTH = 1024
MAX_HEADER_VALUE_LENGTH = 4096
# Headers a tenant may not set upstream: they belong to the HTTP exchange or to the
# gateway's own upstream credentials (PROMETHEUS_BEARER_TOKEN / _USERNAME).
RESERVED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "host", "content-length", "content-type",
    "content-encoding", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "accept", "accept-encoding",
})
RICH_KEYS = frozenset({"labels", "upstream_headers"})


class TenantConfigError(ValueError):
    """A tenant definition that cannot be enforced. The message never holds a token."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """The scope of one caller.

    ``matchers``: ``(label, value)`` pairs set as equality matchers on every selector of
    every query the caller sends (and on every ``match[]``); sorted by label.
    ``upstream_headers``: extra headers sent upstream with the caller's queries
    (e.g. ``X-Scope-OrgID``); kept out of the repr.
    """

    id: str
    matchers: tuple[tuple[str, str], ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def confined(self) -> bool:
        """True when label matchers narrow what the caller sees."""
        return bool(self.matchers)

    @property
    def scoped(self) -> bool:
        """True when the caller is anything but the unconfined scope (matchers or headers)."""
        return bool(self.matchers or self.upstream_headers)

    def headers(self) -> dict[str, str] | None:
        """The upstream headers as a mapping, or None when there are none."""
        return dict(self.upstream_headers) if self.upstream_headers else None

    def labels(self) -> dict[str, str]:
        return dict(self.matchers)


UNCONFINED = Tenant("", (), ())


def make_tenant(labels: Mapping[str, str] | None = None,
                upstream_headers: Mapping[str, str] | None = None) -> Tenant:
    """A validated Tenant whose id is derived from its scope ("" when unscoped)."""
    pairs: list[tuple[str, str]] = []
    for name, value in (labels or {}).items():
        if not isinstance(name, str) or not LABEL_NAME.match(name) or name.startswith("__"):
            raise TenantConfigError(f"label name {name!r} is not a plain Prometheus label name "
                                    "(letters, digits, _; not starting with __)")
        if not isinstance(value, str) or not value or len(value) > MAX_LABEL_VALUE_LENGTH:
            raise TenantConfigError(f"label {name}: the value must be a non-empty string of at most "
                                    f"{MAX_LABEL_VALUE_LENGTH} characters")
        pairs.append((name, value))
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in (upstream_headers or {}).items():
        if not isinstance(name, str) or not HEADER_NAME.match(name):
            raise TenantConfigError(f"upstream header name {name!r} is not an HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise TenantConfigError(f"upstream header {name!r} cannot be set per token")
        if name.lower() in seen:
            raise TenantConfigError(f"upstream header {name!r} is given twice")
        seen.add(name.lower())
        if (not isinstance(value, str) or not value or len(value) > MAX_HEADER_VALUE_LENGTH
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
            raise TenantConfigError(f"upstream header {name!r}: the value must be a non-empty printable "
                                    f"string of at most {MAX_HEADER_VALUE_LENGTH} characters")
        headers.append((name, value))
    matchers = tuple(sorted(pairs))
    upstream = tuple(sorted(headers, key=lambda h: h[0].lower()))
    if not matchers and not upstream:
        return UNCONFINED
    canonical = json.dumps([matchers, [(k.lower(), v) for k, v in upstream]], separators=(",", ":"))
    return Tenant("t" + hashlib.sha256(canonical.encode()).hexdigest()[:16], matchers, upstream)


def tenant_from_config(value: Any) -> Tenant:
    """A tenant from one token's configuration (the value side of the API_TOKENS object).

    Two shapes, told apart by their values:

    - simple: ``{"env": "staging"}`` — label values only (``{}``: unconfined);
    - full: ``{"labels": {"env": "a"}, "upstream_headers": {"X-Scope-OrgID": "a"}}`` —
      recognised because its values are objects; only these two keys are allowed.
    """
    if value is None:
        return UNCONFINED
    if not isinstance(value, Mapping):
        raise TenantConfigError("a token's scope must be a JSON object")
    if any(isinstance(v, Mapping) for v in value.values()):
        unknown = set(value) - RICH_KEYS
        if unknown:
            raise TenantConfigError(f"unknown key(s) {sorted(unknown)} in a token's scope; the full form "
                                    f"takes only {sorted(RICH_KEYS)}")
        labels = value.get("labels") or {}
        headers = value.get("upstream_headers") or {}
        if not isinstance(labels, Mapping) or not isinstance(headers, Mapping):
            raise TenantConfigError("'labels' and 'upstream_headers' must be JSON objects")
        return make_tenant(labels, headers)
    return make_tenant(value)


def tenant_of(conn: HTTPConnection) -> Tenant:
    """The caller's Tenant: what the security middleware resolved its token to.

    A FastAPI dependency (``tenant: Tenant = Depends(tenant_of)``). UNCONFINED when
    nothing is there: no tokens configured, an unconfined token, or an app that
    serves the routes without the security middleware.
    """
    found = conn.scope.get(TENANT_SCOPE_KEY)
    return found if isinstance(found, Tenant) else UNCONFINED


def with_tenant(scope: Scope, tenant: Tenant) -> Scope:
    """A copy of the ASGI scope carrying `tenant` (the scope itself is left unchanged)."""
    if not tenant.scoped:
        return scope
    return {**scope, TENANT_SCOPE_KEY: tenant}
