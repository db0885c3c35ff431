"""Two tenants' data (env="a", env="b") with the backend's real metric names, for tenant tests.

Each tenant has the GatewayZ backend's contract metrics (the synthetic backend's
series) and the PromLabs demo service's ``demo_*`` metrics (what the prometheus/
compliance query list reads), with the tenant label ``env``. Tenant b differs from
a in every value (rates x3, other gauge values), has a provider a does not
(``deepinfra``) and families a does not (``redis_up``, ``redis_db_keys``), so any
of b's series leaking into an answer for a changes it.

Values are exact functions of time (counters grow linearly, so any rate window
gives the declared rate). `openmetrics()` writes them for ``promtool tsdb
create-blocks-from openmetrics``, on a fixed grid of STEP seconds that runs into the
future: a query at "now" then sees the same samples on two Prometheus servers
holding the same blocks until the next grid point, and rate windows are full.
"""

from __future__ import annotations

import math
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.procs import PROMTOOL_BIN, free_port
from tests.support.synthetic_backend import SERIES, TYPES

STEP = 15.0
T0 = 1_700_000_000.0  # the origin of every counter (well before any history written)
DEMO_INSTANCES = ("demo.promlabs.com:10000", "demo.promlabs.com:10001", "demo.promlabs.com:10002")
DEMO_BUCKETS = tuple(0.0001 * 1.5 ** i for i in range(25))


@dataclass(frozen=True)
class Series:
    family: str
    kind: str  # counter, gauge, histogram, summary
    name: str
    labels: tuple[tuple[str, str], ...]
    at: Callable[[float], float]


def _counter(rate: float, base: float = 0.0) -> Callable[[float], float]:
    return lambda t: base + rate * (t - T0)


def _const(v: float) -> Callable[[float], float]:
    return lambda t: v


def _backend(env: str) -> list[Series]:
    scale = 1.0 if env == "a" else 3.0
    out = []
    for s in SERIES:
        labels = (*s.labels, ("job", "backend"), ("instance", f"backend-{env}:8000"), ("env", env))
        if s.rate:
            fn = _counter(s.rate * scale, s.value * scale)
        else:
            fn = _const(s.value + (0.0 if env == "a" else 0.25 if s.value < 1 else 2.0))
        out.append(Series(s.family, TYPES[s.family], s.name, labels, fn))
    if env == "b":
        extra = (("job", "backend"), ("instance", "backend-b:8000"), ("env", "b"))
        out += [
            Series("provider_availability", "gauge", "provider_availability",
                   (("provider", "deepinfra"), *extra), _const(1.0)),
            Series("redis_up", "gauge", "redis_up", extra, _const(1.0)),
            Series("redis_db_keys", "gauge", "redis_db_keys", (("db", "db0"), *extra), _const(1234.0)),
        ]
    return out


