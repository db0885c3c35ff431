"""Domain (backend contract) and gateway metrics: each moves on its event, with its labels."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from app import instrumentation as domain
from app.gateway import metrics as gateway


def value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_record_inference_moves_requests_latency_tokens_credits() -> None:
    provider, model = uniq("prov"), "gpt-4o"
    pm = {"provider": provider, "model": model}
    domain.record_inference(provider, model, "success", 1.5, 100, 40, 0.25)
    domain.record_inference(provider, model, "error", 0.5)
    assert value("model_inference_requests_total", {**pm, "status": "success"}) == 1
    assert value("model_inference_requests_total", {**pm, "status": "error"}) == 1
    assert value("model_inference_duration_seconds_count", pm) == 2
    assert value("model_inference_duration_seconds_sum", pm) == pytest.approx(2.0)
    assert value("model_inference_duration_seconds_bucket", {**pm, "le": "1.0"}) == 1
    assert value("tokens_used_total", {**pm, "token_type": "input"}) == 100
    assert value("tokens_used_total", {**pm, "token_type": "output"}) == 40
    assert value("credits_used_total", pm) == pytest.approx(0.25)
    # The backend's label values only: no prompt/completion series.
    assert REGISTRY.get_sample_value("tokens_used_total", {**pm, "token_type": "prompt"}) is None
    assert REGISTRY.get_sample_value("tokens_used_total", {**pm, "token_type": "completion"}) is None


def test_inference_buckets_are_the_backends() -> None:
    provider = uniq("prov")
    domain.record_inference(provider, "m", "success", 30.0)
    bounds = {s.labels["le"] for m in REGISTRY.collect() if m.name == "model_inference_duration_seconds"
              for s in m.samples if s.name.endswith("_bucket") and s.labels["provider"] == provider}
    assert bounds == {"0.1", "0.5", "1.0", "2.5", "5.0", "10.0", "25.0", "60.0", "+Inf"}


def test_record_inference_ignores_negative_amounts() -> None:
    provider = uniq("prov")
    pm = {"provider": provider, "model": "m"}
    domain.record_inference(provider, "m", "success", -1.0, -5, -5, -1.0)
    assert value("model_inference_requests_total", {**pm, "status": "success"}) == 1
    assert REGISTRY.get_sample_value("tokens_used_total", {**pm, "token_type": "input"}) is None
    assert REGISTRY.get_sample_value("credits_used_total", pm) is None


def test_set_provider_health_sets_and_clamps() -> None:
    provider = uniq("prov")
    domain.set_provider_health(provider, 0.75, 0.1, 0.42)
    p = {"provider": provider}
    assert value("provider_availability", p) == 0.75
    assert value("provider_error_rate", p) == pytest.approx(0.1)
    domain.set_provider_health(provider, 3.0, -1.0, -2.0)
    assert value("provider_availability", p) == 1.0
    assert value("provider_error_rate", p) == 0.0


def test_provider_response_time_is_a_histogram_with_the_backends_buckets() -> None:
    provider = uniq("prov")
    p = {"provider": provider}
    domain.set_provider_health(provider, 1.0, 0.0, 0.42)
    domain.record_provider_response(provider, 3.0)
    domain.record_provider_response(provider, -1.0)  # clamped to 0
    assert value("provider_response_time_seconds_count", p) == 3
    assert value("provider_response_time_seconds_sum", p) == pytest.approx(3.42)
    assert REGISTRY.get_sample_value("provider_response_time_seconds", p) is None  # no bare series
    buckets = {le: value("provider_response_time_seconds_bucket", {**p, "le": le})
               for le in ("0.1", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf")}
    assert buckets == {"0.1": 1, "0.5": 2, "1.0": 2, "2.5": 2, "5.0": 3, "10.0": 3, "+Inf": 3}
    domain.set_provider_health(provider, 1.0, 0.0)  # no response time: nothing observed
    assert value("provider_response_time_seconds_count", p) == 3


def test_record_db_query_counts_and_summary_has_no_buckets() -> None:
    table = uniq("tbl")
    domain.record_db_query(table, "select", 0.01)
    domain.record_db_query(table, "insert", 0.03)
    assert value("database_queries_total", {"table": table, "operation": "select"}) == 1
    assert value("database_queries_total", {"table": table, "operation": "insert"}) == 1
    assert value("database_query_duration_seconds_count", {"table": table}) == 2
    assert value("database_query_duration_seconds_sum", {"table": table}) == pytest.approx(0.04)
    family = next(m for m in REGISTRY.collect() if m.name == "database_query_duration_seconds")
    assert family.type == "summary"
    assert not any(s.name.endswith("_bucket") for s in family.samples)


def test_record_cache_hit_and_miss() -> None:
    cache = uniq("cache")
    domain.record_cache(cache, True)
    domain.record_cache(cache, True)
    domain.record_cache(cache, False)
    assert value("cache_hits_total", {"cache_name": cache}) == 2
    assert value("cache_misses_total", {"cache_name": cache}) == 1


def test_set_business_replaces_counts_and_zeroes_vanished_labels() -> None:
    s1, s2 = uniq("st"), uniq("st")
    plan = uniq("plan")
    domain.set_business(
        active_api_keys={s1: 4, s2: 2}, subscriptions={(plan, "monthly"): 7}, trials={s1: 3}
    )
    assert value("active_api_keys", {"status": s1}) == 4
    assert value("active_api_keys", {"status": s2}) == 2
    assert value("subscription_count", {"plan_type": plan, "billing_cycle": "monthly"}) == 7
    assert value("trial_active", {"status": s1}) == 3
    domain.set_business(active_api_keys={s1: 5})  # s2 vanished; others untouched
    assert value("active_api_keys", {"status": s1}) == 5
    assert value("active_api_keys", {"status": s2}) == 0
    assert value("subscription_count", {"plan_type": plan, "billing_cycle": "monthly"}) == 7
    domain.set_business(subscriptions={}, trials={})
    assert value("subscription_count", {"plan_type": plan, "billing_cycle": "monthly"}) == 0
    assert value("trial_active", {"status": s1}) == 0


def test_every_gauge_has_a_deliberate_multiprocess_mode() -> None:
    from prometheus_client import Gauge

    import app.monitoring.http as http_module

    gauges = [
        obj
        for module in (domain, gateway, http_module)
        for obj in vars(module).values()
        if isinstance(obj, Gauge)
    ]
    assert len(gauges) >= 9
    for g in gauges:
        # "all" is the silent default (one series per pid); nothing here wants it.
        assert g._multiprocess_mode != "all", g._name
    assert http_module.HTTP_IN_PROGRESS._multiprocess_mode == "livesum"


def test_contract_names_and_types() -> None:
    families = {m.name: m.type for m in REGISTRY.collect()}
    expected = {
        "fastapi_requests": "counter",
        "fastapi_requests_duration_seconds": "histogram",
        "fastapi_requests_in_progress": "gauge",
        "fastapi_exceptions": "counter",
        "model_inference_requests": "counter",
        "model_inference_duration_seconds": "histogram",
        "tokens_used": "counter",
        "credits_used": "counter",
        "provider_availability": "gauge",
        "provider_error_rate": "gauge",
        "provider_response_time_seconds": "histogram",
        "database_queries": "counter",
        "database_query_duration_seconds": "summary",
        "cache_hits": "counter",
        "cache_misses": "counter",
        "active_api_keys": "gauge",
        "subscription_count": "gauge",
        "trial_active": "gauge",
    }
    for name, typ in expected.items():
        assert families.get(name) == typ, name


RELOAD = """
import importlib
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
import app.instrumentation as kit
before = {name: obj for name, obj in vars(kit).items() if isinstance(obj, MetricWrapperBase)}
importlib.reload(kit)  # runs the module a second time in the same process
importlib.reload(kit)
for name, metric in before.items():
    assert getattr(kit, name) is metric, name
