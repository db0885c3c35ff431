"""Shared pytest set-up: quiet httpx logs; the repo root on sys.path for tests.support."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logging.getLogger("httpx").setLevel(logging.WARNING)

# respx's default mocker patches httpcore's pools, which the gateway's upstream client does
# not use (app/gateway/upstream/transport.py): this one patches its transport as well.
import respx.mocks  # noqa: E402

from tests.support.respx_lean import LeanAndHttpcoreMocker  # noqa: E402

respx.mocks.DEFAULT_MOCKER = LeanAndHttpcoreMocker.name


# -- one Redis for the tests that only need a store --------------------------------------
# Session-scoped: one redis-server for the whole run; each test gets it flushed.
# Tests that stop, pause or fill Redis start their own (tests/faults, the Celery test).

import pytest  # noqa: E402

from tests.support.procs import Proc, start_redis  # noqa: E402

REAL_PROCESS_FIXTURES = frozenset({"redis_proc", "redis_server", "history_prometheus"})
pytest_plugins = ["tests.support.history"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def redis_proc(redis_server: Proc) -> Proc:
    """The session's redis-server, emptied for this test."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses a real redis-server is an integration test, wherever it lives:
    `-m "not integration"` then needs neither Redis nor promtool."""
    for item in items:
        if REAL_PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked needs_tool(...) fails when a tool is missing (tests/support/tools.py)."""
    from tests.support.tools import require

    for mark in item.iter_markers("needs_tool"):
        for name in mark.args:
            require(name)
