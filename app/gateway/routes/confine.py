"""a confined tenant's view of rules, alerts, metadata and match[]."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from app.common.tenancy import tenant_of


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the tenant's scope id (cache scope), its upstream headers and label matchers."""

    scope: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    confined: bool = False
    matchers: tuple[tuple[str, str], ...] = ()


def caller_of(request: Request) -> Caller:
    """The caller's tenant, as the security middleware resolved its token (app.common.tenancy)."""
    tenant = tenant_of(request)
    return Caller(tenant.id, tenant.headers() or {}, tenant.confined, tenant.matchers)


# Suffixes under which a metric family's series are named (histograms, summaries,
# counters in OpenMetrics, info metrics): metadata is kept per family name.
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info", "_gcount", "_gsum")


def families_of(metric_names: Sequence[str]) -> set[str]:
    """Every family name a series name may belong to (the name itself, and without a suffix)."""
    out: set[str] = set()
    for name in metric_names:
        out.add(name)
        for suffix in _SERIES_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                out.add(name[: -len(suffix)])
    return out


def _carries(labels: Any, matchers: Sequence[tuple[str, str]]) -> bool:
    return isinstance(labels, Mapping) and all(labels.get(k) == v for k, v in matchers)


def confine_alerts(data: Any, matchers: Sequence[tuple[str, str]]) -> Any:
    """/api/v1/alerts data with only the alerts whose labels carry the tenant's."""
    if not isinstance(data, Mapping):
        return data
    alerts = [a for a in data.get("alerts") or [] if isinstance(a, Mapping) and _carries(a.get("labels"), matchers)]
    return {**data, "alerts": alerts}


def confine_rules(data: Any, matchers: Sequence[tuple[str, str]]) -> Any:
    """/api/v1/rules data with only the rules whose own labels carry the tenant's (as
    prom-label-proxy does: a rule's query may name any tenant), their alerts filtered too;
    groups left without rules are dropped."""
    if not isinstance(data, Mapping):
        return data
    groups = []
    for group in data.get("groups") or []:
        if not isinstance(group, Mapping):
            continue
        rules = []
        for rule in group.get("rules") or []:
            if isinstance(rule, Mapping) and _carries(rule.get("labels"), matchers):
                if "alerts" in rule:
                    rule = {**rule, "alerts": [a for a in rule.get("alerts") or []
                                               if isinstance(a, Mapping) and _carries(a.get("labels"), matchers)]}
                rules.append(rule)
        if rules:
            groups.append({**group, "rules": rules})
    return {**data, "groups": groups}
