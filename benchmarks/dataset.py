"""A week of GatewayZ-shaped history in a real Prometheus TSDB, for benchmarks and tests.

Why: the range cache's costs (parsing, storing and assembling answers) grow with
the answer, and a few minutes of data say nothing about a week-long panel. This
builds N days of history ending *now* (60 s resolution by default) with the
backend's own metric names (docs: the GatewayZ metric contract): inference
counters by provider/model/status, token and credit counters, latency histograms,
provider gauges, HTTP and database families. About 580 series for the default
size, a few hundred for the CI size.

It writes OpenMetrics and runs ``promtool tsdb create-blocks-from openmetrics``
(one pass over the input per block, hence one large block), and keeps the result
between runs in a cache directory outside the repository:

    $METRICS_GATEWAY_DATASETS, else $XDG_CACHE_HOME/metrics-gateway/datasets,
    else ~/.cache/metrics-gateway/datasets

keyed by (days, series, step, seed, format version). A cached dataset older than
``max_age`` seconds is rebuilt, so that its history still ends near now (panels
ending "now" should find data in their live tail). The values are seeded, so two
builds differ only in where "now" falls.

Usage:
    python -m benchmarks.dataset --days 7 --series 580 [--out DIR] [--max-age 21600]

prints the directory of the TSDB (``<dir>/data``; ``<dir>/meta.json`` says what is
in it). ``ensure_dataset(days, series) -> Path`` does the same from Python;
``start_prometheus_on(dataset, workdir)`` serves a private copy of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

FORMAT = 1  # bump when the generated content changes
PROVIDERS = ["openai", "anthropic", "google", "mistral", "groq", "together"]
MODELS = ["gpt-4o", "claude-3-5-sonnet", "gemini-1.5-pro", "mistral-large", "llama-3.1-70b",
          "mixtral-8x7b", "gpt-4o-mini", "claude-3-haiku", "gemini-1.5-flash", "qwen-2.5-72b",
          "deepseek-v3", "command-r-plus"]
INFER_BUCKETS = ["0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "+Inf"]
PROVIDER_BUCKETS = ["0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"]
HTTP_BUCKETS = ["0.01", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "+Inf"]
PATHS = [("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("GET", "/v1/models"),
         ("GET", "/health"), ("GET", "/api/users/me"), ("POST", "/api/keys")]
TABLES = ["users", "api_keys", "usage_records", "credits"]
# Series per (provider, model) pair: requests x2, duration histogram (10 buckets, sum,
# count), tokens x2, credits, cost. Per provider: availability, error rate, response
# histogram (8 buckets, sum, count). Fixed families: the rest.
PER_PAIR = 2 + len(INFER_BUCKETS) + 2 + 2 + 1 + 1
PER_PROVIDER = 2 + len(PROVIDER_BUCKETS) + 2
FIXED = len(PATHS) * 3 + len(PATHS) + len(PATHS) * (len(HTTP_BUCKETS) + 2) + len(TABLES) * 3 + 3 * 2 + 2 + 1


def cache_root() -> Path:
    """Where datasets are kept between runs (outside the repository)."""
    env = os.environ.get("METRICS_GATEWAY_DATASETS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metrics-gateway" / "datasets"


@dataclass(frozen=True)
class Dataset:
    """A built TSDB: `path/data` for ``--storage.tsdb.path`` (copy it first: Prometheus writes)."""

    path: Path
    days: float
    series: int
    step: int
    start: int  # first sample, unix seconds
    end: int  # last sample, unix seconds

    @property
    def data(self) -> Path:
        return self.path / "data"


def _pairs(series: int) -> list[tuple[str, str]]:
    """(provider, model) pairs so the whole comes to about `series` series."""
    n = max(1, round((series - FIXED - PER_PROVIDER * len(PROVIDERS)) / PER_PAIR))
    providers = PROVIDERS[:min(len(PROVIDERS), n)]
    return [(providers[i % len(providers)], MODELS[i % len(MODELS)] + ("" if i < len(MODELS) else f"-{i}"))
            for i in range(n)]


def _diurnal(t: int) -> float:
    """Traffic by hour of day: quiet at night, a peak in the afternoon (UTC)."""
    day = (t % 86400) / 86400
    return 0.55 + 0.45 * math.sin(2 * math.pi * (day - 0.3))


def _num(v: float) -> str:
    return repr(round(v, 6)) if v != int(v) else str(int(v))


class _Writer:
    """OpenMetrics lines, one family after another, each family's samples in time order."""

    def __init__(self, out: IO[str], times: range) -> None:
        self.out = out
        self.times = times

    def family(self, name: str, series: list[tuple[str, Iterator[float]]]) -> None:
        """`series`: (label text, values: one per time). Written time-major in the family."""
        heads = [f"{name}{{{labels}}} " for labels, _ in series]
        gens = [g for _, g in series]
        write = self.out.write
        for t in self.times:
            suffix = f" {t}\n"
            write("".join(h + _num(next(g)) + suffix for h, g in zip(heads, gens, strict=True)))


