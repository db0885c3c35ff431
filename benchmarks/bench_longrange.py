"""Week-long panels through the range cache against a real Prometheus holding a week.

A real Prometheus serves the generated GatewayZ-shaped week (benchmarks/dataset.py:
7 days, ~580 series, 60 s resolution, cached between runs); the gateway runs as a
real server (uvicorn, one process) in front of it. Three week-long panels as Grafana
sends them (range aligned to the step), measured side by side in one run, each request
timed by curl asking as Grafana's Go client does (gzip accepted), so the times are the
servers' and not a Python client's reading of megabytes:

- Prometheus' own time for the panel (median of --rounds direct requests);
- cold: the first request to a fresh gateway process (one process per round);
- next refresh: the same panel one step later, on the process that answered cold;
- identical request: the cold request again;
- every gateway answer compared with Prometheus' answer to the same request (bytes of
  `data`); the range cache's bytes after each panel (memory per cached panel).

Then 20 one-hour panels (step 15 s) opened by 25 viewers at once on a fresh process:
upstream range queries (Prometheus' own prometheus_http_requests_total).

Usage: .venv/bin/python benchmarks/bench_longrange.py [--rounds 5] [--days 7] [--series 580] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.gateway.engines.splitting import part_len, split  # noqa: E402
from benchmarks.bench_dashboard import range_requests  # noqa: E402
from benchmarks.dataset import ensure  # noqa: E402
from tests.support.history import start_prometheus_on  # noqa: E402
from tests.support.procs import Proc, start_uvicorn  # noqa: E402

WEEK = 7 * 86400
PANELS = [  # (query, step s): a per-series panel with a big answer, two aggregates
    ("rate(model_inference_duration_seconds_bucket[5m])", 600),
    ("sum by (provider, model) (rate(tokens_used_total[5m]))", 300),
    ("histogram_quantile(0.95, sum by (le, provider) (rate(model_inference_duration_seconds_bucket[10m])))",
     600),
]
DASH_PANELS = [
    "sum by (provider) (rate(model_inference_requests_total[5m]))",
    "sum by (provider) (rate(model_inference_requests_total{status=\"error\"}[5m]))",
    "sum by (model) (rate(model_inference_requests_total[5m]))",
    "sum by (provider, token_type) (rate(tokens_used_total[5m]))",
    "sum by (provider) (rate(credits_used_total[5m]))",
    "sum by (provider) (rate(gatewayz_api_cost_usd_total[5m]))",
    "histogram_quantile(0.5, sum by (le) (rate(model_inference_duration_seconds_bucket[5m])))",
    "histogram_quantile(0.95, sum by (le, provider) (rate(model_inference_duration_seconds_bucket[5m])))",
    "histogram_quantile(0.99, sum by (le, model) (rate(model_inference_duration_seconds_bucket[5m])))",
    "histogram_quantile(0.95, sum by (le, provider) (rate(provider_response_time_seconds_bucket[5m])))",
    "provider_availability",
    "provider_error_rate",
    "sum by (path) (rate(fastapi_requests_total[5m]))",
    "sum by (status_class) (rate(fastapi_requests_total[5m]))",
    "sum(fastapi_requests_in_progress)",
    "histogram_quantile(0.95, sum by (le, path) (rate(fastapi_requests_duration_seconds_bucket[5m])))",
    "sum by (table) (rate(database_queries_total[5m]))",
    "sum(rate(cache_hits_total[5m])) / (sum(rate(cache_hits_total[5m])) + sum(rate(cache_misses_total[5m])))",
    "active_api_keys",
    "max_over_time(provider_error_rate[15m])",
]


def grafana_window(now: float, span: int, step: int) -> tuple[int, int]:
    end = math.floor(now / step) * step
    return end - span, end


def data_bytes(body: bytes) -> bytes:
    """The `data` member of an envelope as sent (both sides write status first, then data)."""
    head = b'{"status":"success","data":'
    assert body.startswith(head), body[:200]
    return body[len(head):]


def cache_bytes(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("metrics_gateway_range_cache_bytes"))


def ask(url: str, query: str, start: int, end: int, step: int) -> tuple[float, str]:
    """One timed request, by curl as Grafana's Go client asks (gzip accepted), the body
    discarded: the time is the server's, not a client's copying of megabytes (httpx takes
    ~9 ms to read the 6.4 MB answer the gateway sends in 0.3 ms; curl writing it to a file
    or a pipe, 4 ms). The bodies are compared by `body` after the timed requests."""
    done = subprocess.run(
        ["curl", "-sS", "--compressed", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %header{x-gateway-cache}",
         "--data-urlencode", f"query={query}", "--data-urlencode", f"start={start}",
         "--data-urlencode", f"end={end}", "--data-urlencode", f"step={step}", f"{url}/api/v1/query_range"],
        capture_output=True, text=True, check=True, timeout=120)
    code, took, *how = done.stdout.split(" ")
    assert code == "200", done.stdout
    return float(took), "".join(how)


def body(client: httpx.Client, url: str, query: str, start: int, end: int, step: int) -> tuple[bytes, str]:
    """An answer's bytes (for the gateway, the remembered body: the very bytes it sent when timed)."""
    resp = client.post(f"{url}/api/v1/query_range",
                       data={"query": query, "start": str(start), "end": str(end), "step": str(step)})
    assert resp.status_code == 200, resp.text[:300]
    return resp.content, resp.headers.get("x-gateway-cache", "")


