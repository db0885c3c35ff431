"""Which registry a scrape renders, and how it is rendered.

Single process: the default ``REGISTRY``, where every metric of this package
(and the process/platform/GC collectors) lives.

Multiprocess (``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client was
imported, e.g. under gunicorn with several workers): every worker writes its
samples to mmap files in that directory, and a scrape -- whichever worker
answers it -- builds a fresh ``CollectorRegistry`` holding a
:class:`SafeMultiProcessCollector` that merges all the files. Merging is file
I/O and CPU work, so callers run :func:`render` in a worker thread, never on
the event loop.

``SafeMultiProcessCollector`` differs from prometheus_client's collector in two
ways: a file that cannot be read (the 0-byte file a worker killed while creating
it leaves behind, or a truncated one) is skipped and logged instead of failing
the whole scrape; and dead workers' files are read from one compacted archive.

Dead workers (recycling with GUNICORN_MAX_REQUESTS, crashes): prometheus_client
leaves each dead worker's files behind for ever (4 per worker here), and every
scrape merges them all -- 0.17 ms more per dead worker, 230 ms at 1,000.
:func:`compact_dead_worker` (gunicorn's ``child_exit`` hook, in the master) folds
a dead worker's files into one archive file set and deletes them, so a scrape
reads the live workers' files plus a constant-size archive, however many workers
have come and gone:

- counters, histograms, summaries: summed into the archive -- totals stay exact;
- gauges by ``multiprocess_mode``: ``max``/``min`` keep the extreme, ``sum``
  adds, ``mostrecent`` keeps the newest (by its timestamp), so the merged value
  is what it would have been with the dead worker's file kept; ``live*`` are
  dropped (they describe living processes), and so is ``all`` (a per-pid series
  of a process that no longer exists).

The archive is a generation directory ``archive.<n>`` named by the symlink
``archive.current``, replaced atomically. A scrape resolves the link, reads that
generation (its manifest lists pids whose files are already in it, skipped if
still present), the live files, and resolves the link again: if it moved, the
scrape is redone (bounded), so a compaction never makes a counter jump or dip.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import json
import logging
import os
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.common.exposition import accepts_gzip, negotiate

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Smallest valid file: the 8-byte header (4-byte "used" length + padding).
_HEADER_BYTES = 8
# Errors reading one damaged file raises inside prometheus_client.
_READ_ERRORS = (struct.error, RuntimeError, ValueError, UnicodeDecodeError, OSError)


def multiprocess_dir() -> str | None:
    """The multiprocess directory if multiprocess mode is on in this process, else None."""
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return path or None


def multiprocess_values_active() -> bool:
    """True when prometheus_client chose mmap-file values at import time.

    The value class is fixed when prometheus_client is first imported; setting the
    variable later leaves metrics in memory, where a multiprocess scrape cannot
    see them.
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _readable(path: str) -> bool:
    """Cheap check that a file can be merged: size and header are sane, keys decode."""
    try:
        if os.path.getsize(path) < _HEADER_BYTES:
            return False
        for _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
            pass
    except FileNotFoundError:
        return False  # removed by mark_process_dead between glob and read
    except _READ_ERRORS:
        return False
    return True


@dataclass
class MergeStats:
    files: int = 0
    skipped: int = 0
    compacted: int = 0


# -- the archive of dead workers -------------------------------------------------------------

ARCHIVE_LINK = "archive.current"
_MANIFEST = "manifest.json"
_LOCK = "archive.lock"
# Types whose dead-worker values are summed, and gauge modes kept (with how).
_SUMMED = ("counter", "histogram", "summary")
_GAUGE_KEPT = ("max", "min", "sum", "mostrecent")
_SCRAPE_ATTEMPTS = 3


@dataclass
class Archive:
    """One generation of the archive: its directory (None: none yet) and manifest.

    ``skip``: files already folded into this generation that may still exist for a
    moment (compaction deletes them right after publishing it), by file name, with
    the identity (inode, ctime) they had: a file of the same name made later by a
    new worker that got the same pid is not skipped.
    """

    directory: str | None
    generation: int = 0
    skip: dict[str, tuple[int, int]] = field(default_factory=dict)
    compacted: int = 0

    def skips(self, filename: str) -> bool:
        ident = self.skip.get(os.path.basename(filename))
        if ident is None:
            return False
        try:
            st = os.stat(filename)
        except OSError:
            return True
        return (st.st_ino, st.st_ctime_ns) == ident

    @property
    def files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.directory, "*.db"))) if self.directory else []


