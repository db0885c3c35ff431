"""README, docs/catalog.md and docs/operations/metrics-guide.md say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from app import instrumentation as kit
from app.gateway.catalog.loader import load_catalog
from app.gateway.doctor import metric_names
from app.gateway.promql.syntax import parse
from tests.unit.test_dashboards import BACKEND_CONTRACT

ROOT = Path(__file__).resolve().parents[2]
CATALOG_DOC = (ROOT / "docs" / "catalog.md").read_text()
GUIDE = (ROOT / "docs" / "operations" / "metrics-guide.md").read_text()
README = (ROOT / "README.md").read_text()


def _family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and BACKEND_CONTRACT.get(base) in ("histogram", "summary"):
            return base
    return name


def test_catalog_doc_lists_every_family_the_default_catalog_reads() -> None:
    read = {_family(n) for q in load_catalog().queries.values() for n in metric_names(parse(q.expr))}
    table = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", CATALOG_DOC, re.M))
    listed = {n for pair in table for n in pair if n}
    assert read <= listed, read - listed
    for name in read:  # and with the type the backend gives it
        row = next(line for line in CATALOG_DOC.splitlines() if f"`{name}`" in line and line.startswith("|"))
        assert BACKEND_CONTRACT[name].split()[0] in row, (name, row)


def test_metrics_guide_lists_every_kit_metric_with_its_type() -> None:
    kinds = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary"}
    for metric in (m for m in vars(kit).values() if isinstance(m, MetricWrapperBase)):
        name = metric._name + ("_total" if type(metric).__name__ == "Counter" else "")
        row = next((line for line in GUIDE.splitlines()
                    if line.startswith("| ") and f"`{name}`" in line.split(" | ")[0]), None)
        assert row is not None, name
        assert kinds[type(metric).__name__] in row.lower(), (name, row)
    assert "`input`/`output`" in GUIDE and "prompt/completion" not in GUIDE


def test_docs_describe_no_data_and_the_doctor() -> None:
    for text in ("no_data", "gateway_query_has_data", "metrics-gateway doctor", "--json"):
        assert text in CATALOG_DOC, text
    assert "metrics-gateway doctor" in README and "no_data" in README
    assert 'status="active"' in README and 'status="active"' in CATALOG_DOC
