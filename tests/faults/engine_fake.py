"""The fault suite's fake Prometheus with what the engine probes need on top.

`FakePrometheus` (tests/faults/fake_upstream.py) answers every query alike. The
probes of issue 12 need three more things, added here without changing it:

- ``big_series``: when > 0, the first figure of each request (a single query or
  part 0 of a batch) answers that many series, each with its own ``provider`` and
  ``model`` (the backend's real labels), the way a high-cardinality figure does;
  the body is built once per size and reused, so the fake is not the bottleneck;
- ``ready_delay``: the readiness probe's query (``vector(1)``) waits this long,
  every other query answers at once, so a slow probe cannot hide behind slow figures;
- counters of what was asked: ``ready_probes`` (``vector(1)`` requests) and
  ``figure_requests`` (everything else).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.faults.fake_upstream import BATCH, FakePrometheus

READY_QUERY = "vector(1)"
METRIC = "gatewayz_model_inference_requests_total"


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
        self.ready_delay = 0.0
        self.ready_probes = 0
        self.figure_requests = 0
        self._big: dict[int, str] = {}

    def body_for(self, query: str, extra: dict[str, Any] | None = None) -> bytes:
        """The vector answer for `query`: part 0 big when asked, the other parts one series."""
        parts = BATCH.findall(query) or [None]
        small = []
        for part in parts[1:] if self.big_series else parts:
            metric = {"gateway_query": part} if part is not None else {}
            small.append(json.dumps({"metric": metric, "value": [1.7e9, self.value]}))
        items = small
        if self.big_series:
            big = self._big.get(self.big_series)
            if big is None:
                big = self._big[self.big_series] = big_result(self.big_series)
            if parts[0] is not None:  # tag every big series with the batch part it answers
                big = big.replace('"job":"gatewayz"}', f'"job":"gatewayz","gateway_query":"{parts[0]}"}}')
            items = [big, *small]
        tail = "".join(f',"{k}":{json.dumps(v)}' for k, v in (extra or {}).items())
        return ('{"status":"success","data":{"resultType":"vector","result":[' + ",".join(items)
                + "]}" + tail + "}").encode()

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
