"""Clients in API_TOKENS (name, limits), their validation, and limits over the settings' defaults."""

from __future__ import annotations

import json

import pytest

from app.common.clients import Client, Limits, limits_from_config
from app.gateway.engines.limits import LimitExceeded, check_answer, check_range, human, reach_back
from app.gateway.engines.scheduler import Scheduler
from app.gateway.settings import GatewaySettings
from app.security.settings import SecuritySettings, TokenSource

TOKENS = {
    "tok-staging": {"name": "grafana-staging", "env": "staging",
                    "limits": {"max_concurrent_queries": 2, "max_range_seconds": "7d", "max_series": 100}},
    "tok-full": {"name": "ops", "labels": {"env": "prod"}, "upstream_headers": {"X-Scope-OrgID": "p"}},
    "tok-bare": {},
}


def test_tokens_are_clients_with_names_and_limits() -> None:
    s = SecuritySettings(api_tokens=json.dumps(TOKENS))
    clients = dict(zip((t.get_secret_value() for t in s.api_tokens), s.token_clients(), strict=True))
    staging = clients["tok-staging"]
    assert staging.name == "grafana-staging" and staging.label == "grafana-staging"
    assert staging.limits == Limits(max_concurrent_queries=2, max_range_seconds=7 * 86400.0, max_series=100)
    assert s.token_tenants()[0].matchers == (("env", "staging"),)  # name/limits are not labels
    assert clients["tok-full"].name == "ops" and s.token_tenants()[1].upstream_headers
    bare = clients["tok-bare"]
    assert bare.name is None and bare.label == "unnamed" and "tok-bare" not in bare.key


def test_list_form_tokens_are_unnamed_clients_each_on_its_own() -> None:
    s = SecuritySettings(api_tokens="a-token,b-token")
    a, b = s.token_clients()
    assert a.label == b.label == "unnamed" and a.key != b.key


def test_file_tokens_are_clients_too(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "tokens.json"  # type: ignore[operator]
    path.write_text(json.dumps({"tok-file": {"name": "from-file", "limits": {"max_queued_queries": 3}}}))
    source = TokenSource(SecuritySettings(api_tokens_file=path))
    tokens, _ = source.grants()
    assert source.client_at(tokens.index(b"tok-file")).name == "from-file"


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_concurent_queries": 1}, "unknown limit"),
    ({"max_concurrent_queries": 0}, "an integer of at least 1"),
    ({"max_range_seconds": "a week"}, "duration"),
    ({"blocked_queries": ["(unclosed"]}, "not a regular expression"),
])
def test_bad_limits_are_refused_without_echoing_the_token(limits: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        SecuritySettings(api_tokens=json.dumps({"secret-tok": {"name": "x", "limits": limits}}))
    assert message in str(err.value) and "secret-tok" not in str(err.value)


@pytest.mark.parametrize("name", ["", "has space", "unnamed", "x" * 65])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        SecuritySettings(api_tokens=json.dumps({"tok": {"name": name}}))


def test_token_limits_override_the_settings_defaults_field_by_field() -> None:
    sched = Scheduler(GatewaySettings(client_max_concurrent_queries=3, client_max_range_seconds=3600,
                                      client_max_series=50))
    own = sched.ticket(Client("name:a", "a", limits_from_config({"max_range_seconds": "2h"}))).limits
    assert own.max_range_seconds == 7200 and own.max_concurrent_queries == 3 and own.max_series == 50
    default = sched.ticket(Client("addr:127.0.0.1")).limits
    assert default.max_range_seconds == 3600


def test_range_checks_speak_grafana() -> None:
    sched = Scheduler(GatewaySettings(client_max_range_seconds=86400, client_max_lookback_seconds=7 * 86400,
                                      client_max_points_per_series=1000))
    t = sched.ticket(Client("name:g", "g"))
    now = 10_000_000.0
    with pytest.raises(LimitExceeded) as err:
        check_range(t, "up", now - 2 * 86400, now, 300, now)
    assert err.value.status == 400 and "the time range is 2d; at most 1d" in err.value.message
    assert "'g'" in err.value.message
    with pytest.raises(LimitExceeded) as err:
        check_range(t, "up", now - 3600, now, 1, now)
    assert "3601 points per series" in err.value.message and "Min interval" in err.value.message
    with pytest.raises(LimitExceeded) as err:
        check_range(t, "rate(up[5m] offset 7d)", now - 3600, now, 60, now)
    assert err.value.reason == "lookback"
    check_range(t, "rate(up[5m] offset 6d)", now - 3600, now, 60, now)


def test_answer_series_are_counted_in_the_bytes() -> None:
    body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"a": '{"metric":'}, "values": [[1, "1"]]}, {"metric": {}, "values": [[1, "2"]]}]}},
        separators=(",", ":")).encode()
    t = Scheduler(GatewaySettings(client_max_series=1)).ticket(Client("name:g", "g"))
    with pytest.raises(LimitExceeded) as err:
        check_answer(t, body)
    assert err.value.status == 422 and "2 series; at most 1" in err.value.message


def test_reach_back_and_human() -> None:
    assert reach_back("rate(x[5m] offset 1h)") == (3900.0, None)
    assert reach_back("max_over_time(x[1d:5m])") == (86400 + 300.0, None)
    assert reach_back("x @ 1000") == (0.0, 700.0)
    assert reach_back("sum(") is None
    assert human(90061) == "1d1h1m1s" and human(604800) == "1w"
