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

Overdue collections: a target whose last successful statistics collection is
older than :func:`overdue_after` (three stats intervals, or one interval plus the
collection timeout if that is longer) is not being collected -- workers, broker
or store down, or the status record itself unwritable. Its samples are frozen:
``vrops_up 0``, ``vrops_collection_overdue 1``, every sample flagged stale and
withheld, and the JSON status says why; no waiting for the stale age.
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


def overdue_after(stats_interval: float, collection_timeout: float) -> float:
    """Age of the last successful collection past which collections have stopped.

    A healthy target's last success is at most one interval plus one cycle's
    duration (bounded by the collection timeout) old; three intervals leave room
    for a missed beat or two.
    """
    return max(3 * stats_interval, stats_interval + collection_timeout)


def collection_overdue(status: dict[str, Any], now: float, overdue: float | None) -> bool:
    """True when no collection has succeeded within `overdue` seconds (None: not checked)."""
    if overdue is None:
        return False
    return now - float(status.get("last_success") or 0) > overdue


def effective_up(status: dict[str, Any], now: float, stale_after: float,
                 overdue: float | None = None) -> int:
    """The worker's last verdict, unless nobody has attempted (or achieved) a collection recently."""
    if not status or not status.get("up"):
        return 0
    last = float(status.get("last_attempt") or 0)
    if now - last > stale_after or collection_overdue(status, now, overdue):
        return 0
    return 1


def status_error(status: dict[str, Any], now: float, overdue: float | None) -> str | None:
    """The worker's recorded error, or why the API itself considers the target down."""
    if status.get("error"):
        return str(status["error"])
    if collection_overdue(status, now, overdue):
        last = status.get("last_success")
        since = f"last success {now - float(last):.0f}s ago" if last else "no successful collection yet"
        return f"collection overdue: {since} (workers, broker or store not collecting)"
    return None


def status_families(
    snap: Snapshot, targets: Sequence[str], now: float, stale_after: float,
    overdue: float | None = None,
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
        "1 when the samples are older than the stale age, or their target's collection is "
        "overdue, and withheld from the value series.",
        labels=["target", "vccluster", "metric"])
    late = GaugeMetricFamily(
        "vrops_collection_overdue",
        "1 when no statistics collection of the target has succeeded for three intervals "
        "(or one interval plus the collection timeout): its samples are frozen.",
        labels=["target"])
    for t in targets:
        st = snap.target_status(t, "stats")
        inv = snap.target_status(t, "inventory")
        frozen = collection_overdue(st, now, overdue)
        up.add_metric([t], effective_up(st, now, stale_after, overdue))
        if overdue is not None:
            late.add_metric([t], 1 if frozen else 0)
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
            stale.add_metric([t, cluster, name], 1 if frozen or a > stale_after else 0)
    return [store_up, up, late, last_ok, last_try, duration, samples, dropped, inv_ok, inv_objects,
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
    overdue: float | None = None,
) -> list[bytes]:
    """Exposition text of the fresh sample families (fast path)."""
    obj_set = {escape_label(o).encode() for o in objects} if objects else None
    kind_set = {escape_label(k).encode() for k in kinds} if kinds else None
    by_metric: dict[str, list[tuple[str, str, Blob]]] = {}
    for t in targets:
        if collection_overdue(snap.target_status(t, "stats"), now, overdue):
            continue
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
    overdue: float | None = None,
) -> tuple[bytes, str]:
    head, content_type = render_families(status_families(snap, targets, now, stale_after, overdue), accept)
    chunks = sample_chunks(snap, targets, now, stale_after, objects, kinds, overdue)
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
    overdue: float | None = None,
) -> dict[str, Any]:
    """Flat rows for Grafana JSON datasources (Infinity, JSON API)."""
    obj_set = set(objects) if objects else None
    kind_set = set(kinds) if kinds else None
    tstatus: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for t in targets:
        st = snap.target_status(t, "stats")
        frozen = collection_overdue(st, now, overdue)
        tstatus.append({
            "target": t,
            "up": effective_up(st, now, stale_after, overdue),
            "overdue": frozen,
            "last_success_timestamp": st.get("last_success"),
            "last_attempt_timestamp": st.get("last_attempt"),
            "collection_duration_seconds": st.get("duration"),
            "error": status_error(st, now, overdue),
        })
        for (cluster, metric), blob in sorted(snap.blobs.get(t, {}).items()):
            spec = metric_by_name(metric)
            name = spec.metric if spec else f"vrops_{metric}"
            a = round(blob_age(blob, now), 3)
            if frozen or a > stale_after:
                stale.append({"target": t, "vccluster": cluster, "metric": name,
                              "age_seconds": a, "reason": "overdue" if frozen else "age"})
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

