"""Secret files rewritten under a running gateway (app/common/secrets.py: SecretFile).

Findings: a token file rewritten in place is empty, then partial, for a moment; a
reader that adopts what it sees locks valid callers out (API_TOKENS_FILE) or sends
``Authorization: Bearer `` upstream, which the breaker then counts as the
upstream's failure (PROMETHEUS_BEARER_TOKEN_FILE).

Designed answer: the one secret-file reader never adopts an empty, missing,
changing or still-settling file; the last good value stays in force; a secret
never read is a local error (``credentials_unavailable``) with its own metric
``metrics_gateway_secret_file_errors_total{secret,reason}`` and one log line per
episode, never an upstream failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from app.common.secrets import SECRET_FILE_ERRORS, SecretFile
from app.gateway.settings import GatewaySettings
from app.main import create_app
from app.security.settings import SecuritySettings
from app.settings import AppSettings
from tests.faults.conftest import Gateway, gateway_env, metric, start_gateway, stop_gateway
from tests.support.files import rotate

KEEPER = "keeper-token-that-never-leaves-the-file-0123456789"
SETTLE = 0.2  # SecretFile's default settle time
PROTECTED = "/prometheus/-/no-such-route"  # past the token check: 404 when accepted


def _settled(path: Path) -> None:
    past = time.time_ns() - 2_000_000_000
    os.utime(path, ns=(past, past))


def _content(n: int) -> str:
    # The keeper is the LAST line: any partial read lacks it.
    return f"# rotation {n}\nrotating-token-{n:06d}\n{KEEPER}\n"


# -- the ways operators rewrite a file in place ----------------------------------------------

def in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:  # truncates, then writes
        f.write(text)


def two_step(path: Path, text: str) -> None:
    half = len(text) // 2
    with open(path, "w") as f:
        f.write(text[:half])
        f.flush()
        time.sleep(0.02)
        f.write(text[half:])


def truncate_then_write(path: Path, text: str) -> None:
    open(path, "w").close()
    time.sleep(0.02)
    with open(path, "a") as f:
        f.write(text)


def remove_then_write(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    time.sleep(0.02)
    path.write_text(text)


WRITERS: dict[str, Callable[[Path, str], None]] = {
    "in_place": in_place, "two_step": two_step, "truncate_then_write": truncate_then_write,
    "remove_then_write": remove_then_write,
}


def _app(token_file: Path):  # type: ignore[no-untyped-def]
    return create_app(AppSettings(
        gateway=GatewaySettings(prometheus_url="http://127.0.0.1:9"),
        security=SecuritySettings(api_tokens_file=token_file)))


async def _hammer(app, token: str, seconds: float, concurrency: int = 64) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """Requests with `token` from `concurrency` clients for `seconds`; count by status."""
    statuses: dict[int, int] = {}
    stop = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        async def one_client() -> None:
            while time.monotonic() < stop:
                r = await client.get(PROTECTED, headers=headers)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return statuses


@pytest.mark.parametrize("how", sorted(WRITERS))
async def test_api_tokens_file_rewritten_under_load_never_rejects_a_kept_token(
        tmp_path: Path, how: str) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(_content(0))
    _settled(token_file)
    app = _app(token_file)
    write = WRITERS[how]
    rotations = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal rotations
        while not stop.is_set():
            rotations += 1
            write(token_file, _content(rotations))
            time.sleep(0.03)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        statuses = await _hammer(app, KEEPER, 1.5)
    finally:
        stop.set()
        thread.join(5)
    assert rotations >= 20
    assert sum(statuses.values()) >= 500
    assert statuses.get(401, 0) + statuses.get(403, 0) == 0, statuses
    assert set(statuses) == {404}, statuses
    # Not vacuous: once the file settles, its newest contents are adopted.
    await asyncio.sleep(SETTLE + 0.1)
    newest = await _hammer(app, f"rotating-token-{rotations:06d}", 0.05, concurrency=1)
    assert set(newest) == {404}, newest
    older = await _hammer(app, f"rotating-token-{rotations - 1:06d}", 0.05, concurrency=1)
    assert set(older) == {403}, older


async def test_an_empty_settled_token_file_never_replaces_the_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.secrets")
    token_file = tmp_path / "tokens"
    token_file.write_text(_content(1))
    _settled(token_file)
    app = _app(token_file)
    assert set(await _hammer(app, KEEPER, 0.05, concurrency=1)) == {404}
    empty_before = SECRET_FILE_ERRORS.labels("api_tokens", "empty")._value.get()
    token_file.write_text("")
    _settled(token_file)  # an empty file that stays empty (a writer that died)
    statuses = await _hammer(app, KEEPER, 0.3, concurrency=8)
    assert set(statuses) == {404}, statuses
    assert SECRET_FILE_ERRORS.labels("api_tokens", "empty")._value.get() > empty_before
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.secrets"]
    assert len(lines) == 1 and "empty" in lines[0] and KEEPER not in lines[0], lines
    rotate(token_file, _content(2))
    assert set(await _hammer(app, KEEPER, 0.05, concurrency=1)) == {404}
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.secrets"]
    assert len(lines) == 2 and "recovered" in lines[1], lines


def test_a_partial_file_is_not_adopted_until_it_has_settled(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("complete-old-value\n")
    _settled(path)
    source = SecretFile(path, "test_partial", settle_seconds=SETTLE)
    assert source.read() == "complete-old-value"
    path.write_text("compl")  # half of the next value, just written
    assert source.read() == "complete-old-value"
    path.write_text("complete-new-value\n")
    assert source.read() == "complete-old-value"  # still settling
    time.sleep(SETTLE + 0.05)
    assert source.read() == "complete-new-value"


# -- PROMETHEUS_BEARER_TOKEN_FILE through a real gateway process -------------------------------

class _Recorder(ThreadingHTTPServer):
    """A Prometheus query API stand-in that records every Authorization header it gets."""

    daemon_threads = True

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _RecorderHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecorderHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.authorizations.append(self.headers.get("Authorization"))
        query = parse_qs(body.decode()).get("query", [""])[0]
        parts = re.findall(r'"gateway_query", "(\d+)"', query) or [None]
        result = [{"metric": {"gateway_query": p} if p is not None else {}, "value": [time.time(), "1"]}
                  for p in parts]
        out = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _bearer_gateway(tmp_path: Path, upstream: str, token_file: Path) -> Gateway:
    return start_gateway(tmp_path / "gw", gateway_env(
        upstream, PROMETHEUS_BEARER_TOKEN_FILE=str(token_file), BREAKER_FAILURE_THRESHOLD="2"))


def _secret_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "secret file upstream_bearer" in ln]


def test_bearer_file_empty_or_missing_is_a_local_error_never_an_empty_bearer(
        tmp_path: Path, recorder: _Recorder) -> None:
    token_file = tmp_path / "bearer"
    token_file.write_text("")
    _settled(token_file)
    gw = _bearer_gateway(tmp_path, recorder.url, token_file)
    try:
        mark = 0  # the whole log: the file is first read when the gateway starts
        up_before = gw.metrics().get(("metrics_gateway_upstream_up", ()))
        # Never read: every request is a local credentials error, nothing goes upstream.
        for _ in range(4):
            assert gw.client.get(gw.url + "/prometheus/metrics/summary").status_code < 500
        token_file.unlink()  # and missing
        for _ in range(4):
            assert gw.client.get(gw.url + "/prometheus/metrics/summary").status_code < 500
        assert recorder.authorizations == []
        m = gw.metrics()
        assert metric(m, "metrics_gateway_secret_file_errors_total", secret="upstream_bearer", reason="empty") > 0
        assert metric(m, "metrics_gateway_secret_file_errors_total", secret="upstream_bearer",
                      reason="missing") > 0
        assert metric(m, "metrics_gateway_circuit_breaker_state", state="open") == 0
        # Not an upstream outcome: no upstream request counted, no error, up untouched.
        assert m.get(("metrics_gateway_upstream_up", ())) == up_before
        for family in ("metrics_gateway_upstream_errors_total", "metrics_gateway_upstream_requests_total"):
            assert sum(v for (name, _), v in m.items() if name == family) == 0, family
        lines = gw.log_since(mark)
        assert len(_secret_lines(lines)) == 1, lines
        assert not [ln for ln in lines if "upstream Prometheus" in ln], lines

        # A token arrives: used at once, the episode ends.
        rotate(token_file, "first-token\n")
        assert gw.client.get(gw.url + "/prometheus/metrics/summary").status_code == 200
        assert recorder.authorizations and set(recorder.authorizations) == {"Bearer first-token"}
        assert metric(gw.metrics(), "metrics_gateway_upstream_up") == 1

        # Emptied in place, then removed: the last good token stays in use.
        seen = len(recorder.authorizations)
        token_file.write_text("")
        _settled(token_file)
        assert gw.client.get(gw.url + "/prometheus/metrics/summary").status_code == 200
        token_file.unlink()
        assert gw.client.get(gw.url + "/prometheus/metrics/summary").status_code == 200
        assert len(recorder.authorizations) > seen
        assert set(recorder.authorizations) == {"Bearer first-token"}
        m = gw.metrics()
        assert metric(m, "metrics_gateway_circuit_breaker_state", state="open") == 0
        assert metric(m, "metrics_gateway_upstream_up") == 1
        secret_lines = _secret_lines(gw.log_since(mark))
        assert len(secret_lines) == 3, secret_lines  # failing, recovered, failing again
        assert "first-token" not in "\n".join(gw.log_since(mark))
    finally:
        stop_gateway(gw)
