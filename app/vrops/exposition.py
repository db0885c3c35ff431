"""Prometheus families for the latest vROps samples.

Mapping of "cluster, object, metric type" (the ops vocabulary) to Prometheus:

- metric type  -> the metric NAME in base units (vrops_cpu_usage_ratio, ...); never
  a ``type`` label (it clashes with common target labels).
- cluster      -> label ``vccluster`` (``cluster`` is a common target label).
- object       -> labels ``object_kind`` (cluster|host|vm|datastore) and ``object``
  (the vROps resource name).
- vROps instance -> label ``target`` (the VROPS_TARGETS name).

Status/freshness families (up, last success, duration, sample age, stale flags)
are prometheus_client families rendered by app.common.exposition.render_families.
The sample families (125k series for 50 clusters x 500 objects x 5 metrics) use a
fast path: the worker stored rows already escaped, so each (target, cluster,
metric) blob becomes exposition lines with one bytes.replace. Every label value
is escaped exactly like prometheus_client does (backslash, quote, newline) and
HELP/TYPE are written once per family, so the output passes promtool.
Blobs older than VROPS_STALE_AFTER_SECONDS are NOT emitted as current values;
they show up as vrops_sample_stale 1 with their vrops_sample_age_seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from app.common.exposition import render_families
from app.vrops.store import ROW_RE, Blob, Snapshot, escape_label
from app.vrops.units import metric_by_name

OPENMETRICS_EOF = b"# EOF\n"


def blob_age(blob: Blob, now: float) -> float:
    return max(0.0, now - blob.sample_ts)


def effective_up(status: dict[str, Any], now: float, stale_after: float) -> int:
    """The worker's last verdict, unless nobody has attempted a collection recently."""
    if not status or not status.get("up"):
        return 0
    last = float(status.get("last_attempt") or 0)
    return 1 if now - last <= stale_after else 0


def status_families(
    snap: Snapshot, targets: Sequence[str], now: float, stale_after: float
) -> list[Metric]:
    store_up = GaugeMetricFamily("vrops_store_up", "1 when the Redis sample store answered.")
    store_up.add_metric([], 1)
    up = GaugeMetricFamily(
        "vrops_up", "1 when the last vROps collection of the target succeeded recently.",
        labels=["target"])
    last_ok = GaugeMetricFamily(
        "vrops_collection_last_success_timestamp_seconds",
        "Unix time of the last successful statistics collection.", labels=["target"])
    last_try = GaugeMetricFamily(
        "vrops_collection_last_attempt_timestamp_seconds",
        "Unix time of the last statistics collection attempt.", labels=["target"])
    duration = GaugeMetricFamily(
        "vrops_collection_duration_seconds",
        "Duration of the last statistics collection cycle.", labels=["target"])
    samples = GaugeMetricFamily(
        "vrops_collection_samples", "Samples written by the last statistics cycle.",
        labels=["target"])
    dropped = GaugeMetricFamily(
        "vrops_collection_stale_samples",
        "Samples the last cycle got from vROps already older than the stale age.",
        labels=["target"])
    inv_ok = GaugeMetricFamily(
        "vrops_inventory_last_success_timestamp_seconds",
        "Unix time of the last successful inventory refresh.", labels=["target"])
    inv_objects = GaugeMetricFamily(
        "vrops_inventory_objects", "Objects in the last inventory.", labels=["target"])
    age = GaugeMetricFamily(
        "vrops_sample_age_seconds",
        "Age of the newest vROps sample per target, cluster and metric.",
        labels=["target", "vccluster", "metric"])
    stale = GaugeMetricFamily(
        "vrops_sample_stale",
        "1 when the samples are older than the stale age and withheld from the value series.",
        labels=["target", "vccluster", "metric"])
    for t in targets:
        st = snap.target_status(t, "stats")
        inv = snap.target_status(t, "inventory")
        up.add_metric([t], effective_up(st, now, stale_after))
        if st.get("last_success"):
            last_ok.add_metric([t], float(st["last_success"]))
        if st.get("last_attempt"):
            last_try.add_metric([t], float(st["last_attempt"]))
        if st.get("duration") is not None:
            duration.add_metric([t], float(st["duration"]))
        if st.get("samples") is not None:
            samples.add_metric([t], float(st["samples"]))
        if st.get("stale_samples") is not None:
            dropped.add_metric([t], float(st["stale_samples"]))
        if inv.get("last_success"):
            inv_ok.add_metric([t], float(inv["last_success"]))
        if inv.get("objects") is not None:
            inv_objects.add_metric([t], float(inv["objects"]))
        for (cluster, metric), blob in sorted(snap.blobs.get(t, {}).items()):
            spec = metric_by_name(metric)
            name = spec.metric if spec else f"vrops_{metric}"
            a = blob_age(blob, now)
            age.add_metric([t, cluster, name], a)
            stale.add_metric([t, cluster, name], 1 if a > stale_after else 0)
    return [store_up, up, last_ok, last_try, duration, samples, dropped, inv_ok, inv_objects,
            age, stale]


