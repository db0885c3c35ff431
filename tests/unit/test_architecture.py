"""docs/architecture.md is true to the code: every module has its row, and the
gateway's wings stand on each other without cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
DOC = (ROOT / "docs" / "architecture.md").read_text()
GATEWAY = APP / "gateway"


def _table_paths() -> set[str]:
    rows = [line for line in DOC.splitlines() if line.startswith("| `app/")]
    return {p for row in rows for p in re.findall(r"`(app/[^`]*)`", row.split(" | ")[0])}


def _defines_something(init: Path) -> bool:
    tree = ast.parse(init.read_text())
    return any(not isinstance(s, ast.Import | ast.ImportFrom | ast.Expr) for s in tree.body
               if not (isinstance(s, ast.Assign) and all(
                   isinstance(t, ast.Name) and t.id == "__all__" for t in s.targets)))


def test_every_module_under_app_has_a_row_in_the_table_of_rooms() -> None:
    listed = _table_paths()
    assert listed, "no table of rooms found in docs/architecture.md"
    missing = []
    for path in sorted(APP.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py":
            folder = rel.removesuffix("__init__.py")
            if _defines_something(path) and folder not in listed:
                missing.append(folder)
        elif rel not in listed:
            missing.append(rel)
    assert not missing, f"modules missing from docs/architecture.md's table: {missing}"
    stale = [p for p in listed if not (ROOT / p).exists()]
    assert not stale, f"rows for modules that do not exist: {stale}"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_common_core_imports_no_feature() -> None:
    for path in (APP / "common").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("app.") and not m.startswith("app.common")}
        assert not bad, (path, bad)


def _node(module: str) -> str | None:
    """The gateway node a module belongs to: its wing (a subpackage) or its top-level file."""
    parts = module.split(".")
    if parts[:2] != ["app", "gateway"] or len(parts) < 3:
        return None
    if (GATEWAY / parts[2]).is_dir() or (GATEWAY / f"{parts[2]}.py").exists():
        return parts[2]
    return None


def _gateway_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in GATEWAY.rglob("*.py"):
        rel = path.relative_to(GATEWAY)
        if rel.as_posix() == "__init__.py":
            continue  # the package's face
        src = rel.parts[0].removesuffix(".py")
        targets = {_node(m) for m in _imports(path)}
        graph.setdefault(src, set()).update(t for t in targets if t is not None and t != src)
    return graph


def test_the_gateway_wings_have_no_cycles_and_few_floors() -> None:
    graph = _gateway_graph()
    floors: dict[str, int] = {}

    def floor(node: str, path: tuple[str, ...] = ()) -> int:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node not in floors:
            floors[node] = 1 + max((floor(t, (*path, node)) for t in graph.get(node, ())), default=0)
        return floors[node]

    for node in graph:
        floor(node)
    edges = sum(len(t) for t in graph.values())
    assert max(floors.values()) <= 9, floors
    assert edges <= 45, edges


def test_each_wing_says_what_it_may_import() -> None:
    for init in GATEWAY.glob("*/__init__.py"):
        doc = (ast.get_docstring(ast.parse(init.read_text())) or "").lower()
        assert "may import" in doc, f"{init.parent.name}/ has no docstring saying what it may import"
        allowed = set(re.findall(r"[a-z_]+", doc.split("may import", 1)[1]))
        used = _gateway_graph().get(init.parent.name, set())
        assert used <= allowed, f"{init.parent.name}/ imports {sorted(used - allowed)}, not allowed by its docstring"
