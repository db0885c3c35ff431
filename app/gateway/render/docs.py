"""Markdown documentation generated from the catalog, so it can never drift from it."""

from __future__ import annotations

from collections.abc import Sequence

from app.gateway.catalog.model import CATEGORIES, Catalog
from app.gateway.promql.syntax import enforce, quote


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _scope_lines(scope: Sequence[tuple[str, str]]) -> list[str]:
    if not scope:
        return []
    labels = ", ".join(f"`{k}={quote(v)}`" for k, v in scope)
    return [f"Your token is confined to {labels}: every figure reads only series with these labels "
            "(added to every selector of the PromQL below).", ""]


def markdown(catalog: Catalog, base_path: str = "/prometheus/metrics",
             scope: Sequence[tuple[str, str]] = ()) -> str:
    """The figures' documentation; for a caller confined to labels (`scope`), the PromQL
    shown is what runs for it: the tenant's matchers on every selector."""
    lines = [
        "# Gateway figures",
        "",
        f"Generated from the query catalog `{catalog.source}`; every figure below is served",
        "as Prometheus text (0.0.4, or OpenMetrics when asked) and as JSON with `?format=json`.",
        f"Families carry the prefix `{catalog.prefix}_`. Every text route also emits",
        f"`{catalog.prefix}_upstream_up`, `{catalog.prefix}_query_success{{query}}`,",
        f"`{catalog.prefix}_query_has_data{{query}}` and `{catalog.prefix}_query_age_seconds{{query}}`.",
        "A figure whose query matches no series is listed under `no_data` in the JSON",
        f"answers and has `{catalog.prefix}_query_has_data` 0 in the text answers.",
        "",
        *_scope_lines(scope),
        "## Summary (`" + base_path + "/summary`, JSON)",
        "",
        "| key | unit | query | scale |",
        "|---|---|---|---|",
    ]
    for fig in catalog.summary:
        q = catalog.queries[fig.query_id]
        lines.append(f"| `{fig.section}.{fig.key}` | {fig.unit or q.unit} | `{q.id}` | x{fig.scale:g} |")
    routes: dict[str, list[str]] = {}
    for category in CATEGORIES:
        for qid in catalog.categories.get(category, ()):
            routes.setdefault(qid, []).append(f"{base_path}/{category}")
    for fig in catalog.summary:
        routes.setdefault(fig.query_id, []).append(f"{base_path}/summary")
    for category in CATEGORIES:
        ids = catalog.categories.get(category, ())
        if not ids:
            continue
        lines += ["", f"## {category} (`{base_path}/{category}`)", ""]
        if category in ("providers", "models"):
            lines += ["Accepts `provider=` and `model=` filters (repeatable), set on every selector.", ""]
        lines += ["| family | type | unit | labels | meaning | routes | PromQL |", "|---|---|---|---|---|---|---|"]
        for qid in ids:
            q = catalog.queries[qid]
            name = q.family(catalog.prefix) + ("_total" if q.kind == "counter" else "")
            labels = ", ".join(q.labels) or "—"
            served = ", ".join(f"`{r}`" for r in sorted(set(routes[qid])))
            lines.append(
                f"| `{name}` | {q.kind} | {_cell(q.unit)} | {labels} | {_cell(q.help)} | {served} "
                f"| `{_cell(enforce(q.expr, scope))}` |"
            )
    lines.append("")
    return "\n".join(lines)