def _demo(env: str) -> list[Series]:
    k = 1.0 if env == "a" else 3.0
    out: list[Series] = []
    for n, inst in enumerate(DEMO_INSTANCES):
        base = (("instance", inst), ("job", "demo"), ("env", env))
        for mode, share in (("user", 0.3), ("system", 0.2), ("idle", 0.5)):
            out.append(Series("demo_cpu_usage_seconds", "counter", "demo_cpu_usage_seconds_total",
                              (("mode", mode), *base), _counter(4 * share * k, 1000.0 * (n + 1))))
        out.append(Series("demo_num_cpus", "gauge", "demo_num_cpus", base, _const(4.0 * k)))
        used = (lambda ph: (lambda t: 2e9 * k + 1e8 * math.sin(t / 600 + ph)))(n)
        for typ, fn in (("used", used), ("cached", _const(1e9 * k)), ("buffers", _const(5e8)),
                        ("free", (lambda u: (lambda t: 8 * 2**30 - u(t) - 1e9 * k - 5e8))(used))):
            out.append(Series("demo_memory_usage_bytes", "gauge", "demo_memory_usage_bytes",
                              (("type", typ), *base), fn))
        out.append(Series("demo_disk_usage_bytes", "gauge", "demo_disk_usage_bytes", base,
                          (lambda t: 16e9 + 5e5 * k * ((t - T0) % 86400))))
        out.append(Series("demo_disk_total_bytes", "gauge", "demo_disk_total_bytes", base, _const(160e9)))
        out.append(Series("demo_batch_last_success_timestamp_seconds", "gauge",
                          "demo_batch_last_success_timestamp_seconds", base, lambda t: t - t % 60 - 60))
        out.append(Series("demo_batch_last_run_timestamp_seconds", "gauge",
                          "demo_batch_last_run_timestamp_seconds", base, lambda t: t - t % 60))
        out.append(Series("demo_batch_last_run_duration_seconds", "gauge",
                          "demo_batch_last_run_duration_seconds", base, _const(20.0 + n)))
        out.append(Series("demo_batch_last_run_processed_bytes", "gauge",
                          "demo_batch_last_run_processed_bytes", base, _const(1e6 * k + n)))
        out.append(Series("demo_api_http_requests_in_progress", "gauge", "demo_api_http_requests_in_progress",
                          base, _const(float(n) * k)))
        out.append(Series("demo_is_holiday", "gauge", "demo_is_holiday", base,
                          lambda t: float(int(t // 300) % 5 == 0)))
        out.append(Series("demo_items_shipped", "counter", "demo_items_shipped_total", base,
                          _counter(5.0 * k, 10.0)))
        out.append(Series("demo_intermittent_metric", "gauge", "demo_intermittent_metric", base, _const(1.0)))
        for method, path, status, rate, mean in (("GET", "/api/foo", "200", 8.0, 0.02),
                                                 ("POST", "/api/foo", "200", 2.0, 0.05),
                                                 ("GET", "/api/bar", "500", 0.5, 0.2),
                                                 ("GET", "/api/nonexistent", "404", 0.2, 0.001)):
            labels = (("method", method), ("path", path), ("status", status), *base)
            r = rate * k * (1 + n / 10)
            for le in (*DEMO_BUCKETS, math.inf):
                share = 1.0 if math.isinf(le) else 1 - math.exp(-le / mean)
                out.append(Series("demo_api_request_duration_seconds", "histogram",
                                  "demo_api_request_duration_seconds_bucket",
                                  (("le", _le(le)), *labels), _counter(r * share)))
            out.append(Series("demo_api_request_duration_seconds", "histogram",
                              "demo_api_request_duration_seconds_sum", labels, _counter(r * mean)))
            out.append(Series("demo_api_request_duration_seconds", "histogram",
                              "demo_api_request_duration_seconds_count", labels, _counter(r)))
    return out


def _le(v: float) -> str:
    return "+Inf" if math.isinf(v) else repr(v)


def tenant_series(env: str) -> list[Series]:
    return _backend(env) + _demo(env)


def _visible(s: Series, t: float) -> bool:
    # The demo's intermittent metric exists only in even minutes.
    return s.family != "demo_intermittent_metric" or int(t // 60) % 2 == 0


def grid(start: float, end: float) -> list[float]:
    first = math.ceil(start / STEP) * STEP
    return [first + i * STEP for i in range(int((end - first) // STEP) + 1)]


def openmetrics(envs: Iterable[str], start: float, end: float) -> str:
    """Every series of the tenants `envs`, sampled on the STEP grid in [start, end]."""
    series = [s for env in envs for s in tenant_series(env)]
    families: dict[str, list[Series]] = {}
    for s in series:
        families.setdefault(s.family, []).append(s)
    times = grid(start, end)
    lines: list[str] = []
    for fam, members in families.items():
        lines.append(f"# HELP {fam} {fam} (tenant test data)")
        lines.append(f"# TYPE {fam} {members[0].kind}")
        for t in times:
            for s in members:
                if _visible(s, t):
                    labels = ",".join(f'{k}="{v}"' for k, v in s.labels)
                    lines.append(f"{s.name}{{{labels}}} {s.at(t)!r} {t:.3f}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(tsdb_dir: Path, envs: Iterable[str], start: float, end: float) -> None:
    """Write the tenants' series for [start, end] as TSDB blocks into `tsdb_dir`."""
    tsdb_dir.mkdir(parents=True, exist_ok=True)
    src = tsdb_dir.parent / f"history-{'-'.join(envs)}.om"
    src.write_text(openmetrics(envs, start, end))
    subprocess.run([PROMTOOL_BIN, "tsdb", "create-blocks-from", "openmetrics", str(src), str(tsdb_dir)],
                   check=True, capture_output=True, timeout=300)
    src.unlink()


# -- live targets (for metadata: Prometheus keeps it only from scrapes) ----------------------------

def exposition(env: str) -> str:
    """Text 0.0.4 of one tenant's backend families, with HELP/TYPE (the metadata source)."""
    series = _backend(env)
    families: dict[str, list[Series]] = {}
    for s in series:
        families.setdefault(s.family, []).append(s)
    lines: list[str] = []
    for fam, members in families.items():
        lines.append(f"# HELP {fam} {fam} (tenant test data)")
        lines.append(f"# TYPE {fam} {members[0].kind}")
        for s in members:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels if k not in ("job", "instance", "env"))
            lines.append(f"{s.name}{{{labels}}} {s.at(T0 + 3600)!r}")
    return "\n".join(lines) + "\n"


class StaticTarget:
    """A scrape target on 127.0.0.1 serving one fixed exposition text."""

    def __init__(self, body: str) -> None:
        payload = body.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def tenant_scrape_config(targets: dict[str, str], job: str = "backend") -> str:
    """scrape_configs YAML: one static target per tenant, labelled with its env."""
    out = f"  - job_name: {job}\n    static_configs:\n"
    for env, target in targets.items():
        out += f"      - targets: ['{target}']\n        labels:\n          env: {env}\n"
    return out
