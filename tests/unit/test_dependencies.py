"""The environment is the lock: what CI tested is what a fresh machine installs (issue 18)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import tools

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "uv" / "bin" / "uv"


def _lock() -> dict[str, str]:
    with open(ROOT / "uv.lock", "rb") as f:
        return {canonicalize_name(p["name"]): p["version"] for p in tomllib.load(f)["package"]}


def _direct() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_direct_dependency_is_installed_at_its_locked_version() -> None:
    locked = _lock()
    wrong = {}
    for req in _direct():
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} is in pyproject.toml but not in uv.lock: run uv lock"
        installed = metadata.version(req.name)
        if installed != locked[name]:
            wrong[name] = (installed, locked[name])
    assert not wrong, f"installed != locked (run scripts/setup): {wrong}"


def test_locked_versions_satisfy_the_ranges_kept_for_embedders() -> None:
    locked = _lock()
    for req in _direct():
        assert req.specifier.contains(locked[canonicalize_name(req.name)], prereleases=True), req


def _uv() -> str:
    if not UV.exists():
        pytest.fail("uv is not installed in .tools/uv: run scripts/setup", pytrace=False)
    return str(UV)


def test_lock_check_fails_when_pyproject_changes(tmp_path: Path) -> None:
    """The check scripts/test runs (`uv lock --check`) passes on the repo and fails on a drift."""
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1"}
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    ok = subprocess.run([_uv(), "lock", "--check"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr.decode()
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('"fastapi>=0.110"', '"fastapi>=0.110,<0.111"'))
    drift = subprocess.run([_uv(), "lock", "--check"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert drift.returncode != 0


def test_scripts_install_and_check_the_lock() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert re.search(r'sync --frozen --extra dev', setup)
    assert "--require-hashes" in setup and "scripts/requirements/uv.txt" in setup
    assert re.search(r"^uv==[0-9.]+ \\$", (ROOT / "scripts/requirements/uv.txt").read_text(), re.M)
    assert "--hash=sha256:" in (ROOT / "scripts/requirements/uv.txt").read_text()
    test = (ROOT / "scripts" / "test").read_text()
    assert "lock --check" in test and " -rs " in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup" in ci and "scripts/test" in ci and tools.OPT_OUT not in ci


def test_dockerfile_installs_from_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    assert "uv.lock" in copied
    install = text[text.index("uv.lock"):]
    assert "uv export --frozen" in install
    assert re.search(r"pip install [^\n]*--require-hashes[^\n]*-r /tmp/requirements.txt", install)
    # the package itself adds nothing unlocked
    assert re.search(r"pip install [^\n]*--no-deps \.", install)


def test_a_missing_tool_fails_and_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tools.PACKAGES, "no-such-tool-xyz", "some-debian-package")
    monkeypatch.delenv(tools.OPT_OUT, raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install some-debian-package"):
        tools.require("no-such-tool-xyz")
    monkeypatch.setenv(tools.OPT_OUT, "1")
    with pytest.raises(pytest.skip.Exception, match="ALLOW_MISSING_TOOLS=1"):
        tools.require("no-such-tool-xyz")


def test_every_tool_the_tests_start_is_declared() -> None:
    """Each outside binary the support code starts goes through tools (and names its package)."""
    support = "\n".join(p.read_text() for p in (ROOT / "tests" / "support").glob("*.py"))
    for name in ("prometheus", "promtool", "redis-server", "victoria-metrics"):
        assert f'path_of("{name}")' in support, name
        assert name in tools.PACKAGES
