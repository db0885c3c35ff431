"""PromQL editing on the syntax tree: filters on every selector, safe quoting, value types."""

from __future__ import annotations

import re

import promql_parser as pp
import pytest

from app.gateway.catalog.loader import load_catalog
from app.gateway.promql.syntax import (
    PromQLError,
    apply_filters,
    check_printable,
    metric_names,
    parse,
    print_expr,
    quote,
    selectors,
    value_type,
)


def matchers_of(expr: str) -> list[dict[str, tuple[str, str]]]:
    """For each selector of the re-parsed expr: label -> (op, value)."""
    out = []
    for sel in selectors(pp.parse(expr)):
        out.append({m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in sel.matchers.matchers})
    return out


# Expressions with the number of selectors each contains.
NESTED = [
    ("up", 1),
    ("sum(rate(model_inference_requests_total[5m]))", 1),
    ('histogram_quantile(0.95, sum by (le, provider) (rate(model_inference_duration_seconds_bucket[5m])))', 1),
    ("sum(rate(a_sum[5m])) / sum(rate(a_count[5m]))", 2),
    ('label_replace(rate(tokens_used_total{token_type="prompt"}[5m]), "dst", "$1", "model", "(.*)")', 1),
    ("(sum(rate(x[5m])) or vector(0)) / ((sum(rate(y[5m])) or vector(0)) + sum(z))", 3),
    ("max_over_time(rate(x[1m])[5m:1m])", 1),
    ("a / on (provider) group_left (model) b", 2),
    ("sum((provider_availability > bool 0) * (provider_availability < bool 1))", 2),
    ("-x offset 1h", 1),
]


@pytest.mark.parametrize(("expr", "n_selectors"), NESTED)
def test_filter_is_set_on_every_selector(expr: str, n_selectors: int) -> None:
    out = apply_filters(expr, {"provider": ["openai"]})
    sels = matchers_of(out)
    assert len(sels) == n_selectors
    for m in sels:
        assert m["provider"] == ("Equal", "openai")
    # Everything else about the query is unchanged: removing the filter gives the same tree back.
    original = {k: v for k, v in matchers_of(expr)[0].items() if k != "provider"}
    assert {k: v for k, v in sels[0].items() if k != "provider"} == original


def test_filter_keeps_other_matchers_and_function_args() -> None:
    expr = ('label_replace(rate(tokens_used_total{token_type="prompt"}[5m]), '
            '"dst", "$1", "model", "(.*)")')
    out = apply_filters(expr, {"provider": ["openai"], "model": ["gpt-4"]})
    tree = pp.parse(out)
    assert isinstance(tree, pp.Call) and tree.func.name == "label_replace"
    assert [a.val for a in tree.args[1:]] == ["dst", "$1", "model", "(.*)"]
    (m,) = matchers_of(out)
    assert m == {
        "token_type": ("Equal", "prompt"),
        "provider": ("Equal", "openai"),
        "model": ("Equal", "gpt-4"),
    }


def test_existing_matcher_on_the_same_label_is_replaced() -> None:
    expr = 'sum(x{provider="anthropic", status="ok"}) + sum(y{provider=~"a.*"})'
    out = apply_filters(expr, {"provider": ["openai"]})
    sels = matchers_of(out)
    assert sels[0] == {"provider": ("Equal", "openai"), "status": ("Equal", "ok")}
    assert sels[1] == {"provider": ("Equal", "openai")}
    assert "anthropic" not in out and "a.*" not in out


def test_several_values_become_one_escaped_regex() -> None:
    values = ["gpt-4.1", "claude+3", "a/b@c:d", "x_y"]
    out = apply_filters("sum(rate(m[5m]))", {"model": values})
    (m,) = matchers_of(out)
    op, regex = m["model"]
    assert op == "Re"
    pattern = re.compile(regex)
    for v in values:
        assert pattern.fullmatch(v), v
    # Dots and pluses are literal: no accidental wider match.
    assert not pattern.fullmatch("gpt-441")
    assert not pattern.fullmatch("claudeee3")
    assert not pattern.fullmatch("gpt-4.1|claude+3")


