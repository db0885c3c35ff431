"""The outside tools the tests start, and what happens when one is missing.

A test that needs a tool which is not installed FAILS with the Debian package to install: a green
run on a machine without promtool or chromium must not mean those tests passed. Only a run that
opts out explicitly (ALLOW_MISSING_TOOLS=1; .ci/run never sets it) skips them instead, and
scripts/test's summary (-rs) lists every such skip with its reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# tool -> the Debian package that ships it
PACKAGES: dict[str, str] = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "victoria-metrics": "victoria-metrics",
    "chromium": "chromium",
    "openssl": "openssl",
}
OPT_OUT = "ALLOW_MISSING_TOOLS"


def find(name: str) -> str | None:
    """The tool's path, or None."""
    found = shutil.which(name)
    if found:
        return found
    fallback = Path("/usr/bin") / name
    return str(fallback) if fallback.exists() else None


def path_of(name: str) -> str:
    """The tool's path where installed, else its name (require() says what to install)."""
    return find(name) or name


def require(name: str) -> str:
    """The tool's path; fails the calling test (or skips it, only under ALLOW_MISSING_TOOLS=1)."""
    found = find(name)
    if found:
        return found
    package = PACKAGES.get(name, name)
    message = f"{name} is not installed: apt-get install {package} (or scripts/setup as root)"
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{message}; skipped because {OPT_OUT}=1")
    pytest.fail(f"{message}. Set {OPT_OUT}=1 to skip such tests instead.", pytrace=False)
    raise AssertionError("unreachable")  # pytest.fail raises


def needs(*names: str) -> pytest.MarkDecorator:
    """Marks a test (or module, via pytestmark) as needing these tools; checked in conftest."""
    return pytest.mark.needs_tool(*names)
