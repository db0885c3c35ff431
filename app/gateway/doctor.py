"""`metrics-gateway doctor`: does each catalog figure work against this Prometheus, and if not, why.

A figure that matches nothing upstream is served as "no data", which is honest
but says nothing about the cause. The doctor says it, per figure:

1. parses: the entry passes the catalog's own validation;
2. families: every metric name it reads has series upstream (`/api/v1/series`
   over a lookback window); a name without series is told apart from a family
   declared by a target without samples, and from a histogram's base name (its
   series are `_bucket`, `_sum` and `_count`), using `/api/v1/metadata`;
3. types: each name is used as its type allows: `rate`/`increase`/`irate`/
   `resets` over a counter or a histogram's or summary's `_sum`/`_count`/
   `_bucket`; `histogram_quantile` over a histogram's `_bucket`; `delta`/`deriv`
   over a gauge; a bare read of anything;
4. data now: the expression's instant query returns series.

`A or B` is healthy when one side that reads a metric is (`or vector(0)` is a
default value, not a source). A figure is **broken** when it does not parse or
has no healthy reading (exit status 1); "no data now" alone, or a name whose
type Prometheus does not know, is a **warning**. Exit status 2: the doctor
could not run (Prometheus unreachable, catalog unreadable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import promql_parser as pp

from app.common.secrets import redact_url
from app.gateway.catalog.loader import CatalogError, build_catalog, parse_query, read_catalog_data
from app.gateway.promql.syntax import PromQLError, parse
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.breaker import QUERY_ERRORS
from app.gateway.upstream.client import PrometheusClient

COUNTER_FUNCS = frozenset({"rate", "irate", "increase", "resets"})
GAUGE_FUNCS = frozenset({"delta", "idelta", "deriv", "predict_linear", "holt_winters",
                         "double_exponential_smoothing"})
ABSENT_FUNCS = frozenset({"absent", "absent_over_time"})
HISTOGRAMS = frozenset({"histogram", "gaugehistogram"})
# Series-name suffixes, the role they play and the family types that expose them.
SUFFIXES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("_total", "total", frozenset({"counter"})),
    ("_bucket", "bucket", HISTOGRAMS),
    ("_sum", "sum", frozenset({"histogram", "summary"})),
    ("_count", "count", frozenset({"histogram", "summary"})),
    ("_gsum", "sum", frozenset({"gaugehistogram"})),
    ("_gcount", "count", frozenset({"gaugehistogram"})),
    ("_created", "created", frozenset({"counter", "histogram", "summary"})),
    ("_info", "info", frozenset({"info"})),
)
MAX_CONCURRENCY = 8


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class Use:
    """How an expression reads a metric: under which functions (kind, function name)."""

    kind: str  # "direct", "counter", "gauge", "quantile", "absent"
    func: str = ""


@dataclass(slots=True)
class NameFacts:
    """What Prometheus says about one metric name a figure reads."""

    name: str
    has_series: bool
    family: str | None = None  # the metadata entry it belongs to
    types: tuple[str, ...] = ()  # that family's type(s), empty when unknown
    role: str = ""  # "", "total", "bucket", "sum", "count", "created", "info"


@dataclass(slots=True)
class FigureReport:
    id: str
    expr: str
    status: Status = Status.OK
    parses: bool = True
    families_exist: bool | None = None
    types_fit: bool | None = None
    series_now: int | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. an `or` fallback that is not used
    reads: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class DoctorReport:
    prometheus_url: str
    catalog: str
    lookback_seconds: float
    figures: list[FigureReport] = field(default_factory=list)
    catalog_problems: list[str] = field(default_factory=list)
    error: str | None = None  # the doctor could not run

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return 2
        broken = any(f.status is Status.BROKEN for f in self.figures)
        return 1 if broken or self.catalog_problems else 0

    def counts(self) -> dict[str, int]:
        return {s.value: sum(f.status is s for f in self.figures) for s in Status}

    def as_dict(self) -> dict[str, Any]:
        return {
            "prometheus_url": self.prometheus_url, "catalog": self.catalog,
            "lookback_seconds": self.lookback_seconds, "exit_code": self.exit_code,
            "error": self.error, "summary": self.counts(), "catalog_problems": self.catalog_problems,
            "figures": [{**asdict(f), "status": f.status.value} for f in self.figures],
        }


# --- reading an expression ----------------------------------------------------------------------

def _children(node: pp.Expr, uses: tuple[Use, ...]) -> list[tuple[pp.Expr, tuple[Use, ...]]]:
    """The sub-expressions of `node` and the uses they are read under."""
    if isinstance(node, pp.MatrixSelector):
        return [(node.vector_selector, uses)]
    if isinstance(node, pp.Call):
        name = node.func.name
        if name in COUNTER_FUNCS:
            uses = (*uses, Use("counter", name))
        elif name in GAUGE_FUNCS:
            uses = (*uses, Use("gauge", name))
        elif name in ABSENT_FUNCS:
            uses = (*uses, Use("absent", name))
        elif name == "histogram_quantile":
            uses = (*uses, Use("quantile", name))
        return [(a, uses) for a in node.args]
    if isinstance(node, pp.AggregateExpr):
        return [(n, uses) for n in (node.param, node.expr) if n is not None]
    if isinstance(node, pp.BinaryExpr):
        return [(node.lhs, uses), (node.rhs, uses)]
    if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
        return [(node.expr, uses)]
    return []


def metric_names(node: pp.Expr) -> set[str]:
    """Every metric name the expression reads (selectors without a name are skipped)."""
    out: set[str] = set()
    stack: list[pp.Expr] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, pp.VectorSelector):
            if n.name:
                out.add(n.name)
            continue
        stack.extend(child for child, _ in _children(n, ()))
    return out


def resolve(name: str, metadata: dict[str, list[dict[str, Any]]], has_series: bool) -> NameFacts:
    """The metadata family a series name belongs to: itself, or its base name for a known suffix.

    Metadata is keyed by family: a histogram `x` is known as `x`, its series are
    `x_bucket`, `x_sum`, `x_count`; a counter is `x` (OpenMetrics) or `x_total`
    (text format 0.0.4), its series `x_total`.
    """
    def types_of(key: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(str(m.get("type", "unknown")) for m in metadata.get(key, ())))

    if name in metadata:
        return NameFacts(name, has_series, name, types_of(name), "")
    for suffix, role, kinds in SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in metadata and set(types_of(base)) & kinds:
            return NameFacts(name, has_series, base, types_of(base), role)
    return NameFacts(name, has_series)


# --- judging an expression -----------------------------------------------------------------------

@dataclass(slots=True)
class _Outcome:
    ok: bool
    reads: bool  # reads at least one metric (a constant side of `or` is a default, not a source)
    problems: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def _known(types: Iterable[str]) -> set[str]:
    return {t for t in types if t not in ("unknown", "untyped", "")}


def _existence_problem(f: NameFacts, lookback: str) -> str | None:
    if f.has_series:
        return None
    if f.family == f.name and f.role == "" and set(f.types) & HISTOGRAMS:
        return (f"{f.name} is a {'/'.join(f.types)}: its series are {f.name}_bucket, {f.name}_sum and "
                f"{f.name}_count; {f.name} itself has none")
    if f.family is not None:
        return (f"{f.name}: no series in the last {lookback}; Prometheus has metadata for {f.family} "
                f"({'/'.join(f.types) or 'unknown type'}): a target declares it but has recorded nothing")
    return f"{f.name}: no series in the last {lookback} and no metadata: no target exports it"


def _type_problem(f: NameFacts, use: Use) -> str | None:
    kinds = _known(f.types)
    if not kinds:
        return None  # unknown: a warning, not a verdict
    what = "/".join(sorted(kinds))
    if use.kind == "quantile" and not (f.role == "bucket" and kinds & HISTOGRAMS):
        return f"histogram_quantile() reads {f.name}, a {what}: it needs the _bucket series of a histogram"
    if use.kind == "counter":
        fits = "counter" in kinds or (f.role in ("bucket", "sum", "count") and kinds & {"histogram", "summary"})
        if not fits:
            return (f"{use.func}() reads {f.name}, a {what}: {use.func} needs a counter "
                    f"(or a histogram's or summary's _sum/_count/_bucket)")
    if use.kind == "gauge" and "gauge" not in kinds:
        return f"{use.func}() reads {f.name}, a {what}: {use.func} needs a gauge (use rate or increase on counters)"
    return None


def judge(node: pp.Expr, facts: dict[str, NameFacts], lookback: str, *, existence: bool = True,
          types: bool = True, uses: tuple[Use, ...] = ()) -> _Outcome:
    """Whether `node` has a healthy reading: every metric it needs exists and fits its use."""
    if isinstance(node, pp.VectorSelector):
        if not node.name:
            return _Outcome(True, True)
        if any(u.kind == "absent" for u in uses):
            return _Outcome(True, True)  # absent() is meant for missing series
        f = facts[node.name]
        problems = []
        if existence and (p := _existence_problem(f, lookback)):
            problems.append(p)
        if types:
            problems += [p for u in uses if (p := _type_problem(f, u))]
        return _Outcome(not problems, True, problems)
    parts = [judge(child, facts, lookback, existence=existence, types=types, uses=u)
             for child, u in _children(node, uses)]
    reads = any(p.reads for p in parts)
    if isinstance(node, pp.BinaryExpr) and str(node.op) == "or":
        sources = [p for p in parts if p.reads]
        if not sources:
            return _Outcome(True, False)
        good = [p for p in sources if p.ok]
        if good:
            unused = [q for p in sources if not p.ok for q in p.problems]
            return _Outcome(True, True, [], list(dict.fromkeys(unused + [q for p in good for q in p.unused])))
        return _Outcome(False, True, list(dict.fromkeys(q for p in sources for q in p.problems)))
    problems = list(dict.fromkeys(q for p in parts for q in p.problems))
    unused = list(dict.fromkeys(q for p in parts for q in p.unused))
    return _Outcome(all(p.ok for p in parts), reads, problems, unused)


def _uses_by_name(node: pp.Expr) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    stack: list[tuple[pp.Expr, tuple[Use, ...]]] = [(node, ())]
    while stack:
        n, uses = stack.pop()
        if isinstance(n, pp.VectorSelector):
            if n.name:
                out.setdefault(n.name, set()).update({u.func for u in uses} or {"direct"})
            continue
        stack.extend(_children(n, uses))
    return out


# --- talking to Prometheus -----------------------------------------------------------------------

def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"


async def _series_present(client: PrometheusClient, names: Sequence[str], lookback: float,
                          timeout: float) -> dict[str, bool]:
    end = time.time()
    sem = asyncio.Semaphore(MAX_CONCURRENCY)

    async def one(name: str) -> bool:
        params = [("match[]", name), ("start", f"{end - lookback:.3f}"), ("end", f"{end:.3f}"), ("limit", "1")]
        async with sem:
            data = await client.api_get("/api/v1/series", params, timeout=timeout)
        return bool(data)

    found = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, found, strict=True))


async def _evaluate(client: PrometheusClient, report: FigureReport, timeout: float,
                    sem: asyncio.Semaphore) -> None:
    async with sem:
        try:
            answer = await client.query(report.expr, timeout=timeout, category="doctor")
        except UpstreamError as exc:
            if exc.error_type in QUERY_ERRORS:
                report.problems.append(f"Prometheus refused the query: {exc.error_type}: {exc.message}")
            else:
                report.warnings.append(f"not evaluated now: {exc.error_type}: {exc.message}")
            return
    report.series_now = len(answer.series)
    odd = sum(not math.isfinite(s.value) for s in answer.series)
    if not answer.series:
        report.warnings.append("no data now: the query matches no series at this instant")
    elif odd:
        report.warnings.append(f"{odd} of {len(answer.series)} series are NaN or infinite now")
    report.warnings += [f"Prometheus warns: {w}" for w in answer.warnings]


async def diagnose(settings: GatewaySettings, catalog_path: Path | None = None, *,
                   timeout: float = 10.0, lookback: float = 900.0) -> DoctorReport:
    """Check every figure of the catalog against the Prometheus of `settings`."""
    report = DoctorReport(redact_url(settings.prometheus_url), str(catalog_path or "default"), lookback)
    try:
        data, report.catalog = read_catalog_data(catalog_path)
    except CatalogError as exc:
        report.error = str(exc)
        return report

    trees: dict[int, pp.Expr] = {}  # by position: a duplicate id is the catalog's problem, not a collision
    entries = data.get("queries", [])
    for n, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        if not isinstance(entry, dict):
            report.figures.append(FigureReport(f"#{n + 1}", "", Status.BROKEN, parses=False,
                                               problems=[f"[[queries]] entry #{n + 1} is not a table: {entry!r}"]))
            continue
        fig = FigureReport(str(entry.get("id") or f"#{n + 1}"), str(entry.get("expr", "")))
        report.figures.append(fig)
        try:
            parse_query(entry, report.catalog)
            trees[len(report.figures) - 1] = parse(fig.expr)
        except (CatalogError, PromQLError) as exc:
            fig.parses = False
            fig.status = Status.BROKEN
            fig.problems.append(str(exc))
    if all(f.parses for f in report.figures):
        try:
            build_catalog(data, report.catalog)
        except CatalogError as exc:
            report.catalog_problems.append(str(exc))

    client = PrometheusClient(settings)
    try:
        try:
            metadata = await client.api_get("/api/v1/metadata", [], timeout=timeout)
            names = sorted(set().union(*(metric_names(t) for t in trees.values())))
            present = await _series_present(client, names, lookback, timeout)
        except UpstreamError as exc:
            report.error = f"cannot read {report.prometheus_url}: {exc.error_type}: {exc.message}"
            return report
        if not isinstance(metadata, dict):
            metadata = {}
        facts = {n: resolve(n, metadata, present[n]) for n in names}
        window = _duration(lookback)
        sem = asyncio.Semaphore(MAX_CONCURRENCY)
        checked = [report.figures[i] for i in trees]
        for i, fig in zip(trees, checked, strict=True):
            tree = trees[i]
            fig.families_exist = judge(tree, facts, window, types=False).ok
            fig.types_fit = judge(tree, facts, window, existence=False).ok
            both = judge(tree, facts, window)
            fig.problems += both.problems
            fig.notes += [f"fallback not used: {u}" for u in both.unused]
            uses = _uses_by_name(tree)
            for name in sorted(uses):
                f = facts[name]
                fig.reads.append({"name": name, "has_series": f.has_series, "family": f.family,
                                  "type": "/".join(f.types) or None, "role": f.role or None,
                                  "used_by": sorted(uses[name])})
                if f.has_series and not _known(f.types):
                    fig.warnings.append(f"{name}: Prometheus has no type for it (no metadata): not checked")
        await asyncio.gather(*(_evaluate(client, f, timeout, sem) for f in checked))
        for fig in checked:
            if fig.problems:
                fig.status = Status.BROKEN
            elif fig.warnings:
                fig.status = Status.WARN
    finally:
        await client.aclose()
    return report


# --- output --------------------------------------------------------------------------------------

def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def render_table(report: DoctorReport, out: TextIO) -> None:
    out.write(f"metrics-gateway doctor: catalog {report.catalog} against {report.prometheus_url}\n")
    if report.error is not None:
        out.write(f"error: {report.error}\n")
        return
    rows = [("STATUS", "FIGURE", "PARSES", "FAMILIES", "TYPES", "DATA NOW")]
    for f in report.figures:
        data = "-" if f.series_now is None else (f"{f.series_now} series" if f.series_now else "none")
        rows.append((f.status.value.upper() if f.status is Status.BROKEN else f.status.value, f.id,
                     _yes(f.parses), _yes(f.families_exist), _yes(f.types_fit), data))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
        if n == 0:
            continue
        f = report.figures[n - 1]
        for text in f.problems:
            out.write(f"    problem: {text}\n")
        for text in f.warnings:
            out.write(f"    warning: {text}\n")
    for text in report.catalog_problems:
        out.write(f"catalog: {text}\n")
    c = report.counts()
    out.write(f"{len(report.figures)} figures: {c['ok']} ok, {c['warn']} warn, {c['broken']} broken"
              f" (exit {report.exit_code})\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prometheus-url", help="upstream Prometheus API base (default: PROMETHEUS_URL)")
    parser.add_argument("--catalog", type=Path, help="catalog TOML (default: CATALOG_PATH, else the packaged one)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table (for CI)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per upstream request (default 10)")
    parser.add_argument("--lookback", type=float, default=900.0,
                        help="seconds of history in which a metric must have series (default 900)")


def run(args: argparse.Namespace, settings: GatewaySettings, out: TextIO | None = None) -> int:
    """The `doctor` subcommand: report, and exit 0 (healthy), 1 (a figure broken) or 2 (could not run)."""
    out = out or sys.stdout
    catalog_path = args.catalog or settings.catalog_path
    report = asyncio.run(diagnose(settings, catalog_path, timeout=args.timeout, lookback=args.lookback))
    if args.json:
        out.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        render_table(report, out)
    return report.exit_code