def test_empty_filters_return_the_expr_unchanged() -> None:
    assert apply_filters("sum( x )", {}) == "sum( x )"


@pytest.mark.parametrize("bad", [
    'openai"}',
    'openai"} or vector(1) or up{a="',
    'a"b',
    "back\\slash",
    "new\nline",
    "",
    "-leading-dash",
    "white space",
    "x{a}",
    "a,b",
    "tab\t",
    "a|b",
    "ünicode",
])
def test_non_plain_values_are_rejected(bad: str) -> None:
    with pytest.raises(PromQLError, match="not a plain label value"):
        apply_filters("sum(x)", {"provider": [bad]})
    with pytest.raises(PromQLError):
        apply_filters("sum(x)", {"model": ["ok", bad]})


def test_trailing_newline_is_not_a_plain_value() -> None:
    with pytest.raises(PromQLError):
        apply_filters("sum(x)", {"provider": ["openai\n"]})


@pytest.mark.parametrize("value", ["openai", "gpt-4", "meta-llama/Llama-3.1-8B", "a@b:c+d", "0"])
def test_output_reparses_and_carries_exactly_the_input(value: str) -> None:
    out = apply_filters('sum by (provider) (rate(x{status="ok"}[5m])) / sum(y)', {"provider": [value]})
    for m in matchers_of(out):
        assert m["provider"] == ("Equal", value)


@pytest.mark.parametrize("value", ['"}', "\\", "\n", '\\"', "a\"} or up{b=\"", "`", "${1}", "ü\u0001"])
def test_quote_round_trips_any_string(value: str) -> None:
    (m,) = matchers_of(f"x{{a={quote(value)}}}")
    assert m["a"] == ("Equal", value)
    tree = pp.parse(f"label_replace(x, {quote(value)}, \"v\", \"\", \"\")")
    assert tree.args[1].val == value


def test_catalog_string_args_with_backslashes_survive_filtering() -> None:
    expr = r'label_replace(x, "d", "$1", "code", "(\\d)..")'
    out = apply_filters(expr, {"provider": ["p"]})
    assert pp.parse(out).args[4].val == r"(\d).."


def test_every_default_catalog_expr_prints_back_to_itself() -> None:
    catalog = load_catalog()
    assert len(catalog.queries) > 30
    for q in catalog.queries.values():
        check_printable(q.expr)
        assert str(pp.parse(print_expr(parse(q.expr)))) == str(pp.parse(q.expr)), q.id
        # And with filters, the tree differs only by the added matchers.
        filtered = apply_filters(q.expr, {"provider": ["openai"]})
        assert len(selectors(pp.parse(filtered))) == len(selectors(pp.parse(q.expr))), q.id
        for m in matchers_of(filtered):
            assert m["provider"] == ("Equal", "openai"), q.id


def test_parse_error_is_promql_error() -> None:
    with pytest.raises(PromQLError):
        parse("sum(rate(x[5m])")
    with pytest.raises(PromQLError):
        apply_filters("sum(", {"provider": ["a"]})


@pytest.mark.parametrize(("expr", "expected"), [
    ("up", "vector"),
    ("sum(up)", "vector"),
    ("rate(x[5m])", "vector"),
    ("histogram_quantile(0.9, sum by (le) (rate(b[5m])))", "vector"),
    ("x[5m]", "matrix"),
    ("rate(x[1m])[5m:1m]", "matrix"),
    ("1", "scalar"),
    ("1 + 2", "scalar"),
    ("time()", "scalar"),
    ("scalar(up)", "scalar"),
    ('"s"', "string"),
    ("up / 2", "vector"),
    ("2 * sum(up)", "vector"),
    ("(up)", "vector"),
    ("-(1)", "scalar"),
    ("vector(1)", "vector"),
])
def test_value_type(expr: str, expected: str) -> None:
    assert value_type(parse(expr)) == expected


def test_metric_names() -> None:
    assert metric_names("sum(rate(a[5m])) / sum(b{x=\"1\"}) + vector(0)") == {"a", "b"}
