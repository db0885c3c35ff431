"""The query catalog's data model: what a figure is, independent of where it is defined."""

from __future__ import annotations

from dataclasses import dataclass

CATEGORIES: tuple[str, ...] = ("system", "providers", "models", "business", "performance")


@dataclass(frozen=True, slots=True)
class CatalogQuery:
    """One figure: a PromQL expression, the family it is exported as, and what it means."""

    id: str
    name: str  # family name without the gateway prefix
    expr: str
    help: str
    unit: str
    kind: str = "gauge"  # "gauge" or "counter" (a sum of counters, exported with _total)
    labels: tuple[str, ...] = ()  # labels kept in the output; everything else is summed away
    batchable: bool = True  # evaluates to an instant vector, so it may share a request

    def family(self, prefix: str) -> str:
        return f"{prefix}_{self.name}"


@dataclass(frozen=True, slots=True)
class SummaryFigure:
    """One key of the summary contract and the query (and scale) that computes it."""

    section: str
    key: str
    query_id: str
    scale: float = 1.0
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    prefix: str
    queries: dict[str, CatalogQuery]
    categories: dict[str, tuple[str, ...]]  # category -> query ids
    summary: tuple[SummaryFigure, ...]
    source: str = "default"

    def category_queries(self, category: str) -> list[CatalogQuery]:
        return [self.queries[q] for q in self.categories[category]]

    def summary_queries(self) -> list[CatalogQuery]:
        seen: dict[str, CatalogQuery] = {}
        for fig in self.summary:
            seen.setdefault(fig.query_id, self.queries[fig.query_id])
        return list(seen.values())

    def all_queries(self) -> list[CatalogQuery]:
        """Every query served by a category, once, in catalog order (for /all)."""
        wanted = {q for ids in self.categories.values() for q in ids}
        return [q for qid, q in self.queries.items() if qid in wanted]
