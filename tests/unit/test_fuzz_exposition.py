"""Hypothesis properties: label escaping and the exposition renderers round-trip any label value.

app.common.exposition.render_families over app.gateway.render.text.families (the
gateway's text routes) with arbitrary label values (quotes, backslashes,
newlines, control characters, any unicode) and values (incl. NaN, +-Inf):
prometheus_client's own text parser reads back exactly the label values and
values; the real `promtool check metrics` accepts the output. Also the vROps
store's hand-written escape_label / unescape_label. FUZZ_REPORT_DIR=dir writes
the example counts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from app.common.exposition import render_families
from app.gateway.catalog.model import CatalogQuery
from app.gateway.render import text as text_render
from app.gateway.result import Lookup, QueryResult, Sample
from app.vrops.store import ROW_RE, Blob, Row, encode_blob, escape_label, unescape_label
from tests.support.procs import promtool_check_metrics

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
PROMTOOL_EXAMPLES = int(os.environ.get("FUZZ_PROMTOOL_EXAMPLES", "40"))
COUNTS: dict[str, int] = {}

label_values = st.text(max_size=40)  # any unicode scalar (no surrogates: they are not UTF-8)
nasty = st.sampled_from(['"', "\\", "\n", '\\"', "\\n", "\r", "\t", "\x00", "{", "}", ",", "=", " ",
                         "é", "😀", "\u2028", "\\\\\n"])
values_st = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6).map(float))
mixed = st.lists(st.one_of(label_values, nasty), min_size=1, max_size=4).map("".join)

GAUGE = CatalogQuery(id="fuzz_share", name="fuzz_share_ratio", expr="vector(1)",
                     help='Help with "quotes" \\ and\nnewline.', unit="ratio", kind="gauge",
                     labels=("provider", "model"))
COUNTER = CatalogQuery(id="fuzz_counter", name="fuzz_requests", expr="vector(1)", help="A counter.",
                       unit="requests", kind="counter", labels=("provider",))


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _results(pairs: list[tuple[str, str, float]]) -> list[QueryResult]:
    gauge = {((("provider", p), ("model", m))): v for p, m, v in pairs}  # unique label sets
    counter = {(("provider", p),): abs(v) if not math.isnan(v) else 0.0 for p, _, v in pairs}
    return [
        QueryResult(GAUGE, Lookup.MISS, tuple(Sample(k, v) for k, v in gauge.items()), 1.0, 0.5),
        QueryResult(COUNTER, Lookup.HIT, tuple(Sample(k, v) for k, v in counter.items()), 1.0, 2.0),
    ]


def _parsed(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(body.decode("utf-8")):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


pairs_st = st.lists(st.tuples(mixed, mixed, values_st), min_size=1, max_size=6)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_st)
def test_text_families_round_trip_through_prometheus_client_parser(pairs: list[tuple[str, str, float]]) -> None:
    _count("exposition_round_trip")
    results = _results(pairs)
    body, ctype = render_families(text_render.families("gw", results, True), None)
    assert ctype.startswith("text/plain; version=0.0.4")
    parsed = _parsed(body)
    for r in results:
        family = r.query.family("gw") + ("_total" if r.query.kind == "counter" else "")
        got = parsed[family]
        assert len(got) == len(r.samples)
        for s in r.samples:
            assert _same(got[tuple(sorted(s.labels))], s.value)
    assert parsed["gw_upstream_up"][()] == 1.0


@settings(max_examples=PROMTOOL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_st)
@pytest.mark.integration
def test_promtool_accepts_any_label_value(pairs: list[tuple[str, str, float]]) -> None:
    _count("promtool_check_metrics")
    body, _ = render_families(text_render.families("gw", _results(pairs), False), None)
    done = promtool_check_metrics(body)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[:500]


@settings(max_examples=PROMTOOL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_st)
def test_openmetrics_round_trip(pairs: list[tuple[str, str, float]]) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    _count("openmetrics_round_trip")
    results = _results(pairs)
    body, ctype = render_families(text_render.families("gw", results, True), "application/openmetrics-text")
    assert ctype.startswith("application/openmetrics-text")
    got: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in om_parse(body.decode("utf-8")):  # type: ignore[no-untyped-call]
        if fam.name == "gw_fuzz_share_ratio":
            got = {tuple(sorted(s.labels.items())): s.value for s in fam.samples}
    for s in results[0].samples:
        assert _same(got[tuple(sorted(s.labels))], s.value)


@settings(max_examples=EXAMPLES, deadline=None)
@given(label_values | mixed)
def test_vrops_label_escaping_round_trips(value: str) -> None:
    _count("vrops_escape_round_trip")
    escaped = escape_label(value)
    assert "\n" not in escaped
    assert unescape_label(escaped) == value
    # No unescaped double quote survives: every quote is preceded by an odd run of backslashes.
    i = 0
    while (i := escaped.find('"', i)) != -1:
        run = len(escaped[:i]) - len(escaped[:i].rstrip("\\"))
        assert run % 2 == 1
        i += 1


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(mixed, mixed, values_st), min_size=1, max_size=5))
def test_vrops_blob_rows_round_trip(rows: list[tuple[str, str, float]]) -> None:
    _count("vrops_blob_round_trip")
    blob = Blob.parse(encode_blob([Row(k, o, v, 1.7e9) for k, o, v in rows], 1.7e9))
    assert len(ROW_RE.findall(blob.rows)) == len(rows)
    for (k, o, v), (k2, o2, v2) in zip(rows, blob.iter_rows(), strict=True):
        assert (k2, o2) == (k, o) and _same(v2, v)


def teardown_module() -> None:
    folder = os.environ.get("FUZZ_REPORT_DIR")
    if folder:
        Path(folder, "exposition.json").write_text(json.dumps({"hypothesis": COUNTS}, indent=2) + "\n")
