"""The default catalog reads the backend's families as the backend defines them.

Judged without a Prometheus, by the doctor's rules, against what the synthetic
backend declares (the real backend's names, types and labels): every figure has a
healthy reading whether provider_response_time_seconds is a histogram (the real
backend) or a gauge (older backends). The same against real Prometheus servers is
in tests/integration/test_doctor.py and test_catalog_figures.py.
"""

from __future__ import annotations

import pytest

from app.gateway.catalog.loader import load_catalog
from app.gateway.doctor import NameFacts, judge, metric_names, resolve
from app.gateway.promql.syntax import parse, selectors
from tests.support.synthetic_backend import LEGACY_GAUGE_SERIES, LEGACY_GAUGE_TYPES, SERIES, TYPES, S

CATALOG = load_catalog()


def facts_for(series: list[S], types: dict[str, str]) -> dict[str, NameFacts]:
    metadata = {fam: [{"type": t, "help": "", "unit": ""}] for fam, t in types.items()}
    names = {s.name for s in series}
    wanted = set().union(*(metric_names(parse(q.expr)) for q in CATALOG.queries.values()))
    return {n: resolve(n, metadata, n in names) for n in wanted}


@pytest.mark.parametrize(("series", "types"), [(SERIES, TYPES), (LEGACY_GAUGE_SERIES, LEGACY_GAUGE_TYPES)],
                         ids=["histogram", "gauge"])
def test_every_default_figure_has_a_healthy_reading(series: list[S], types: dict[str, str]) -> None:
    facts = facts_for(series, types)
    for q in CATALOG.queries.values():
        outcome = judge(parse(q.expr), facts, "15m")
        assert outcome.ok, (q.id, outcome.problems)


def test_provider_response_time_is_read_from_the_histogram_first() -> None:
    for qid in ("provider_response_time_avg_seconds", "provider_response_time_seconds"):
        tree = parse(CATALOG.queries[qid].expr)
        assert str(tree.op) == "or"
        assert metric_names(tree.lhs) == {"provider_response_time_seconds_sum",
                                          "provider_response_time_seconds_count"}
        assert metric_names(tree.rhs) == {"provider_response_time_seconds"}


@pytest.mark.parametrize(("qid", "family"), [("active_api_keys", "active_api_keys"),
                                             ("active_trials", "trial_active")])
def test_active_counts_select_status_active(qid: str, family: str) -> None:
    (sel,) = selectors(parse(CATALOG.queries[qid].expr))
    assert sel.name == family
    assert [(m.name, m.value) for m in sel.matchers.matchers] == [("status", "active")]


def test_synthetic_backend_uses_the_real_label_values() -> None:
    values = {(s.name, k): set() for s in SERIES for k, _ in s.labels}
    for s in SERIES:
        for k, v in s.labels:
            values[(s.name, k)].add(v)
    assert values[("tokens_used_total", "token_type")] == {"input", "output"}
    assert values[("active_api_keys", "status")] == {"active", "inactive"}
    assert values[("trial_active", "status")] == {"active", "expired"}
    assert values[("fastapi_requests_total", "status_class")] <= {"2xx", "4xx", "5xx", "other"}
    assert values[("circuit_breaker_current_state", "state")] == {"closed", "open", "half_open"}
    assert TYPES["provider_response_time_seconds"] == "histogram"
    bounds = values[("provider_response_time_seconds_bucket", "le")]
    assert bounds == {"0.1", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"}