def _counter(rng: random.Random, rate: float, times: range, noise: float = 0.3) -> Iterator[float]:
    total = float(rng.randint(0, 1000))
    for t in times:
        total += max(0.0, rate * _diurnal(t) * (1 + noise * (rng.random() - 0.5)))
        yield round(total)


def _float_counter(rng: random.Random, rate: float, times: range) -> Iterator[float]:
    total = 0.0
    for t in times:
        total += rate * _diurnal(t) * (0.8 + 0.4 * rng.random())
        yield round(total, 4)


def _histogram(rng: random.Random, rate: float, buckets: list[str], scale: float,
               times: range) -> list[Iterator[float]]:
    """Cumulative bucket counters, then _sum, then _count, consistent at every sample."""
    counts = [0] * len(buckets)
    state = {"sum": 0.0, "n": 0}
    bounds = [math.inf if b == "+Inf" else float(b) for b in buckets]
    rows: list[list[float]] = []

    def step(t: int) -> list[float]:
        n = max(0, int(rate * _diurnal(t) * (0.7 + 0.6 * rng.random())))
        for _ in range(min(n, 8)):  # a few drawn latencies, weighted to make up n
            x = rng.lognormvariate(math.log(scale), 0.8)
            w = n // min(n, 8) + (1 if _ < n % min(n, 8) else 0)
            state["sum"] += x * w
            for i, b in enumerate(bounds):
                if x <= b:
                    counts[i] += w
        state["n"] += n
        return [*counts, round(state["sum"], 4), state["n"]]

    def column(i: int) -> Iterator[float]:
        for k, t in enumerate(times):
            while len(rows) <= k:
                rows.append(step(t))
            yield rows[k][i]
            if i == len(buckets) + 1:
                rows[k] = []  # the last column read this row: free it

    # Columns are read in lockstep (one value each per time) by _Writer.family.
    return [column(i) for i in range(len(buckets) + 2)]


def _gauge(rng: random.Random, lo: float, hi: float, times: range, digits: int = 4) -> Iterator[float]:
    v = (lo + hi) / 2
    for _ in times:
        v = min(hi, max(lo, v + (hi - lo) * 0.05 * (rng.random() - 0.5)))
        yield round(v, digits)


