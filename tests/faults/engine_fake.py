"""The fault suite's fake Prometheus with what the engine probes need on top.

`FakePrometheus` (tests/faults/fake_upstream.py) answers every query alike. The
probes of issue 12 need three more things, added here without changing it:

- ``big_series``: when > 0, one figure of each request (the first whose expression
  contains ``big_expr``; a single query, or one part of a batch) answers that many
  series, each with its own ``provider`` and ``model`` (the backend's real labels),
  the way a high-cardinality figure does; the body is built once per size and
  reused, so the fake is not the bottleneck;
- ``ready_delay``: the readiness probe's query (``vector(1)``) waits this long,
  every other query answers at once, so a slow probe cannot hide behind slow figures;
- counters of what was asked: ``ready_probes`` (``vector(1)`` requests) and
  ``figure_requests`` (everything else).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

from tests.faults.conftest import gateway_env
from tests.faults.fake_upstream import FakePrometheus

READY_QUERY = "vector(1)"
METRIC = "model_inference_requests_total"
PART = re.compile(r'label_replace\((.*?), "gateway_query", "(\d+)", "", ""\)')


def engine_env(prometheus_url: str, **extra: str) -> dict[str, str]:
    """The fault suite's gateway environment. ``GATEWAY_PYTHONPATH`` runs the gateway process
    from another checkout (e.g. ``git archive <base> app``) to see a probe fail on the old code."""
    env = gateway_env(prometheus_url, **extra)
    if os.environ.get("GATEWAY_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["GATEWAY_PYTHONPATH"]
    return env


def parts_of(query: str) -> list[tuple[str, str | None]]:
    """(expression, batch index) of each figure a request asks for."""
    found = [(m.group(1), m.group(2)) for m in PART.finditer(query)]
    return found or [(query, None)]


def big_result(n: int) -> str:
    """`n` series as the JSON text of a vector result's elements (no brackets), ~150 bytes each."""
    return ",".join(
        f'{{"metric":{{"__name__":"{METRIC}","provider":"provider-{i % 997}","model":"model-{i}",'
        f'"instance":"backend-{i % 7}:8000","job":"gatewayz"}},"value":[1700000000.123,"{i % 100}"]}}'
        for i in range(n)
    )


class EngineFake(FakePrometheus):
    def __init__(self) -> None:
        super().__init__()
        self.big_series = 0
        self.big_expr = ""
        self.ready_delay = 0.0
        self.ready_probes = 0
        self.figure_requests = 0
        self._big: dict[tuple[int, str | None], str] = {}

    def body_for(self, query: str, extra: dict[str, Any] | None = None) -> bytes:
        """The vector answer for `query`: one part big when asked, every other part one series."""
        parts = parts_of(query)
        big_at = next((i for i, (expr, _) in enumerate(parts) if self.big_expr in expr), None)
        items = []
        for i, (_, part) in enumerate(parts):
            if self.big_series and i == big_at:
                items.append(self.big_items(part))
                continue
            metric = {"gateway_query": part} if part is not None else {}
            items.append(json.dumps({"metric": metric, "value": [1.7e9, self.value]}))
        tail = "".join(f',"{k}":{json.dumps(v)}' for k, v in (extra or {}).items())
        return ('{"status":"success","data":{"resultType":"vector","result":[' + ",".join(items)
                + "]}" + tail + "}").encode()

    def big_items(self, part: str | None) -> str:
        key = (self.big_series, part)
        big = self._big.get(key)
        if big is None:
            big = big_result(self.big_series)
            if part is not None:  # tag every big series with the batch part it answers
                big = big.replace('"job":"gatewayz"}', f'"job":"gatewayz","gateway_query":"{part}"}}')
            self._big[key] = big
        return big

    async def _answer(self, mode: str, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bool:
        query = self.last_form.get("query", "")  # read before any await: another request may overwrite it
        if query == READY_QUERY:
            self.ready_probes += 1
            if self.ready_delay:
                await asyncio.sleep(self.ready_delay)
            await self._send(writer, 200, self.body_for(query))
            return True
        self.figure_requests += 1
        if mode == "ok":
            await self._send(writer, 200, self.body_for(query))
            return True
        if mode == "warnings":
            await self._send(writer, 200, self.body_for(query, {"warnings": ["fake warning: partial data"]}))
            return True
        return await super()._answer(mode, writer, reader)
