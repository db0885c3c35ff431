"""The catalog doctor's judgement, with respx standing in for Prometheus' HTTP API.

The real thing (a Prometheus scraping the synthetic backends) is in
tests/integration/test_doctor.py; here each rule is pinned on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from app.__main__ import main
from app.gateway.doctor import NameFacts, Status, diagnose, judge, resolve
from app.gateway.promql.syntax import parse
from app.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
PROM = "http://prom.doctor:9090"

# Metadata as Prometheus reports it: counters under their OpenMetrics name, except one
# scraped as text 0.0.4 (`..._total`); a histogram and a summary under their base names.
METADATA: dict[str, list[dict[str, str]]] = {
    "reqs": [{"type": "counter", "help": "", "unit": ""}],
    "legacy_total": [{"type": "counter", "help": "", "unit": ""}],
    "lat_seconds": [{"type": "histogram", "help": "", "unit": ""}],
    "db_seconds": [{"type": "summary", "help": "", "unit": ""}],
    "avail": [{"type": "gauge", "help": "", "unit": ""}],
    "plans_count": [{"type": "gauge", "help": "", "unit": ""}],
    "declared_only": [{"type": "gauge", "help": "", "unit": ""}],
}
SERIES = {"reqs_total", "legacy_total", "lat_seconds_bucket", "lat_seconds_sum", "lat_seconds_count",
          "db_seconds_sum", "db_seconds_count", "avail", "plans_count", "mystery"}


def facts(*names: str) -> dict[str, NameFacts]:
    return {n: resolve(n, METADATA, n in SERIES) for n in names}


@pytest.mark.parametrize(("name", "family", "types", "role"), [
    ("reqs_total", "reqs", ("counter",), "total"),
    ("legacy_total", "legacy_total", ("counter",), ""),
    ("lat_seconds_bucket", "lat_seconds", ("histogram",), "bucket"),
    ("lat_seconds_sum", "lat_seconds", ("histogram",), "sum"),
    ("db_seconds_count", "db_seconds", ("summary",), "count"),
    ("plans_count", "plans_count", ("gauge",), ""),  # a gauge named _count is itself
    ("avail_total", None, (), ""),  # a gauge has no _total series
    ("mystery", None, (), ""),
])
def test_series_names_resolve_to_their_family(name: str, family: str | None, types: tuple[str, ...],
                                              role: str) -> None:
    f = resolve(name, METADATA, True)
    assert (f.family, f.types, f.role) == (family, types, role)


def verdict(expr: str) -> tuple[bool, list[str], list[str]]:
    tree = parse(expr)
    from app.gateway.doctor import metric_names
    out = judge(tree, facts(*metric_names(tree)), "15m")
    return out.ok, out.problems, out.unused


@pytest.mark.parametrize("expr", [
    "sum(reqs_total)",
    "sum(rate(reqs_total[5m]))",
    "sum(rate(legacy_total[5m]))",
    "histogram_quantile(0.95, sum by (le) (rate(lat_seconds_bucket[5m])))",
    "sum(rate(lat_seconds_sum[5m])) / sum(rate(lat_seconds_count[5m]))",
    "sum(rate(db_seconds_sum[5m])) / sum(rate(db_seconds_count[5m]))",
    "max by (provider) (avail)",
    "sum(plans_count)",
    "deriv(avail[10m])",
    "max_over_time(avail[1h])",
    "absent(nothing_at_all)",
    "vector(1)",
])
def test_healthy_readings(expr: str) -> None:
    ok, problems, _ = verdict(expr)
    assert ok and not problems, problems


@pytest.mark.parametrize(("expr", "says"), [
    ("rate(avail[5m])", "rate() reads avail, a gauge: rate needs a counter"),
    ("increase(plans_count[1h])", "increase() reads plans_count, a gauge"),
    ("histogram_quantile(0.9, rate(db_seconds_count[5m]))", "histogram_quantile() reads db_seconds_count, a summary"),
    ("histogram_quantile(0.9, sum by (le) (rate(lat_seconds_sum[5m])))", "needs the _bucket series of a histogram"),
    ("delta(reqs_total[5m])", "delta() reads reqs_total, a counter: delta needs a gauge"),
    ("avg(lat_seconds)", "lat_seconds is a histogram: its series are lat_seconds_bucket"),
    ("sum(declared_only)", "Prometheus has metadata for declared_only (gauge): a target declares it"),
    ("sum(nothing_at_all)", "nothing_at_all: no series in the last 15m and no metadata"),
    ("sum(rate(reqs_total[5m])) / sum(rate(nothing_at_all[5m]))", "nothing_at_all"),
    ("sum(nothing_at_all) or vector(0)", "nothing_at_all"),  # a constant is a default, not a source
])
def test_broken_readings_say_why(expr: str, says: str) -> None:
    ok, problems, _ = verdict(expr)
    assert not ok
    assert any(says in p for p in problems), problems


def test_or_is_healthy_when_one_source_is_and_notes_the_unused_branch() -> None:
    ok, problems, unused = verdict("avg(rate(lat_seconds_sum[5m]) / rate(lat_seconds_count[5m])) or avg(lat_seconds)")
    assert ok and not problems
    assert any("lat_seconds is a histogram" in u for u in unused)
    ok, problems, _ = verdict("avg(rate(gone_sum[5m])) or avg(declared_only)")
    assert not ok and len(problems) == 2  # both branches' reasons


# --- diagnose() through the HTTP API ---------------------------------------------------------------

CATALOG = """
[[queries]]
id = "good"
help = "h"
unit = "u"
expr = 'sum(rate(reqs_total[5m]))'