def write_openmetrics(out: IO[str], series: int, start: int, end: int, step: int, seed: int = 21) -> int:
    """The history as OpenMetrics text; returns the number of series written."""
    times = range(start, end + 1, step)
    w = _Writer(out, times)
    rng = random.Random(seed)
    pairs = _pairs(series)
    providers = sorted({p for p, _ in pairs}, key=PROVIDERS.index)
    written = 0

    def fam(name: str, rows: list[tuple[str, Iterator[float]]]) -> None:
        nonlocal written
        w.family(name, rows)
        written += len(rows)

    weight = {pm: rng.uniform(0.2, 3.0) for pm in pairs}
    fam("model_inference_requests_total", [
        (f'model="{m}",provider="{p}",status="{s}"', _counter(rng, 30 * weight[(p, m)] * f, times))
        for p, m in pairs for s, f in (("success", 1.0), ("error", 0.03))])
    for name, bks, scale, per in (("model_inference_duration_seconds", INFER_BUCKETS, 1.5, "pair"),
                                  ("provider_response_time_seconds", PROVIDER_BUCKETS, 0.6, "provider")):
        keys = pairs if per == "pair" else [(p, "") for p in providers]
        cols: dict[str, list[tuple[str, Iterator[float]]]] = {"_bucket": [], "_sum": [], "_count": []}
        for p, m in keys:
            labels = f'model="{m}",provider="{p}"' if m else f'provider="{p}"'
            hist = _histogram(rng, 30 * weight.get((p, m), 2.0), bks, scale, times)
            cols["_bucket"] += [(f'{labels},le="{le}"', g) for le, g in zip(bks, hist, strict=False)]
            cols["_sum"].append((labels, hist[-2]))
            cols["_count"].append((labels, hist[-1]))
        # Histogram columns share one state, so their families are written together
        # time-major (one sample of every column per time), as one family block each.
        _write_histogram(w, name, cols)
        written += sum(len(v) for v in cols.values())
    fam("tokens_used_total", [
        (f'model="{m}",provider="{p}",token_type="{k}"', _counter(rng, 30 * weight[(p, m)] * f, times))
        for p, m in pairs for k, f in (("input", 900.0), ("output", 350.0))])
    fam("credits_used_total", [(f'model="{m}",provider="{p}"', _float_counter(rng, weight[(p, m)] * 0.4, times))
                               for p, m in pairs])
    fam("gatewayz_api_cost_usd_total", [(f'model="{m}",provider="{p}"',
                                         _float_counter(rng, weight[(p, m)] * 0.05, times)) for p, m in pairs])
    fam("provider_availability", [(f'provider="{p}"', _gauge(rng, 0.9, 1.0, times, 0)) for p in providers])
    fam("provider_error_rate", [(f'provider="{p}"', _gauge(rng, 0.0, 0.08, times)) for p in providers])
    fam("fastapi_requests_total", [
        (f'app_name="gatewayz",method="{meth}",path="{path}",status_class="{c}xx",status_code="{c}00"',
         _counter(rng, 50 * f, times)) for meth, path in PATHS for c, f in ((2, 1.0), (4, 0.05), (5, 0.01))])
    fam("fastapi_requests_in_progress", [(f'app_name="gatewayz",method="{meth}",path="{path}"',
                                          _gauge(rng, 0, 20, times, 0)) for meth, path in PATHS])
    cols = {"_bucket": [], "_sum": [], "_count": []}
    for meth, path in PATHS:
        labels = f'app_name="gatewayz",method="{meth}",path="{path}"'
        hist = _histogram(rng, 50, HTTP_BUCKETS, 0.08, times)
        cols["_bucket"] += [(f'{labels},le="{le}"', g) for le, g in zip(HTTP_BUCKETS, hist, strict=False)]
        cols["_sum"].append((labels, hist[-2]))
        cols["_count"].append((labels, hist[-1]))
    _write_histogram(w, "fastapi_requests_duration_seconds", cols)
    written += sum(len(v) for v in cols.values())
    fam("database_queries_total", [(f'operation="{op}",table="{tb}"', _counter(rng, 40, times))
                                   for tb in TABLES for op in ("select", "insert", "update")])
    fam("cache_hits_total", [(f'cache_name="{c}"', _counter(rng, 80, times)) for c in ("models", "keys", "users")])
    fam("cache_misses_total", [(f'cache_name="{c}"', _counter(rng, 8, times)) for c in ("models", "keys", "users")])
    fam("active_api_keys", [(f'status="{s}"', _gauge(rng, lo, hi, times, 0))
                            for s, lo, hi in (("active", 800, 1200), ("inactive", 100, 300))])
    fam("redis_up", [("", _gauge(rng, 1, 1, times, 0))])
    out.write("# EOF\n")
    return written


