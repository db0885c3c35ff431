"""Redis layout for vROps samples (redis.asyncio).

Keys (all written by the workers, read by the API):

- ``vrops:<cluster>:<metric>:<timestamp>`` - hash, one per vCenter cluster, metric
  and collection cycle (``timestamp`` = cycle start, integer Unix seconds;
  ``metric`` = short name like ``cpu_usage_ratio``). Field
  ``<target>/<object_kind>/<object>``, value the sample in base units. TTL
  ``VROPS_SAMPLE_TTL_SECONDS``: the recent history ops asked for, for ad-hoc reads.
  ``:`` and ``%`` in a cluster name are percent-encoded so the key splits cleanly.
- ``vrops:latest:<target>`` - hash, the index the API reads: field
  ``<metric>|<cluster>``, value a blob (see below) with the newest sample of every
  object of that cluster for that metric. "Latest value per cluster, object and
  metric" is one HGETALL (or HMGET when clusters are named) per target, all
  targets in one pipeline = one round trip. A complete cycle replaces the hash
  atomically (MULTI + RENAME) so vanished clusters go away; a partial cycle
  merges. TTL ``VROPS_LATEST_TTL_SECONDS`` (long): values must go *stale*
  visibly long before they vanish.
- ``vrops:status`` - hash, field ``<target>|stats`` / ``<target>|inventory``, JSON
  with up, last attempt/success, duration, counts (no secrets, no raw errors).
- ``vrops:inventory:<target>`` - JSON list of ``[id, kind, name, cluster]``.
- ``vrops:lock:<task>:<target>`` - SET NX PX with the owner's random token, keeps cycles
  of one target from overlapping. Short TTL, renewed by the owner's heartbeat while it
  works (app/workers/tasks.py), so a killed owner's lock lapses within seconds; renew
  and unlock check the token (only the owner touches its lock).

Bookkeeping writes (the status record, the lock) go through Lua scripts flagged
``allow-oom`` (Redis >= 7): they are a few hundred bytes per target and must land even
when Redis is at ``maxmemory`` with ``noeviction`` and refuses every other write, so the
status can say "the store is full" instead of freezing at its last "up". Older Redis
servers run the same scripts without the flag.

Blob: a header line ``v1 <sample_ts> <collected_at> <rows>`` then one row per
object, already in exposition form minus the metric name and the target/cluster
labels: ``object_kind="vm",object="web-01"} 0.125``. The API turns a blob into
exposition lines with one bytes.replace (C speed), which is what keeps 125k
samples under 100 ms; JSON answers parse the rows back with one regex.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

LATEST_PREFIX = "vrops:latest:"
STATUS_KEY = "vrops:status"
INVENTORY_PREFIX = "vrops:inventory:"
UNCLUSTERED = "_unclustered"

ALLOW_OOM = "#!lua flags=allow-oom\n"
_TAKE_LOCK = "return redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])"
_RENEW_LOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
               "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")
_UNLOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
           "return redis.call('del', KEYS[1]) end return 0")
_SET_STATUS = "return redis.call('hset', KEYS[1], ARGV[1], ARGV[2])"


def lock_key(name: str, target: str) -> str:
    return f"vrops:lock:{name}:{target}"


def escape_label(value: str) -> str:
    """Prometheus text label-value escaping: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def unescape_label(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            n = value[i + 1]
            out.append("\n" if n == "n" else n)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _key_segment(value: str) -> str:
    return value.replace("%", "%25").replace(":", "%3A")


def sample_key(cluster: str, metric: str, timestamp: float) -> str:
    return f"vrops:{_key_segment(cluster)}:{metric}:{int(timestamp)}"


def latest_key(target: str) -> str:
    return f"{LATEST_PREFIX}{target}"


def latest_field(metric: str, cluster: str) -> str:
    return f"{metric}|{cluster}"


def format_value(v: float) -> str:
    if v != v:  # NaN
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


ROW_RE = re.compile(rb'object_kind="((?:[^"\\]|\\.)*)",object="((?:[^"\\]|\\.)*)"\} (\S+)\n')


@dataclass
class Row:
    kind: str
    obj: str
    value: float
    timestamp: float  # vROps sample time, Unix seconds


@dataclass
class Blob:
    """The newest samples of one (target, cluster, metric)."""

    sample_ts: float
    collected_at: float
    count: int
    rows: bytes  # exposition rows, see module doc

    @classmethod
    def parse(cls, raw: bytes) -> Blob:
        nl = raw.find(b"\n")
        head = raw[:nl].split()
        return cls(float(head[1]), float(head[2]), int(head[3]), raw[nl + 1:])

    def iter_rows(self) -> Iterable[tuple[str, str, float]]:
        for m in ROW_RE.finditer(self.rows):
            yield (unescape_label(m.group(1).decode()), unescape_label(m.group(2).decode()),
                   float(m.group(3)))


def encode_blob(rows: Sequence[Row], collected_at: float) -> bytes:
    sample_ts = max((r.timestamp for r in rows), default=collected_at)
    body = "".join(
        f'object_kind="{escape_label(r.kind)}",object="{escape_label(r.obj)}"}} '
        f"{format_value(r.value)}\n"
        for r in rows
    )
    return f"v1 {sample_ts:.3f} {collected_at:.3f} {len(rows)}\n{body}".encode()


@dataclass
class Snapshot:
    """What the API read in one round trip."""

    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<t>|stats" -> json
    blobs: dict[str, dict[tuple[str, str], Blob]] = field(default_factory=dict)

    def target_status(self, target: str, kind: str = "stats") -> dict[str, Any]:
        return self.status.get(f"{target}|{kind}", {})


class VropsStore:
    def __init__(self, redis: Redis, *, sample_ttl: int = 3600, latest_ttl: int = 86400) -> None:
        self.redis = redis
        self.sample_ttl = sample_ttl
        self.latest_ttl = latest_ttl
        self._oom_flag = True

    # -- writes (workers) ------------------------------------------------------------

    async def write_cycle(
        self,
        target: str,
        collected_at: float,
        groups: dict[tuple[str, str], list[Row]],
        *,
        complete: bool,
    ) -> int:
        """Write one stats cycle: history keys plus the latest index. Returns keys written."""
        pipe = self.redis.pipeline(transaction=True)
        latest: dict[str, bytes] = {}
        for (cluster, metric), rows in groups.items():
            if not rows:
                continue
            key = sample_key(cluster, metric, collected_at)
            pipe.hset(key, mapping={f"{target}/{r.kind}/{r.obj}": format_value(r.value)
                                    for r in rows})
            pipe.expire(key, self.sample_ttl)
            latest[latest_field(metric, cluster)] = encode_blob(rows, collected_at)
        lkey = latest_key(target)
        if complete:
            if latest:
                tmp = f"{lkey}:tmp:{uuid.uuid4().hex}"
                pipe.hset(tmp, mapping=latest)  # type: ignore[arg-type]
                pipe.rename(tmp, lkey)
                pipe.expire(lkey, self.latest_ttl)
            else:
                pipe.delete(lkey)
        elif latest:
            pipe.hset(lkey, mapping=latest)  # type: ignore[arg-type]
            pipe.expire(lkey, self.latest_ttl)
        await pipe.execute()
        return len(latest)

    async def _bookkeeping(self, body: str, keys: list[str], args: list[str]) -> Any:
        """Run a small bookkeeping script that may write past maxmemory (see module doc)."""
        if self._oom_flag:
            try:
                return await self.redis.eval(ALLOW_OOM + body, len(keys), *keys, *args)
            except ResponseError as exc:
                if "compiling" not in str(exc) and "flag" not in str(exc).lower():
                    raise
                self._oom_flag = False  # Redis < 7: no script flags
        return await self.redis.eval(body, len(keys), *keys, *args)

    async def set_status(self, target: str, kind: str, status: dict[str, Any]) -> None:
        await self._bookkeeping(_SET_STATUS, [STATUS_KEY], [f"{target}|{kind}", json.dumps(status)])

    async def get_status(self, target: str, kind: str) -> dict[str, Any]:
        raw = await self.redis.hget(STATUS_KEY, f"{target}|{kind}")
        return dict(json.loads(raw)) if raw else {}

    async def save_inventory(self, target: str, items: list[list[str]], ttl: int) -> None:
        await self.redis.set(f"{INVENTORY_PREFIX}{target}", json.dumps(items), ex=ttl)

    async def load_inventory(self, target: str) -> list[list[str]] | None:
        raw = await self.redis.get(f"{INVENTORY_PREFIX}{target}")
        return list(json.loads(raw)) if raw else None

    async def try_lock(self, name: str, target: str, ttl: float) -> str | None:
        """Take the lock for `ttl` seconds; the owner's token, or None when someone holds it."""
        token = uuid.uuid4().hex
        ok = await self._bookkeeping(_TAKE_LOCK, [lock_key(name, target)],
                                     [token, str(max(1, int(ttl * 1000)))])
        return token if ok else None

    async def renew_lock(self, name: str, target: str, token: str, ttl: float) -> bool:
        """Extend the lock to `ttl` from now, if `token` still owns it (False: it lapsed or moved)."""
        ok = await self._bookkeeping(_RENEW_LOCK, [lock_key(name, target)],
                                     [token, str(max(1, int(ttl * 1000)))])
        return bool(ok)

    async def unlock(self, name: str, target: str, token: str) -> None:
        # Only the holder releases: compare-and-delete in one script.
        await self._bookkeeping(_UNLOCK, [lock_key(name, target)], [token])

    # -- reads (API) -------------------------------------------------------------------

    async def read_latest(
        self,
        targets: Sequence[str],
        clusters: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
    ) -> Snapshot:
        """Status plus latest blobs of every target in ONE pipeline round trip.

        With clusters named, HMGET asks for exactly the (metric, cluster) fields;
        otherwise HGETALL per target and metric filtering happens here.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(STATUS_KEY)
        fields: list[str] | None = None
        if clusters and metrics:
            fields = [latest_field(m, c) for m in metrics for c in clusters]
        for t in targets:
            if fields is not None:
                pipe.hmget(latest_key(t), fields)
            else:
                pipe.hgetall(latest_key(t))
        res = await pipe.execute()
        snap = Snapshot()
        for k, v in (res[0] or {}).items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            try:
                snap.status[key] = dict(json.loads(v))
            except ValueError:
                continue
        want_metrics = set(metrics) if metrics else None
        want_clusters = set(clusters) if clusters else None
        for t, raw in zip(targets, res[1:], strict=True):
            pairs: Iterable[tuple[Any, Any]] = (
                zip(fields, raw, strict=True) if fields is not None else raw.items()
            )
            blobs: dict[tuple[str, str], Blob] = {}
            for f, blob in pairs:
                if blob is None:
                    continue
                name = f.decode() if isinstance(f, bytes) else str(f)
                metric, _, cluster = name.partition("|")
                if want_metrics is not None and metric not in want_metrics:
                    continue
                if want_clusters is not None and cluster not in want_clusters:
                    continue
                blobs[(cluster, metric)] = Blob.parse(blob)
            snap.blobs[t] = blobs
        return snap
