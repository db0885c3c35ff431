"""Noisy neighbour (issue 20): one client's week-long range queries vs everybody else.

A real Prometheus holding a week of GatewayZ-shaped history (benchmarks/dataset.py:
580 series at 60 s). In one run, side by side:

1. quiet: client B sends small uncached instant queries one after another, a widget
   polls /prometheus/metrics/summary; B's p90 alone;
2. flood: the same, while client A keeps FLOOD concurrent week-long range queries in
   flight for SECONDS (each answer megabytes; a 429 is honoured by waiting its
   Retry-After); B's p90, the widget's worst, A's outcomes and completions;
3. the same flood and B straight at Prometheus (the reference: what Prometheus alone
   gives both clients);

through the gateway under uvicorn (one process) and under the production gunicorn config
(2 workers). Targets: B's flood p90 within 3x of its quiet p90; /summary never degraded
(status ok, answered within the deadline); A never gets a 5xx; A's completions at least
0.8x Prometheus' own under the same flood.

Usage: .venv/bin/python benchmarks/bench_noisy_neighbour.py [--seconds 20] [--flood 40] [--markdown out.md]
Needs prometheus and promtool (Debian packages); the dataset is built once and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.dataset import Dataset, ensure  # noqa: E402
from tests.support.history import start_prometheus_on  # noqa: E402
from tests.support.procs import start_gunicorn, start_uvicorn  # noqa: E402

WEEK = 7 * 86400
RANGE_STEP = 1200      # A's resolution: ~505 points per series
A_QUERY = 'last_over_time({__name__=~".+"}[1h])'  # every series, names kept
B_QUERY = "sum by (provider) (rate(model_inference_requests_total[5m]))"
TOKENS = {"tok-a": {"name": "a"}, "tok-b": {"name": "b"}, "tok-widget": {"name": "widget"}}


# --- the dataset: the shared week of GatewayZ-shaped history (benchmarks/dataset.py) ---------------

def week_dataset() -> Dataset:
    return ensure(7, 580)


DATASET = week_dataset
HISTORY_END = 0.0  # set from the dataset: every query reads inside its week


# --- load ---------------------------------------------------------------------------------------------

@dataclass
class Phase:
    b_ms: list[float] = field(default_factory=list)
    b_status: Counter[int] = field(default_factory=Counter)
    b_errors: dict[str, str] = field(default_factory=dict)  # one body per failing status
    b_upstream_ms: list[float] = field(default_factory=list)  # Server-Timing: upstream share
    widget_ms: list[float] = field(default_factory=list)
    widget_status: Counter[str] = field(default_factory=Counter)
    a_status: Counter[int] = field(default_factory=Counter)
    a_completed: int = 0
    a_bytes: int = 0
    a_errors: dict[str, str] = field(default_factory=dict)  # one body per failing status
    seconds: float = 0.0

    def p90(self, values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1] if len(values) >= 10 else max(values, default=0.0)


async def b_loop(c: httpx.AsyncClient, phase: Phase, until: float, headers: dict[str, str]) -> None:
    i = 0
    while time.monotonic() < until:
        i += 1
        # A distinct evaluation time each time: never a cached answer.
        t = f"{HISTORY_END - i * 0.001:.3f}"
        t0 = time.perf_counter()
        r = await c.get("/api/v1/query", params={"query": B_QUERY, "time": t}, headers=headers)
        phase.b_ms.append((time.perf_counter() - t0) * 1000)
        phase.b_status[r.status_code] += 1
        if r.status_code != 200:
            phase.b_errors.setdefault(str(r.status_code), r.text[:300])
        timing = dict(p.split(";dur=") for p in r.headers.get("server-timing", "").split(", ") if ";dur=" in p)
        if "upstream" in timing:
            phase.b_upstream_ms.append(float(timing["upstream"]))
        await asyncio.sleep(0.05)


async def widget_loop(c: httpx.AsyncClient, phase: Phase, until: float) -> None:
    while time.monotonic() < until:
        t0 = time.perf_counter()
        r = await c.get("/prometheus/metrics/summary", headers={"Authorization": "Bearer tok-widget"})
        phase.widget_ms.append((time.perf_counter() - t0) * 1000)
        status = r.json().get("status", "?") if r.status_code == 200 else f"http {r.status_code}"
        phase.widget_status[status] += 1
        await asyncio.sleep(0.5)


async def a_loop(c: httpx.AsyncClient, phase: Phase, until: float, k: int, headers: dict[str, str]) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        end = HISTORY_END - (k * 97 + n) % 1200  # distinct ranges: no two share a cache entry
        params = {"query": A_QUERY, "start": f"{end - WEEK:.0f}", "end": f"{end:.0f}", "step": str(RANGE_STEP)}
        try:
            r = await c.get("/api/v1/query_range", params=params, headers=headers, timeout=30)
        except httpx.HTTPError:
            phase.a_status[-1] += 1
            continue
        phase.a_status[r.status_code] += 1
        if r.status_code == 200:
            phase.a_completed += 1
            phase.a_bytes = max(phase.a_bytes, len(r.content))
        elif r.status_code == 429:
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        else:
            phase.a_errors.setdefault(str(r.status_code), r.text[:300])


async def flood_of_a(url: str, seconds: float, flood: int, bearer: bool) -> Phase:
    """Client A alone (run in a process of its own, so that reading its megabytes does not
    slow the process that times B)."""
    phase = Phase()
    limits = httpx.Limits(max_connections=flood, max_keepalive_connections=flood)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        until = time.monotonic() + seconds
        a_headers = {"Authorization": "Bearer tok-a"} if bearer else {}
        t0 = time.monotonic()
        await asyncio.gather(*(a_loop(c, phase, until, k, a_headers) for k in range(flood)))
        phase.seconds = time.monotonic() - t0
    return phase


async def run_phase(url: str, seconds: float, flood: int, *, widget: bool, bearer: bool) -> Phase:
    phase = Phase()
    a_proc = None
    if flood:
        a_proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--a-only", url, "--seconds", str(seconds), "--flood", str(flood),
            "--history-end", str(HISTORY_END), *(["--bearer"] if bearer else []),
            stdout=asyncio.subprocess.PIPE)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        until = time.monotonic() + seconds
        tasks = [b_loop(c, phase, until, {"Authorization": "Bearer tok-b"} if bearer else {})]
        if widget:
            tasks.append(widget_loop(c, phase, until))
        await asyncio.gather(*tasks)
    if a_proc is not None:
        out, _ = await a_proc.communicate()
        a = json.loads(out)
        phase.a_status = Counter({int(k): v for k, v in a["a_status"].items()})
        phase.a_completed, phase.a_bytes, phase.seconds = a["a_completed"], a["a_bytes"], a["seconds"]
        phase.a_errors = a["a_errors"]
    return phase


# --- the run -------------------------------------------------------------------------------------------

def gateway_env(prom_url: str, multiproc: Path) -> dict[str, str]:
    return {"PROMETHEUS_URL": prom_url, "API_TOKENS": json.dumps(TOKENS), "LOG_LEVEL": "WARNING",
            "REQUEST_DEADLINE_SECONDS": os.environ.get("BENCH_DEADLINE", "10"),
            **{k: v for k, v in os.environ.items() if k.startswith(("CLIENT_", "API_", "RANGE_CACHE_"))},
            "PROMETHEUS_MAX_RESPONSE_BYTES": str(64 * 1024 * 1024),
            "REDIS_URL": "redis://127.0.0.1:1/0", "GATEWAY_CACHE_URL": "off",
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}


def row(name: str, quiet: Phase, flood: Phase) -> dict[str, Any]:
    return {
        "target": name,
        "b_quiet_p90_ms": round(quiet.p90(quiet.b_ms), 1),
        "b_flood_p90_ms": round(flood.p90(flood.b_ms), 1),
        "b_ratio": round(flood.p90(flood.b_ms) / max(quiet.p90(quiet.b_ms), 1e-9), 2),
        "b_flood_upstream_p90_ms": round(flood.p90(flood.b_upstream_ms), 1) if flood.b_upstream_ms else None,
        "b_non_200": sum(v for k, v in flood.b_status.items() if k != 200),
        "b_errors": flood.b_errors,
        "widget_worst_ms": round(max(flood.widget_ms, default=0.0), 1),
        "widget_status": dict(flood.widget_status),
        "a_completed": flood.a_completed,
        "a_per_s": round(flood.a_completed / max(flood.seconds, 1e-9), 2),
        "a_status": {str(k): v for k, v in sorted(flood.a_status.items())},
        "a_answer_bytes": flood.a_bytes,
        "a_errors": flood.a_errors,
    }


def measure(url: str, args: argparse.Namespace, *, gateway: bool) -> dict[str, Any]:
    quiet = asyncio.run(run_phase(url, args.quiet, 0, widget=gateway, bearer=gateway))
    flood = asyncio.run(run_phase(url, args.seconds, args.flood, widget=gateway, bearer=gateway))
    return {"quiet": quiet, "flood": flood}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--quiet", type=float, default=10.0)
    ap.add_argument("--flood", type=int, default=40)
    ap.add_argument("--servers", default="prometheus,uvicorn,gunicorn")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--a-only", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--history-end", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--bearer", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.a_only:
        global HISTORY_END
        HISTORY_END = args.history_end
        a = asyncio.run(flood_of_a(args.a_only, args.seconds, args.flood, args.bearer))
        print(json.dumps({"a_status": {str(k): v for k, v in a.a_status.items()}, "a_completed": a.a_completed,
                          "a_bytes": a.a_bytes, "seconds": a.seconds, "a_errors": a.a_errors}))
        return

    t0 = time.monotonic()
    ds = DATASET()
    HISTORY_END = min(float(ds.end), time.time() - 60)
    print(f"dataset ready in {time.monotonic() - t0:.0f}s: {ds.path}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="noisy-"))
    prom = start_prometheus_on(ds, work / "prometheus")
    results: dict[str, dict[str, Any]] = {}
    try:
        probe = httpx.get(f"{prom.url}/api/v1/query", params={
            "query": 'count(last_over_time({__name__=~".+"}[1h]))', "time": HISTORY_END}).json()
        series = int(probe["data"]["result"][0]["value"][1])
        end = HISTORY_END
        t1 = time.perf_counter()
        one = httpx.get(f"{prom.url}/api/v1/query_range", timeout=60, params={
            "query": A_QUERY, "start": end - WEEK, "end": end, "step": RANGE_STEP})
        print(f"{series} series; one week-long answer: {len(one.content)} bytes in "
              f"{time.perf_counter() - t1:.2f}s straight from Prometheus", flush=True)
        for server in args.servers.split(","):
            if server == "prometheus":
                results[server] = measure(prom.url, args, gateway=False)
            else:
                multiproc = work / f"mp-{server}"
                multiproc.mkdir()
                env = gateway_env(prom.url, multiproc)
                proc = (start_uvicorn(work / server, "app.main:create_app", env, factory=True) if server == "uvicorn"
                        else start_gunicorn(work / server, "app.main:app", env, workers=2))
                try:
                    results[server] = measure(proc.url, args, gateway=True)
                finally:
                    proc.stop()
            r = row(server, results[server]["quiet"], results[server]["flood"])
            print(json.dumps(r), flush=True)
    finally:
        prom.stop()
    rows = [row(k, v["quiet"], v["flood"]) for k, v in results.items()]
    report(rows, series, len(one.content), args)


def report(rows: list[dict[str, Any]], series: int, answer_bytes: int, args: argparse.Namespace) -> None:
    ref = next((r for r in rows if r["target"] == "prometheus"), None)
    lines = [
        f"Noisy neighbour: {args.flood} concurrent week-long range queries from client A for {args.seconds:.0f} s "
        f"(`{A_QUERY}`, step {RANGE_STEP} s, {series} series, {answer_bytes / 1e6:.1f} MB per answer), client B's "
        f"small uncached instant queries one after another (`{B_QUERY}`, a new evaluation time each), a widget "
        "polling `/prometheus/metrics/summary` every 0.5 s (gateway only); quiet phase: B (and the widget) alone "
        f"for {args.quiet:.0f} s.",
        "",
        "| target | B p90 quiet (ms) | B p90 flood (ms) | ratio (target <= 3) | of which upstream (ms) | B non-200 "
        "| /summary worst (ms) | /summary status | A completed | A/s | A vs Prometheus (target >= 0.8) "
        "| A statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = "—" if ref is None or r is ref else f"{r['a_per_s'] / max(ref['a_per_s'], 1e-9):.2f}"
        upstream = "—" if r["b_flood_upstream_p90_ms"] is None else r["b_flood_upstream_p90_ms"]
        widget = r["widget_worst_ms"] if r["target"] != "prometheus" else "—"
        lines.append(f"| {r['target']} | {r['b_quiet_p90_ms']} | {r['b_flood_p90_ms']} | {r['b_ratio']} | "
                     f"{upstream} | {r['b_non_200']} | {widget} | "
                     f"{r['widget_status'] or '—'} | {r['a_completed']} | {r['a_per_s']} | {vs} | {r['a_status']} |")
    errors = {f"{r['target']} {status}": body for r in rows for status, body in r["a_errors"].items()}
    if errors:
        lines += ["", "A's failures, one body each:", ""]
        lines += [f"- {k}: `{v}`" for k, v in errors.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
