"""The API is served on uvloop and httptools (uvicorn[standard]) as installed: the
gunicorn worker class asks for "auto", which picks them only when they are there."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from uvicorn.config import Config

ROOT = Path(__file__).resolve().parents[2]


def test_dependencies_bring_uvloop_httptools_and_hiredis() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("uvicorn[standard]") for d in deps)
    assert any(d.replace(" ", "").startswith("redis[hiredis]") for d in deps)
    for module in ("uvloop", "httptools", "hiredis"):
        assert importlib.util.find_spec(module) is not None, module
    assert "import uvloop, httptools" in (ROOT / "Dockerfile").read_text()  # the image build checks it


def test_the_gunicorn_worker_runs_on_uvloop_and_httptools() -> None:
    # (gunicorn.conf.py is not executed here: it sets PROMETHEUS_MULTIPROC_DIR.)
    assert '"uvicorn_worker.UvicornWorker"' in (ROOT / "gunicorn.conf.py").read_text()
    from uvicorn_worker import UvicornWorker

    config = Config(app="benchmarks.bare_app:app", **UvicornWorker.CONFIG_KWARGS)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    assert config.get_loop_factory().__module__.startswith("uvloop")  # type: ignore[union-attr]