def store_down_families() -> list[Metric]:
    store_up = GaugeMetricFamily("vrops_store_up", "1 when the Redis sample store answered.")
    store_up.add_metric([], 0)
    return [store_up]


def _filter_rows(rows: bytes, objects: set[bytes] | None, kinds: set[bytes] | None) -> bytes:
    if objects is None and kinds is None:
        return rows
    return b"".join(
        m.group(0) for m in ROW_RE.finditer(rows)
        if (objects is None or m.group(2) in objects) and (kinds is None or m.group(1) in kinds)
    )


def sample_chunks(
    snap: Snapshot,
    targets: Sequence[str],
    now: float,
    stale_after: float,
    objects: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
) -> list[bytes]:
    """Exposition text of the fresh sample families (fast path)."""
    obj_set = {escape_label(o).encode() for o in objects} if objects else None
    kind_set = {escape_label(k).encode() for k in kinds} if kinds else None
    by_metric: dict[str, list[tuple[str, str, Blob]]] = {}
    for t in targets:
        for (cluster, metric), blob in snap.blobs.get(t, {}).items():
            if blob_age(blob, now) > stale_after:
                continue
            by_metric.setdefault(metric, []).append((t, cluster, blob))
    out: list[bytes] = []
    for metric in sorted(by_metric):
        spec = metric_by_name(metric)
        if spec is None:
            continue
        body: list[bytes] = []
        for t, cluster, blob in sorted(by_metric[metric], key=lambda x: (x[0], x[1])):
            rows = _filter_rows(blob.rows, obj_set, kind_set)
            if not rows:
                continue
            prefix = (f'{spec.metric}{{target="{escape_label(t)}",'
                      f'vccluster="{escape_label(cluster)}",').encode()
            body.append(prefix + rows[:-1].replace(b"\n", b"\n" + prefix) + b"\n")
        if body:
            out.append(f"# HELP {spec.metric} {spec.help}\n# TYPE {spec.metric} gauge\n".encode())
            out.extend(body)
    return out


def render_text(
    snap: Snapshot,
    targets: Sequence[str],
    now: float,
    stale_after: float,
    accept: str | None,
    objects: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
) -> tuple[bytes, str]:
    head, content_type = render_families(status_families(snap, targets, now, stale_after), accept)
    chunks = sample_chunks(snap, targets, now, stale_after, objects, kinds)
    if head.endswith(OPENMETRICS_EOF):
        return head[: -len(OPENMETRICS_EOF)] + b"".join(chunks) + OPENMETRICS_EOF, content_type
    return head + b"".join(chunks), content_type


def json_payload(
    snap: Snapshot,
    targets: Sequence[str],
    now: float,
    stale_after: float,
    objects: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Flat rows for Grafana JSON datasources (Infinity, JSON API)."""
    obj_set = set(objects) if objects else None
    kind_set = set(kinds) if kinds else None
    tstatus: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for t in targets:
        st = snap.target_status(t, "stats")
        tstatus.append({
            "target": t,
            "up": effective_up(st, now, stale_after),
            "last_success_timestamp": st.get("last_success"),
            "last_attempt_timestamp": st.get("last_attempt"),
            "collection_duration_seconds": st.get("duration"),
            "error": st.get("error"),
        })
        for (cluster, metric), blob in sorted(snap.blobs.get(t, {}).items()):
            spec = metric_by_name(metric)
            name = spec.metric if spec else f"vrops_{metric}"
            a = round(blob_age(blob, now), 3)
            if a > stale_after:
                stale.append({"target": t, "vccluster": cluster, "metric": name,
                              "age_seconds": a})
                continue
            for kind, obj, value in blob.iter_rows():
                if (obj_set is not None and obj not in obj_set) or (
                        kind_set is not None and kind not in kind_set):
                    continue
                samples.append({
                    "target": t, "vccluster": cluster, "object_kind": kind, "object": obj,
                    "metric": name, "value": value if math.isfinite(value) else str(value),
                    "timestamp": blob.sample_ts, "age_seconds": a,
                })
    return {"status": "ok", "store_up": True, "generated_at": now, "targets": tstatus,
            "samples": samples, "stale": stale}

