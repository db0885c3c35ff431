"""Tracing overhead on a warm /summary: off (the default) vs on at 100% and 1% sampling.

Side by side in one run, against one real Prometheus scraping the synthetic backend:
four uvicorn gateways of the same code, started alike except for the OTEL_* variables

- off: no OTEL_EXPORTER_OTLP_ENDPOINT (the default);
- on, 100%: exporting to a local OTLP/HTTP receiver (tests/support/otlp_receiver.py in
  counting mode: a collector would run elsewhere; the gateway's own export, batching and
  protobuf encoding in its process, is all measured);
- on, 1%: the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG=0.01;

and the strongest baseline, a trivial route (/health) of the "off" gateway. Each is
loaded with wrk (50 connections) in interleaved rounds, so drift hits all alike; the
figure is the median req/s. A warm /summary is a memoized body (app/gateway/fastpath.py),
so what is measured is exactly what tracing adds around it: the server span, its
attributes, the exemplar and the export.

Off, the request path holds three calls into app/common/tracing.py that return after one
module-global test; their cost is measured directly too (ns per request).

wrk's req/s on a 2-core machine shared with other work move a lot between runs, so the
same three configurations are also measured as CPU time per request: a fresh process per
configuration makes direct ASGI calls of a warm /summary (no server, no client) and
reads its process CPU time, export thread included (flushed before the clock stops).

Usage: .venv/bin/python benchmarks/bench_tracing.py [--rounds 3] [--seconds 8] [--markdown out.md]
Needs prometheus and wrk (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import need_wrk, wrk  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.support.procs import Proc, start_prometheus, start_uvicorn, wait_until  # noqa: E402
from tests.support.synthetic_backend import SyntheticBackend, scrape_config  # noqa: E402

SUMMARY = "/prometheus/metrics/summary"


def start_gateway(workdir: Path, prom: str, otel: dict[str, str]) -> Proc:
    env = {"PROMETHEUS_URL": prom, "CACHE_TTL_SECONDS": "3600", "LOG_LEVEL": "WARNING", **otel}
    return start_uvicorn(workdir, "app.main:create_app", env=env, factory=True)


def off_path_ns() -> float:
    """ns per request for the tracing hooks a warm /summary passes through when off."""
    from app.common import tracing

    assert not tracing.enabled()
    n = 200_000

    def hooks() -> None:
        tracing.count_lookup("memo")   # fastpath
        tracing.note({})               # security (with tokens)
        tracing.exemplar()             # HTTP metrics (skipped outright when off; timed anyway)

    return min(timeit.repeat(hooks, number=n, repeat=5)) / n * 1e9


CPU_PROBE = r"""
import asyncio, json, sys, time
from app.common import tracing
from app.main import create_app

async def main(n):
    app = create_app()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/prometheus/metrics/summary", "raw_path": b"/prometheus/metrics/summary",
             "root_path": "", "query_string": b"", "headers": [(b"host", b"bench"), (b"user-agent", b"bench")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    status = []
    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
    life = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                     _startup(), _ignore))
    await asyncio.sleep(0.5)
    for _ in range(200):
        await app(dict(scope), receive, send)
    assert status[-1] == 200, status[-5:]
    t0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    if tracing._provider is not None:
        tracing._provider.force_flush()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    life.cancel()
    print(json.dumps({"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6}))

def _startup():
    sent = []
    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "lifespan.startup"}
        await asyncio.sleep(3600)
    return receive

async def _ignore(message):
    pass

asyncio.run(main(int(sys.argv[1])))
"""


def cpu_per_request(prom: str, otel: dict[str, str], n: int) -> dict[str, float]:
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({"PROMETHEUS_URL": prom, "CACHE_TTL_SECONDS": "3600", "RESPONSE_MEMO_SECONDS": "5",
                "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT), **otel})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run([sys.executable, "-c", CPU_PROBE, str(n)], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8, help="wrk duration per run")
    ap.add_argument("--requests", type=int, default=20000, help="direct ASGI calls per CPU measurement")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    need_wrk()
    receiver = OtlpReceiver(keep=False).start()
    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    procs: list[Proc] = []
    backend = SyntheticBackend()
    target = backend.start()
    try:
        prom = start_prometheus(work / "prom", scrape_config(target))
        procs.append(prom)
        wait_until(lambda: httpx.post(f"{prom.url}/api/v1/query", data={"query": 'up{job="backend"}'}
                                      ).json()["data"]["result"], 30, what="a scrape")
        on = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        configs = {
            "off": {},
            "on, 100%": {**on, "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
            "on, 1%": {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        }
        gateways = {name: start_gateway(work / f"gw{i}", prom.url, env)
                    for i, (name, env) in enumerate(configs.items())}
        procs.extend(gateways.values())
        for gw in gateways.values():  # cold once, then warm
            httpx.get(f"{gw.url}{SUMMARY}", timeout=10).raise_for_status()
        results: dict[str, list[float]] = {"trivial": [], **{k: [] for k in configs}}
        exported: dict[str, int] = dict.fromkeys(configs, 0)
        for _ in range(args.rounds):
            results["trivial"].append(wrk(f"{gateways['off'].url}/health", 50, args.seconds))
            for name, gw in gateways.items():
                before = receiver.bytes
                results[name].append(wrk(f"{gw.url}{SUMMARY}", 50, args.seconds))
                exported[name] += receiver.bytes - before  # (export lags a little: counted roughly)
        ns = off_path_ns()
        cpu: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for name, env in configs.items():
                cpu[name].append(cpu_per_request(prom.url, env, args.requests)["cpu_us"])
    finally:
        for p in reversed(procs):
            p.stop()
        receiver.stop()
        backend.stop()

    med = {k: statistics.median(v) for k, v in results.items()}
    off = med["off"]
    rows = [
        "| warm /summary, uvicorn (1 process), wrk 50 connections, median of "
        f"{args.rounds} interleaved {args.seconds} s runs | req/s | vs tracing off | vs trivial route |",
        "| --- | --- | --- | --- |",
        f"| trivial route (/health, tracing off) | {med['trivial']:.0f} | | 1.00 |",
    ]
    for name in configs:
        rows.append(f"| /summary, tracing {name} | {med[name]:.0f} | {med[name] / off:.2f} | "
                    f"{med[name] / med['trivial']:.2f} |")
    rows.append(f"| tracing hooks on the request path when off | {ns:.0f} ns per request | "
                f"{ns / 1e9 * off * 100:.3f}% of a request at the off rate | |")
    rows.append(f"| OTLP bytes received during the runs (100% / 1% / off) | {exported['on, 100%']} / "
                f"{exported['on, 1%']} / {exported['off']} | | |")
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    rows += [
        "",
        f"| warm /summary, direct ASGI calls ({args.requests} per run, median of {args.rounds}) | CPU per request "
        "(export thread included) | vs tracing off |",
        "| --- | --- | --- |",
    ]
    for name in configs:
        rows.append(f"| tracing {name} | {cmed[name]:.1f} us | {cmed[name] / cmed['off']:.2f} |")
    table = "\n".join(rows)
    print(table)
    print("raw:", {k: [round(x) for x in v] for k, v in results.items()}, {k: [round(x, 1) for x in v]
                                                                         for k, v in cpu.items()})
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
