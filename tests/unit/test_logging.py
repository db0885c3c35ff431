"""Process logging (app/ops/logs.py), in a fresh interpreter each time: the configuration
is process-wide, so a subprocess sees exactly what a started gateway would.

- httpx/httpcore write one INFO line per request; at LOG_LEVEL=INFO they stay quiet
  (they would drown the one-line-per-episode messages), WARNING from them still shows.
- LOG_FORMAT=json: one JSON object per line (ts, level, logger, message, exc).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, logging
import httpx
from app.main import create_app
create_app()  # reads LOG_LEVEL / LOG_FORMAT once, as the server does

async def main():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"status": "success"}))
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(5):
            await client.post("http://prometheus.test/api/v1/query", data={"query": "up"})

asyncio.run(main())
logging.getLogger("gateway.test").info("one episode line")
logging.getLogger("httpx").warning("an httpx warning still shows")
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("gateway.test").exception("with a traceback")
"""


def _run(**env: str) -> list[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "PROMETHEUS_URL": "http://127.0.0.1:9", **env}
    full.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=full,
                         timeout=60, check=True)
    return [ln for ln in out.stderr.splitlines() if ln.strip()]


def test_httpx_request_lines_are_off_at_info() -> None:
    lines = _run(LOG_LEVEL="INFO", LOG_FORMAT="text")
    assert any("one episode line" in ln for ln in lines), lines
    assert not [ln for ln in lines if "HTTP Request:" in ln], lines
    assert any("an httpx warning still shows" in ln for ln in lines), lines


def test_json_log_format_one_object_per_line() -> None:
    lines = _run(LOG_LEVEL="INFO", LOG_FORMAT="json")
    # Every line is one JSON object (a traceback is inside its object, not on lines of its own).
    docs = [json.loads(ln) for ln in lines]
    episode = next(d for d in docs if d["message"] == "one episode line")
    assert set(episode) == {"ts", "level", "logger", "message"}
    assert episode["level"] == "INFO" and episode["logger"] == "gateway.test"
    assert episode["ts"].endswith("Z")
    failed = next(d for d in docs if d["message"] == "with a traceback")
    assert "ValueError: boom" in failed["exc"]
    assert not [d for d in docs if "HTTP Request:" in d["message"]]