[[queries]]
id = "empty_now"
help = "h"
unit = "u"
expr = 'sum(avail{provider="nobody"})'

[[queries]]
id = "gauge_rated"
help = "h"
unit = "u"
expr = 'sum(rate(avail[5m]))'

[[queries]]
id = "unparsable"
help = "h"
unit = "u"
expr = 'sum(rate(reqs_total[5m])'

[[queries]]
id = "unknown_type"
help = "h"
unit = "u"
expr = 'sum(mystery)'

[[queries]]
id = "refused"
help = "h"
unit = "u"
expr = 'sum(avail) / on (x) group_left avail'
"""


def api(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/api/v1/metadata":
        return httpx.Response(200, json={"status": "success", "data": METADATA})
    if path == "/api/v1/series":
        name = request.url.params["match[]"]
        assert float(request.url.params["end"]) - float(request.url.params["start"]) == pytest.approx(900)
        data = [{"__name__": name}] if name in SERIES else []
        return httpx.Response(200, json={"status": "success", "data": data})
    query = dict(httpx.QueryParams(request.content.decode()))["query"]
    if "group_left" in query:
        return httpx.Response(422, json={"status": "error", "errorType": "execution",
                                         "error": "many-to-many matching not allowed"})
    result = [] if "nobody" in query else [{"metric": {}, "value": [1.7e9, "1"]}]
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "cat.toml"
    path.write_text(CATALOG)
    return path


@pytest.fixture()
def prom() -> Any:
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="prom.doctor").mock(side_effect=api)
        yield mock


async def test_each_figure_gets_a_verdict(prom: respx.MockRouter, catalog: Path) -> None:
    report = await diagnose(GatewaySettings(prometheus_url=PROM), catalog, timeout=2)
    by_id = {f.id: f for f in report.figures}
    assert {i: f.status for i, f in by_id.items()} == {
        "good": Status.OK, "empty_now": Status.WARN, "gauge_rated": Status.BROKEN,
        "unparsable": Status.BROKEN, "unknown_type": Status.WARN, "refused": Status.BROKEN}
    assert by_id["good"].series_now == 1 and by_id["good"].families_exist and by_id["good"].types_fit
    assert by_id["empty_now"].warnings == ["no data now: the query matches no series at this instant"]
    assert by_id["gauge_rated"].families_exist is True and by_id["gauge_rated"].types_fit is False
    assert not by_id["unparsable"].parses and "does not parse" in by_id["unparsable"].problems[0]
    assert "no metadata" in by_id["unknown_type"].warnings[0]
    assert "many-to-many" in by_id["refused"].problems[0]
    assert by_id["good"].reads == [{"name": "reqs_total", "has_series": True, "family": "reqs",
                                    "type": "counter", "role": "total", "used_by": ["rate"]}]
    assert report.exit_code == 1


async def test_unreachable_prometheus_cannot_be_checked() -> None:
    report = await diagnose(GatewaySettings(prometheus_url="http://127.0.0.1:1", connect_timeout_seconds=0.5),
                            timeout=1)
    assert report.exit_code == 2 and report.error is not None and "unreachable" in report.error


async def test_unreadable_catalog_cannot_be_checked(tmp_path: Path) -> None:
    report = await diagnose(GatewaySettings(prometheus_url=PROM), tmp_path / "missing.toml")
    assert report.exit_code == 2 and "cannot read catalog" in (report.error or "")


def test_command_line_json_and_table(prom: respx.MockRouter, catalog: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_URL", "http://elsewhere.invalid:9090")  # the flag wins
    code = main(["doctor", "--prometheus-url", PROM, "--catalog", str(catalog), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["exit_code"] == 1
    assert doc["summary"] == {"ok": 1, "warn": 2, "broken": 3}
    assert doc["prometheus_url"] == PROM and doc["catalog"] == str(catalog)
    monkeypatch.setenv("PROMETHEUS_URL", PROM)
    monkeypatch.setenv("CATALOG_PATH", str(catalog))  # from the environment, like the server
    assert main(["doctor"]) == 1
    table = capsys.readouterr().out
    assert "BROKEN  gauge_rated" in table and "problem: rate() reads avail, a gauge" in table
    assert "6 figures: 1 ok, 2 warn, 3 broken (exit 1)" in table


def test_a_healthy_catalog_exits_zero(prom: respx.MockRouter, tmp_path: Path) -> None:
    path = tmp_path / "fine.toml"
    path.write_text('[[queries]]\nid = "ok"\nhelp = "h"\nunit = "u"\nexpr = "sum(rate(reqs_total[5m]))"\n')
    assert main(["doctor", "--prometheus-url", PROM, "--catalog", str(path)]) == 0


def test_a_catalog_level_error_is_broken(prom: respx.MockRouter, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dangling.toml"
    path.write_text('[categories]\nsystem = ["ghost"]\n'
                    '[[queries]]\nid = "ok"\nhelp = "h"\nunit = "u"\nexpr = "sum(rate(reqs_total[5m]))"\n')
    assert main(["doctor", "--prometheus-url", PROM, "--catalog", str(path)]) == 1
    assert "catalog: " in capsys.readouterr().out


def test_invalid_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--prometheus-url", "ftp://nope"]) == 2
    assert "PROMETHEUS_URL must start with http" in capsys.readouterr().err


def test_console_script_and_python_dash_m() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"metrics-gateway": "app.__main__:main"}
    done = subprocess.run([sys.executable, "-m", "app", "doctor", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0 and "--prometheus-url" in done.stdout and "--json" in done.stdout


async def test_odd_entries_and_duplicate_ids_are_reported_each(prom: respx.MockRouter, tmp_path: Path) -> None:
    path = tmp_path / "odd.toml"
    path.write_text('queries = [1, {id = "a", help = "h", unit = "u", expr = "sum(avail)"},'
                    ' {id = "a", help = "h", unit = "u", expr = "sum(rate(avail[5m]))"}]\n')
    report = await diagnose(GatewaySettings(prometheus_url=PROM), path, timeout=2)
    assert [(f.id, f.status) for f in report.figures] == [("#1", Status.BROKEN), ("a", Status.OK),
                                                          ("a", Status.BROKEN)]
    assert "is not a table" in report.figures[0].problems[0]
    assert report.exit_code == 1