def _write_histogram(w: _Writer, name: str, cols: dict[str, list[tuple[str, Iterator[float]]]]) -> None:
    """A histogram's three families from shared generators: buffered per family, since
    OpenMetrics wants each family's samples together but the columns advance together."""
    times = w.times
    heads = {suffix: [f"{name}{suffix}{{{labels}}} " for labels, _ in rows] for suffix, rows in cols.items()}
    gens = {suffix: [g for _, g in rows] for suffix, rows in cols.items()}
    files = {suffix: tempfile.TemporaryFile("w+") for suffix in cols}
    try:
        for t in times:
            suffix_t = f" {t}\n"
            for suffix in ("_bucket", "_sum", "_count"):
                files[suffix].write("".join(h + _num(next(g)) + suffix_t
                                            for h, g in zip(heads[suffix], gens[suffix], strict=True)))
        for f in files.values():
            f.seek(0)
            shutil.copyfileobj(f, w.out)
    finally:
        for f in files.values():
            f.close()


def build(out: Path, days: float, series: int, step: int = 60, seed: int = 21,
          end: int | None = None) -> Dataset:
    """Generate and backfill into `out` (replaced); returns what was built."""
    end = (int(time.time()) // step) * step if end is None else end
    start = end - int(days * 86400) + step
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = tmp / "history.om"
    with src.open("w", buffering=1 << 20) as f:
        written = write_openmetrics(f, series, start, end, step, seed)
    block_hours = int(days * 24) + 2
    subprocess.run([shutil.which("promtool") or "/usr/bin/promtool", "tsdb", "create-blocks-from", "openmetrics",
                    f"--max-block-duration={block_hours}h", "--quiet", str(src), str(tmp / "data")],
                   check=True, capture_output=True, timeout=1800)
    src.unlink()
    meta = {"format": FORMAT, "days": days, "series": written, "asked_series": series, "step": step,
            "seed": seed, "start": start, "end": end, "built_at": int(time.time())}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return _load(out)


def _load(path: Path) -> Dataset:
    meta = json.loads((path / "meta.json").read_text())
    return Dataset(path, meta["days"], meta["series"], meta["step"], meta["start"], meta["end"])


def ensure_dataset(days: float = 7, series: int = 580, *, step: int = 60, seed: int = 21,
                   root: Path | None = None, max_age: float | None = 6 * 3600) -> Path:
    """The directory of a built dataset (its TSDB in ``<dir>/data``), built when missing
    or older than `max_age` seconds (None: any age)."""
    return ensure(days, series, step=step, seed=seed, root=root, max_age=max_age).path


def ensure(days: float = 7, series: int = 580, *, step: int = 60, seed: int = 21,
           root: Path | None = None, max_age: float | None = 6 * 3600) -> Dataset:
    """Like ensure_dataset, returning the Dataset (its time span and size)."""
    root = root or cache_root()
    path = root / f"gatewayz-v{FORMAT}-{days:g}d-{series}s-{step}s-seed{seed}"
    if (path / "meta.json").is_file():
        ds = _load(path)
        if max_age is None or time.time() - ds.end <= max_age:
            return ds
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f"{path.name}.lock"
    import fcntl  # one builder at a time per dataset (helpers and CI jobs share the cache)

    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if (path / "meta.json").is_file():
            ds = _load(path)
            if max_age is None or time.time() - ds.end <= max_age:
                return ds
        return build(path, days, series, step, seed)


def copy_tsdb(ds: Dataset, dest: Path) -> Path:
    """A private copy of the blocks (Prometheus writes its WAL and may compact)."""
    shutil.copytree(ds.data, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--series", type=int, default=580)
    ap.add_argument("--step", type=int, default=60, help="sample resolution, seconds")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", type=Path, default=None, help="cache root (default: see module doc)")
    ap.add_argument("--max-age", type=float, default=6 * 3600, help="rebuild when older (s; <0: never)")
    args = ap.parse_args()
    t0 = time.monotonic()
    ds = ensure(args.days, args.series, step=args.step, seed=args.seed, root=args.out,
                max_age=None if args.max_age < 0 else args.max_age)
    print(ds.path)
    print(f"# {ds.series} series, {ds.days:g} days at {ds.step}s, ends {ds.end} "
          f"({time.monotonic() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