kit.record_inference("p", "m", "success", 0.2, 3, 4, 0.5)
names = [m.name for m in REGISTRY.collect()]
for family in ("tokens_used", "model_inference_requests", "provider_response_time_seconds", "trial_active"):
    assert names.count(family) == 1, (family, names.count(family))
print("reloaded", len(before))
"""


def test_reload_reuses_the_registered_metrics() -> None:
    """Running the module twice (importlib.reload) neither fails nor registers a family twice.

    In a fresh interpreter, since this process's registry is shared by every test.
    """
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", RELOAD], capture_output=True, text=True, timeout=60,
                          env=env, cwd=root, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("reloaded") and int(done.stdout.split()[1]) >= 13


def test_a_clashing_definition_is_refused() -> None:
    with pytest.raises(ValueError, match="different metric"):
        domain._metric(domain.Gauge, "tokens_used_total", "x", ["provider", "model", "token_type"])
    with pytest.raises(ValueError, match="different metric"):
        domain._metric(domain.Counter, "tokens_used_total", "x", ["provider"])
    with pytest.raises(ValueError, match="other buckets"):
        domain._metric(domain.Histogram, "provider_response_time_seconds", "x", ["provider"], buckets=(1, 2))
    same = domain._metric(domain.Histogram, "provider_response_time_seconds", "x", ["provider"],
                          buckets=domain.PROVIDER_RESPONSE_BUCKETS)
    assert same is domain.PROVIDER_RESPONSE_TIME


def test_gateway_observe_upstream_success_and_error() -> None:
    cat = uniq("cat")
    gateway.observe_upstream(cat, 0.2, None)
    assert value("metrics_gateway_upstream_requests_total", {"category": cat}) == 1
    assert value("metrics_gateway_upstream_query_duration_seconds_count", {"category": cat}) == 1
    assert value("metrics_gateway_upstream_up") == 1
    assert value("metrics_gateway_upstream_last_success_timestamp_seconds") > 0
    gateway.observe_upstream(cat, 0.3, "timeout")
    assert value("metrics_gateway_upstream_requests_total", {"category": cat}) == 2
    errors = {"category": cat, "error_type": "timeout"}
    assert value("metrics_gateway_upstream_errors_total", errors) == 1
    assert value("metrics_gateway_upstream_up") == 0


def test_gateway_cache_outcome_and_breaker_state() -> None:
    cat = uniq("cat")
    gateway.cache_outcome(cat, "hit")
    gateway.cache_outcome(cat, "coalesced", 3)
    assert value("metrics_gateway_cache_events_total", {"category": cat, "outcome": "hit"}) == 1
    coalesced = {"category": cat, "outcome": "coalesced"}
    assert value("metrics_gateway_cache_events_total", coalesced) == 3
    gateway.set_breaker_state("open")
    states = {s: value("metrics_gateway_circuit_breaker_state", {"state": s})
              for s in ("closed", "open", "half_open")}
    assert states == {"closed": 0, "open": 1, "half_open": 0}
    gateway.set_breaker_state("closed")
    assert value("metrics_gateway_circuit_breaker_state", {"state": "closed"}) == 1
