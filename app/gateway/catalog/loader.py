"""Load and validate a query catalog (TOML) at start-up.

A catalog that references an unknown query, or holds a query that does not
parse, stops the start with a message naming it: a broken figure found at
deploy time is cheaper than one found by a dashboard at 3 a.m.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from app.gateway.catalog.model import CATEGORIES, Catalog, CatalogQuery, SummaryFigure
from app.gateway.promql.syntax import PromQLError, check_printable, parse, value_type

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = frozenset({"job", "instance", "query", "gateway_query"})


class CatalogError(ValueError):
    """The catalog cannot be served; the message names the entry at fault."""


def load_catalog(path: Path | None = None) -> Catalog:
    data, source = read_catalog_data(path)
    return build_catalog(data, source)


def read_catalog_data(path: Path | None = None) -> tuple[dict[str, Any], str]:
    """The catalog's TOML as data, and its source name (`default` for the packaged one).

    Separate from validation so a tool (the doctor) can judge each entry on its own.
    """
    if path is None:
        text = resources.files("app.gateway.catalog").joinpath("default.toml").read_text()
        source = "default"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
        source = str(path)
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {source} is not valid TOML: {exc}") from exc


def parse_query(entry: dict[str, Any], source: str) -> CatalogQuery:
    """One `[[queries]]` entry, validated (parses, prints back, instant vector), or CatalogError."""
    qid = entry.get("id")
    if not isinstance(qid, str) or not _NAME.match(qid):
        raise CatalogError(f"{source}: a query has a missing or invalid id: {entry!r}")
    for key in ("expr", "help", "unit"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise CatalogError(f"{source}: query {qid!r} needs a non-empty {key!r}")
    name = entry.get("name", qid)
    if not _NAME.match(name) or name.endswith("_total"):
        raise CatalogError(f"{source}: query {qid!r} has an invalid name {name!r}")
    kind = entry.get("type", "gauge")
    if kind not in ("gauge", "counter"):
        raise CatalogError(f"{source}: query {qid!r} has type {kind!r}; use gauge or counter")
    labels = tuple(entry.get("labels", ()))
    for label in labels:
        if not _LABEL.match(label) or label.startswith("__") or label in RESERVED_LABELS:
            raise CatalogError(f"{source}: query {qid!r} keeps a reserved or invalid label {label!r}")
    expr = entry["expr"]
    try:
        tree = parse(expr)
        check_printable(expr)
    except PromQLError as exc:
        raise CatalogError(f"{source}: query {qid!r} does not parse: {exc}") from exc
    vtype = value_type(tree)
    if vtype not in ("vector", "scalar"):
        raise CatalogError(f"{source}: query {qid!r} evaluates to a {vtype}; use an instant vector")
    return CatalogQuery(
        id=qid, name=name, expr=expr, help=entry["help"].strip(), unit=entry["unit"],
        kind=kind, labels=labels, batchable=vtype == "vector",
    )


def build_catalog(data: dict[str, Any], source: str = "catalog") -> Catalog:
    prefix = data.get("prefix", "gateway")
    if not isinstance(prefix, str) or not _NAME.match(prefix):
        raise CatalogError(f"{source}: invalid prefix {prefix!r}")
    queries: dict[str, CatalogQuery] = {}
    names: dict[str, str] = {}
    for entry in data.get("queries", []):
        q = parse_query(entry, source)
        if q.id in queries:
            raise CatalogError(f"{source}: query id {q.id!r} is defined twice")
        if q.name in names:
            raise CatalogError(f"{source}: queries {names[q.name]!r} and {q.id!r} share name {q.name!r}")
        queries[q.id] = q
        names[q.name] = q.id
    if not queries:
        raise CatalogError(f"{source}: the catalog defines no queries")

    categories: dict[str, tuple[str, ...]] = {}
    for category, ids in data.get("categories", {}).items():
        if category not in CATEGORIES:
            raise CatalogError(f"{source}: unknown category {category!r}; use one of {CATEGORIES}")
        for qid in ids:
            if qid not in queries:
                raise CatalogError(f"{source}: category {category!r} names unknown query {qid!r}")
        categories[category] = tuple(ids)
    for category in CATEGORIES:
        categories.setdefault(category, ())

    figures: list[SummaryFigure] = []
    for section, keys in data.get("summary", {}).items():
        for key, ref in keys.items():
            if isinstance(ref, str):
                ref = {"query": ref}
            qid = ref.get("query")
            if qid not in queries:
                raise CatalogError(f"{source}: summary {section}.{key} names unknown query {qid!r}")
            figures.append(SummaryFigure(
                section=section, key=key, query_id=qid, scale=float(ref.get("scale", 1.0)),
                unit=ref.get("unit"),
            ))
    return Catalog(prefix=prefix, queries=queries, categories=categories,
                   summary=tuple(figures), source=source)
