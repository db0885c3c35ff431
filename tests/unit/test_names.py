"""Catalog figures as metric names (app/gateway/catalog/names.py) and the printer that expands them."""

from __future__ import annotations

from datetime import timedelta

import promql_parser as pp
import pytest

from app.gateway.catalog.loader import build_catalog, load_catalog
from app.gateway.catalog.names import FigureNameError, FigureNames, figure_name, merge_metadata
from app.gateway.promql.syntax import PromQLError, check_printable, parse, print_expr, same_tree, selectors

CATALOG = load_catalog()
NAMES = FigureNames(CATALOG)


def expand(query: str) -> str:
    out = NAMES.expand(parse(query))
    assert out is not None, query
    parse(out)  # always valid PromQL
    return out


def matchers(expr: str) -> list[set[tuple[str, str, str]]]:
    return [{(m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in s.matchers.matchers}
            for s in selectors(parse(expr))]


# --- the printer prints any tree ---------------------------------------------------------------

ANY_TREE = [
    "up", "-up", "- -1", "(-1) ^ 2", "2 ^ -1", "-up ^ 2", "1 - 2 * 3", "(1 - 2) * 3", "0x3d", "1e-7 * up",
    "Inf", "-Inf", "NaN", '"a \\"quoted\\"\\n string"', "`raw\\n`",
    'up{job="a",instance!="b",x=~"c.*",y!~"d|e"}', '{__name__="up"}', '{__name__=~"up|down", job="x"}',
    'up{a="1" or b="2", c="3"}', '{"my.metric", "a.b"="x"}', 'sum by ("a.b") (x)',
    "up offset 5m", "up offset -5m", "up @ 100", "up @ 100.5 offset 1h", "up @ start()", "up @ end()",
    "rate(x[5m])", "rate(x[1d2h] offset 1w)", "x[90s]", "x[1500ms]",
    "max_over_time(rate(x[1m])[5m:])", "max_over_time(rate(x[1m])[5m:30s] @ 100 offset 1m)",
    "sum(x)", "sum by (a, b) (x)", "sum without () (x)", "sum by () (x)", "topk(3, x)", "topk by (a) (3, x)",
    'count_values("v", x)', "quantile(0.9, x)", "limitk(2, x)",
    "a + b", "a > bool b", "a / on (x) b", "a / on () b", "a * ignoring (x) group_left (y) b",
    "a * on (x) group_right () b", "a and b or c unless d", "a > bool on (x) group_left b",
    "a + fill(0) b", "a + on(x) group_right(y) fill_right(2) b", "a + fill_left(1) fill_right(2) b",
    'label_replace(x, "dst", "$1", "src", "(.*)")', 'label_join(x, "d", ",", "a", "b")', "time()",
    "vector(1)", "scalar(x)", "absent(nonexistent{a=\"b\"})", "histogram_quantile(0.9, rate(b[5m]))",
    "sort_desc(sum by (a) (rate(x[5m])))", "a atan2 b",
]


@pytest.mark.parametrize("expr", ANY_TREE)
def test_printer_round_trips_any_tree(expr: str) -> None:
    check_printable(expr)
    assert same_tree(print_expr(parse(expr)), expr)


def test_same_tree_sees_what_str_hides() -> None:
    """The library's str() drops the subquery colon; the full tree does not."""
    assert str(pp.parse("x[5m:]")) == str(pp.parse("x[5m]"))
    assert not same_tree("x[5m:]", "x[5m]")


# --- expansion -----------------------------------------------------------------------------------

def test_names_are_the_docs_family_names() -> None:
    assert "gateway_http_server_error_ratio" in NAMES
    assert "gateway_http_requests_total" in NAMES  # counter: the _total name
    assert "gateway_http_requests" not in NAMES  # the bare counter name is left to the upstream
    assert NAMES.names() == sorted(figure_name(CATALOG, q) for q in CATALOG.queries.values())
    assert NAMES.expand(parse("gateway_http_requests")) is None


def test_a_query_without_figures_is_left_alone() -> None:
    assert NAMES.expand(parse("sum(rate(fastapi_requests_total[5m]))")) is None


def test_bare_figure_is_its_expression() -> None:
    q = CATALOG.queries["http_server_error_ratio"]
    assert same_tree(expand("gateway_http_server_error_ratio"), f"({q.expr})")


def test_declared_label_matcher_is_set_on_every_selector() -> None:
    q = CATALOG.queries["model_inference_error_ratio"]
    out = expand('gateway_model_inference_error_ratio{provider="openai", model=~"gpt-.*"}')
    sels = matchers(out)
    assert len(sels) == len(selectors(parse(q.expr))) == 3
    for s in sels:
        assert ("provider", "Equal", "openai") in s and ("model", "Re", "gpt-.*") in s
    # Matchers the figure had stay: they are ANDed, never replaced.
    assert ("status", "Equal", "error") in sels[0]


def test_name_matcher_form_and_values_with_quotes_are_safe() -> None:
    out = expand('{__name__="gateway_provider_availability", provider="a\\"} or vector(1) or x{b=\\""}')
    (sel,) = selectors(parse(out))
    assert [(m.name, m.value) for m in sel.matchers.matchers] == [("provider", 'a"} or vector(1) or x{b="')]


@pytest.mark.parametrize(("query", "message"), [
    ('gateway_provider_availability{job="x"}', "has no label 'job'"),
    ('gateway_providers{provider="x"}', "has no label 'provider'"),
    ('gateway_http_requests_per_second_by_status_class{status_class="5xx"}', "computed inside the figure"),
    ('gateway_provider_availability{provider="a" or provider="b"}', "'or'"),
])
def test_unusable_matchers_are_refused(query: str, message: str) -> None:
    with pytest.raises(FigureNameError, match=message):
        NAMES.expand(parse(query))


def test_figure_errors_are_promql_errors() -> None:
    assert issubclass(FigureNameError, PromQLError)


def test_offset_and_at_move_every_outermost_selector() -> None:
    out = expand("gateway_http_server_error_ratio offset 1h")
    for sel in selectors(parse(out)):
        assert sel.offset == timedelta(hours=1)
    out = expand("gateway_http_server_error_ratio @ 1700000000 offset 5m")
    for sel in selectors(parse(out)):
        assert sel.offset == timedelta(minutes=5) and sel.at is not None


def test_offset_adds_to_the_figures_own_and_keeps_pinned_selectors() -> None:
    cat = build_catalog({"queries": [
        {"id": "a", "expr": "sum(x offset 1m) + sum(y @ 100) + max_over_time(z[5m:1m] offset 2m)",
         "help": "h", "unit": "u"},
    ]})
    out = FigureNames(cat).expand(parse("gateway_a offset 1h"))
    assert out is not None
    tree = parse(out)
    by_name = {s.name: s for s in selectors(tree)}
    assert by_name["x"].offset == timedelta(hours=1, minutes=1)
    assert by_name["y"].offset is None and by_name["y"].at is not None  # pinned: untouched
    assert by_name["z"].offset is None  # inside a subquery: the subquery moves instead
    assert "[5m:1m] offset 1h2m" in out


def test_a_figure_reading_the_clock_refuses_offset() -> None:
    cat = build_catalog({"queries": [{"id": "age", "expr": "time() - max(last_seen)", "help": "h", "unit": "s"}]})
    names = FigureNames(cat)
    assert names.expand(parse("gateway_age")) is not None
    with pytest.raises(FigureNameError, match="evaluation time"):
        names.expand(parse("gateway_age offset 1h"))


def test_range_over_a_figure_is_a_subquery() -> None:
    out = expand('rate(gateway_tokens_used_total[5m])')
    assert same_tree(out, "rate((sum(tokens_used_total))[5m:])")
    out = expand('max_over_time(gateway_provider_availability{provider="x"}[1h] offset 1d)')
    assert same_tree(out, 'max_over_time((max by (provider) (provider_availability{provider="x"}))[1h:] offset 1d)')


def test_figures_inside_larger_queries_keep_precedence() -> None:
    out = expand("gateway_http_server_error_ratio * 100 > 5")
    tree = parse(out)
    assert isinstance(tree, pp.BinaryExpr) and isinstance(tree.lhs, pp.BinaryExpr)
    assert isinstance(tree.lhs.lhs, pp.ParenExpr)  # the whole figure is one operand
    out = expand("-gateway_providers_healthy")
    assert isinstance(parse(out), pp.UnaryExpr)


def test_expansion_is_one_level() -> None:
    cat = build_catalog({"queries": [
        {"id": "a", "expr": "sum(gateway_b)", "help": "h", "unit": "u"},
        {"id": "b", "expr": "sum(x)", "help": "h", "unit": "u"},
    ]})
    assert FigureNames(cat).expand(parse("gateway_a")) == "(sum(gateway_b))"


# --- listing and metadata ----------------------------------------------------------------------

def test_names_matching_a_selector() -> None:
    assert NAMES.names_matching([]) == NAMES.names()
    assert NAMES.names_matching(["gateway_providers"]) == ["gateway_providers"]
    assert NAMES.names_matching(['{__name__=~"gateway_provider_.*"}']) == [
        n for n in NAMES.names() if n.startswith("gateway_provider_")]
    # Labels no figure has: kept only when the matcher accepts an absent label.
    assert NAMES.names_matching(['{job="x"}']) == []
    assert NAMES.names_matching(['{__name__=~".+", job!="x"}']) == NAMES.names()
    # A declared label: kept (values are unknown without a query).
    with_provider = NAMES.names_matching(['{provider="openai"}'])
    assert "gateway_provider_availability" in with_provider and "gateway_providers" not in with_provider
    with pytest.raises(PromQLError):
        NAMES.names_matching(["sum(x)"])


def test_metadata_has_type_help_unit() -> None:
    meta = NAMES.metadata()
    q = CATALOG.queries["tokens_used"]
    assert meta["gateway_tokens_used_total"] == [{"type": "counter", "help": q.help, "unit": q.unit}]
    assert meta["gateway_provider_availability"][0]["type"] == "gauge"
    assert list(NAMES.metadata("gateway_providers")) == ["gateway_providers"]


def test_merge_metadata_keeps_figures_first_under_a_limit() -> None:
    ours = {"gateway_b": [{"type": "gauge", "help": "", "unit": ""}]}
    upstream = {"a": [{"type": "counter", "help": "x", "unit": ""}], "c": [], "gateway_b": [{"type": "x"}]}
    assert list(merge_metadata(upstream, ours, None)) == ["a", "c", "gateway_b"]
    assert merge_metadata(upstream, ours, None)["gateway_b"] == ours["gateway_b"]
    assert list(merge_metadata(upstream, ours, 2)) == ["a", "gateway_b"]
    assert list(merge_metadata(upstream, ours, 0)) == []
