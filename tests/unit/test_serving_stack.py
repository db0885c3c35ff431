"""The serving stack's dependencies: uvloop and httptools (uvicorn[standard]) and hiredis
are installed with the package and checked by the image build."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dependencies_bring_uvloop_httptools_and_hiredis() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("uvicorn[standard]") for d in deps)
    assert any(d.replace(" ", "").startswith("redis[hiredis]") for d in deps)
    for module in ("uvloop", "httptools", "hiredis"):
        assert importlib.util.find_spec(module) is not None, module
    assert "import uvloop, httptools" in (ROOT / "Dockerfile").read_text()  # the image build checks it