def gateway(work: Path, prom: Proc, name: str, env: dict[str, str]) -> Proc:
    return start_uvicorn(work / name, "app.main:create_app", factory=True,
                         env={"PROMETHEUS_URL": prom.url, "API_TOKENS": "", "REQUEST_DEADLINE_SECONDS": "60",
                              "PROMETHEUS_MAX_RESPONSE_BYTES": str(256 * 1024 * 1024), **env})


async def open_dashboard(url: str, viewers: int, start: int, end: int, step: int) -> list[str]:
    limits = httpx.Limits(max_connections=viewers * len(DASH_PANELS))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def panel(q: str) -> str:
            resp = await client.post(f"{url}/api/v1/query_range",
                                     data={"query": q, "start": str(start), "end": str(end), "step": str(step)})
            assert resp.status_code == 200, resp.text[:300]
            return resp.headers.get("x-gateway-cache", "?")

        return list(await asyncio.gather(*(panel(q) for _ in range(viewers) for q in DASH_PANELS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--series", type=int, default=580)
    ap.add_argument("--viewers", type=int, default=25)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--gzip", "--identity", dest="gzip", action="store_true",
                    help="also measure a gateway asking Prometheus for gzip (PROMETHEUS_COMPRESSION=gzip, "
                         "as for a remote upstream), in the same run; the default (auto) asks this "
                         "loopback Prometheus for plain bytes")
    args = ap.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    t0 = time.monotonic()
    ds = ensure(args.days, args.series)
    say(f"dataset: {ds.series} series, {ds.days:g} days at {ds.step} s, ready in {time.monotonic() - t0:.1f} s "
        f"({ds.path.name})")
    span = int(min(WEEK, ds.days * 86400))
    with tempfile.TemporaryDirectory(prefix="bench-longrange-") as tmp:
        work = Path(tmp)
        prom = start_prometheus_on(ds, work / "prometheus")
        try:
            run(args, say, work, prom, span)
        finally:
            prom.stop()
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace, say, work: Path, prom: Proc, span: int) -> None:  # type: ignore[no-untyped-def]
    configs = [("gateway defaults (PROMETHEUS_COMPRESSION=auto: plain bytes from this loopback Prometheus)", {})]
    if args.gzip:
        configs.append(("gateway asking Prometheus for gzip (PROMETHEUS_COMPRESSION=gzip, a remote upstream's "
                        "default)", {"PROMETHEUS_COMPRESSION": "gzip"}))
    for title, env in configs:
        panels(args, say, work, prom, span, title, env)
    dashboard(args, say, work, prom, configs[0][1])


def panels(args: argparse.Namespace, say, work: Path, prom: Proc, span: int,  # type: ignore[no-untyped-def]
           title: str, env: dict[str, str]) -> None:
    now = time.time()
    windows = [grafana_window(now, span, step) for _, step in PANELS]
    direct: dict[int, list[float]] = {i: [] for i in range(len(PANELS))}
    truth: dict[tuple[int, int], bytes] = {}
    cold: dict[int, list[float]] = {i: [] for i in range(len(PANELS))}
    nxt: dict[int, list[float]] = {i: [] for i in range(len(PANELS))}
    again: dict[int, list[float]] = {i: [] for i in range(len(PANELS))}
    memory: dict[int, float] = {}
    sizes: dict[int, int] = {}
    mismatches: list[str] = []
    with httpx.Client(timeout=120) as client:
        for i, (q, step) in enumerate(PANELS):
            start, end = windows[i]
            for shift in (0, step):
                got, _ = body(client, prom.url, q, start + shift, end + shift, step)
                truth[(i, shift)] = data_bytes(got)
            sizes[i] = len(got)
        for r in range(args.rounds):
            app = gateway(work, prom, f"gw{r}-{len(env)}", env)
            try:
                for i, (q, step) in enumerate(PANELS):
                    start, end = windows[i]
                    direct[i].append(ask(prom.url, q, start, end, step)[0])
                    before = cache_bytes(app.url)
                    took, how = ask(app.url, q, start, end, step)
                    cold[i].append(took)
                    memory[i] = cache_bytes(app.url) - before
                    nxt[i].append(ask(app.url, q, start + step, end + step, step)[0])
                    again[i].append(ask(app.url, q, start, end, step)[0])
                    # What was sent: the cold answer (remembered, so "again" sent the same
                    # bytes) and the next refresh's, asked once more.
                    for shift, name in ((0, f"cold ({how}) and again"), (step, "next")):
                        got, _ = body(client, app.url, q, start + shift, end + shift, step)
                        if data_bytes(got) != truth[(i, shift)]:
                            mismatches.append(f"panel {i} {name}")
            finally:
                app.stop()
    say(f"\n## Week-long panels ({span / 86400:g} days, Grafana-aligned): {title}; {args.rounds} rounds, medians\n")
    say("| panel | step | answer | Prometheus | cold | next refresh | identical | cache bytes after cold |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (q, step) in enumerate(PANELS):
        p = statistics.median(direct[i])
        c, n, a = (statistics.median(v[i]) for v in (cold, nxt, again))
        say(f"| `{q[:60]}` | {step} s | {sizes[i] / 1e6:.1f} MB | {p * 1000:.0f} ms | {c * 1000:.0f} ms "
            f"(**{c / p:.2f}x**) | {n * 1000:.0f} ms (**{n / p:.3f}x**) | {a * 1000:.1f} ms (**{a / p:.3f}x**) "
            f"| {memory[i] / 1e6:.1f} MB |")
    say(f"\nanswers equal to Prometheus' (`data` bytes): "
        f"{'all' if not mismatches else 'NOT ' + ', '.join(sorted(set(mismatches)))}")


def dashboard(args: argparse.Namespace, say, work: Path, prom: Proc,  # type: ignore[no-untyped-def]
              env: dict[str, str]) -> None:
    """Cold dashboards on fresh processes: 1 h panels (one part each), then week-long ones."""
    for span, step in ((3600, 15), (WEEK, 600)):
        app = gateway(work, prom, f"gw-dash-{span}", env)
        try:
            start, end = grafana_window(time.time(), span, step)
            parts = len(split([(start * 1000, end * 1000)], step * 1000, part_len(step * 1000, 86400 * 1000)))
            before = range_requests(prom.url)
            t0 = time.perf_counter()
            lookups = asyncio.run(open_dashboard(app.url, args.viewers, start, end, step))
            took = time.perf_counter() - t0
            upstream = range_requests(prom.url) - before
            say(f"\n## Cold dashboard: {len(DASH_PANELS)} panels ({span / 3600:g} h, step {step} s, "
                f"{parts} part(s) each) x {args.viewers} viewers at once\n")
            say(f"- **{upstream:.0f} upstream range queries** for {len(lookups)} requests "
                f"({upstream / (parts * len(DASH_PANELS)):.2f} per part), all answered in {took:.1f} s; lookups: "
                + ", ".join(f"{k} {lookups.count(k)}" for k in sorted(set(lookups))))
        finally:
            app.stop()


if __name__ == "__main__":
    main()
