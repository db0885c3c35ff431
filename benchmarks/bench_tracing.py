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

Usage: .venv/bin/python benchmarks/bench_tracing.py [--rounds 3] [--seconds 8] [--markdown out.md]
Needs prometheus and wrk (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gateway import wrk  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8, help="wrk duration per run")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    backend = SyntheticBackend()
    target = backend.start()
    procs: list[Proc] = []
    receiver = OtlpReceiver(keep=False).start()
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
    table = "\n".join(rows)
    print(table)
    print("raw:", {k: [round(x) for x in v] for k, v in results.items()})
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