def current_archive(path: str) -> Archive:
    """The generation ``archive.current`` names now."""
    link = os.path.join(path, ARCHIVE_LINK)
    try:
        target = os.readlink(link)
    except OSError:
        return Archive(None)
    directory = os.path.join(path, target)
    try:
        with open(os.path.join(directory, _MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return Archive(directory)
    skip = {str(name): (int(ident[0]), int(ident[1])) for name, ident in manifest.get("skip", {}).items()}
    return Archive(directory, int(manifest.get("generation", 0)), skip, int(manifest.get("compacted", 0)))


def _kind_of(filename: str) -> tuple[str, str] | None:
    """(type, gauge mode or "") of a worker file, None for a name we do not know."""
    parts = os.path.basename(filename)[:-3].split("_")
    if len(parts) == 2 and parts[0] in _SUMMED:
        return parts[0], ""
    if len(parts) == 3 and parts[0] == "gauge":
        return "gauge", parts[1]
    return None


def _archive_name(typ: str, mode: str) -> str:
    return f"gauge_{mode}_archive.db" if typ == "gauge" else f"{typ}_archive.db"


Values = dict[str, tuple[float, float]]  # mmap key -> (value, timestamp)


def _read(filename: str) -> Values:
    return {key: (value, ts) for key, value, ts, _ in
            MmapedDict.read_all_values_from_file(filename)}  # type: ignore[no-untyped-call]


def _fold(into: Values, dead: Values, typ: str, mode: str) -> None:
    """Merge a dead worker's values into the archive's, the way a scrape would merge them."""
    for key, (value, ts) in dead.items():
        old = into.get(key)
        if old is None:
            into[key] = (value, ts)
        elif typ in _SUMMED or mode == "sum":
            into[key] = (old[0] + value, max(old[1], ts))
        elif mode == "max":
            into[key] = (max(old[0], value), max(old[1], ts))
        elif mode == "min":
            into[key] = (min(old[0], value), max(old[1], ts))
        elif mode == "mostrecent" and ts > old[1]:
            into[key] = (value, ts)


def _write(filename: str, values: Values) -> None:
    db = MmapedDict(filename)  # type: ignore[no-untyped-call]
    try:
        for key, (value, ts) in values.items():
            db.write_value(key, value, ts)  # type: ignore[no-untyped-call]
    finally:
        db.close()  # type: ignore[no-untyped-call]


def _publish(path: str, generation: int, data: dict[tuple[str, str], Values],
             manifest: dict[str, object]) -> str:
    """Write generation `generation` and point ``archive.current`` at it. Returns its directory."""
    name = f"archive.{generation}"
    final = os.path.join(path, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    for (typ, mode), kept in data.items():
        if kept:
            _write(os.path.join(tmp, _archive_name(typ, mode)), kept)
    with open(os.path.join(tmp, _MANIFEST), "w") as out:
        json.dump({**manifest, "generation": generation}, out)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    link_tmp = os.path.join(path, ARCHIVE_LINK + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link_tmp)
    os.symlink(name, link_tmp)
    os.replace(link_tmp, os.path.join(path, ARCHIVE_LINK))
    return final


def compact_dead_worker(path: str, pid: int) -> int:
    """Fold dead worker `pid`'s metric files into the archive and delete them.

    Call it once the worker is gone (gunicorn ``child_exit``; it also does what
    ``mark_process_dead`` does). Returns the number of its files removed. File I/O
    proportional to the number of series, not to the number of workers that died
    before: a few milliseconds.
    """
    suffix = f"_{pid}.db"
    with open(os.path.join(path, _LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = os.listdir(path)
        dead = sorted(os.path.join(path, e) for e in entries if e.endswith(suffix))
        if not dead:
            return 0
        current = current_archive(path)
        data: dict[tuple[str, str], Values] = {}
        for f in current.files:
            kind = _kind_of(f.replace("_archive.db", "_0.db"))  # archive files are named like a pid 0
            if kind is not None:
                data[kind] = _read(f)
        skip: dict[str, tuple[int, int]] = {}
        folded: list[str] = []
        for f in dead:
            kind = _kind_of(f)
            if kind is None:
                continue  # not a metric file we know: left alone
            folded.append(f)
            typ, mode = kind
            if typ == "gauge" and mode not in _GAUGE_KEPT:
                continue  # live* and all: series of a process that is gone
            try:
                st = os.stat(f)
                values = _read(f)
            except _READ_ERRORS as exc:
                log.warning("dead worker %d: unreadable metric file %s dropped (%s)", pid, f, exc)
                continue
            _fold(data.setdefault(kind, {}), values, typ, mode)
            skip[os.path.basename(f)] = (st.st_ino, st.st_ctime_ns)
        # 1. The new generation, which says "these files are in me: skip them".
        final = _publish(path, current.generation + 1, data,
                         {"skip": skip, "compacted": current.compacted + 1})
        # 2. They can go; so can older generations (a scrape still reading one
        #    notices that the link moved and reads again).
        removed = 0
        for f in folded:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
                removed += 1
        for e in entries:
            d = os.path.join(path, e)
            if e.startswith("archive.") and e != ARCHIVE_LINK and d != final and os.path.isdir(d) \
                    and not os.path.islink(d):
                shutil.rmtree(d, ignore_errors=True)
        return removed


class SafeMultiProcessCollector(MultiProcessCollector):
    """MultiProcessCollector over live files plus the archive; skips unreadable files."""

    def __init__(self, registry: CollectorRegistry | None, path: str | None = None) -> None:
        super().__init__(registry, path)  # type: ignore[no-untyped-call]
        self.stats = MergeStats()

    def collect(self) -> Iterable[Metric]:
        path: str = self._path
        merged: list[Metric] = []
        for _ in range(_SCRAPE_ATTEMPTS):
            archive = current_archive(path)
            merged = self._merge_once(path, archive)
            if current_archive(path).directory == archive.directory:
                break  # no compaction moved the archive while we read: consistent
        return merged

    def _merge_once(self, path: str, archive: Archive) -> list[Metric]:
        files = [f for f in sorted(glob.glob(os.path.join(path, "*.db"))) if not archive.skips(f)]
        files += archive.files
        # Fast path: skip only empty/short files (stat is cheap) and merge the rest.
        usable = [f for f in files if _size(f) >= _HEADER_BYTES]
        try:
            merged = list(self.merge(usable, accumulate=True))  # type: ignore[no-untyped-call]
        except _READ_ERRORS as exc:
            # Slow path: find the damaged file(s) and merge without them.
            log.warning("multiprocess merge failed (%s); checking files one by one", exc)
            usable = [f for f in usable if _readable(f)]
            merged = list(self.merge(usable, accumulate=True))  # type: ignore[no-untyped-call]
        skipped = sorted(set(files) - set(usable))
        for f in skipped:
            if os.path.exists(f):
                log.warning("skipping unreadable prometheus multiprocess file %s", f)
        self.stats = MergeStats(files=len(files), skipped=len(skipped), compacted=archive.compacted)
        return merged


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _MergeStatsCollector(Collector):
    """Reports the multiprocess directory's health, evaluated after the merge."""

    def __init__(self, source: SafeMultiProcessCollector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source.stats
        yield GaugeMetricFamily(
            "metrics_gateway_multiproc_files",
            "Metric files in PROMETHEUS_MULTIPROC_DIR merged by this scrape "
            "(grows with worker restarts; thousands make scrapes slow).",
            value=stats.files,
        )
        yield GaugeMetricFamily(
            "metrics_gateway_multiproc_skipped_files",
            "Unreadable (empty or corrupt) files skipped by this scrape.",
            value=stats.skipped,
        )
        yield GaugeMetricFamily(
            "metrics_gateway_multiproc_compacted_workers",
            "Dead workers whose metric files were folded into the archive and deleted "
            "(their counts live on in the totals).",
            value=stats.compacted,
        )


def scrape_registry() -> CollectorRegistry:
    """The registry to render for one scrape (fresh and merged in multiprocess mode)."""
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    collector = SafeMultiProcessCollector(None, path)
    # Order matters: the merge runs first and fills the stats reported after it.
    registry.register(collector)
    registry.register(_MergeStatsCollector(collector))
    return registry


_warned_lock = threading.Lock()
_warned = False


def _warn_once_if_misconfigured() -> None:
    global _warned
    if _warned:
        return
    with _warned_lock:
        if _warned:
            return
        _warned = True
        if multiprocess_dir() is not None and not multiprocess_values_active():
            log.warning(
                "%s is set but prometheus_client was imported before it was; this "
                "process's metrics stay in memory and are missing from merged scrapes",
                MULTIPROC_ENV,
            )


@dataclass(frozen=True)
class Rendered:
    body: bytes
    content_type: str
    gzipped: bool


def render(accept: str | None, accept_encoding: str | None) -> Rendered:
    """Collect and encode one scrape. Blocking: call it from a worker thread."""
    _warn_once_if_misconfigured()
    encoder, content_type = negotiate(accept)
    body: bytes = encoder(scrape_registry())
    if accepts_gzip(accept_encoding):
        return Rendered(gzip.compress(body, compresslevel=5), content_type, True)
    return Rendered(body, content_type, False)

