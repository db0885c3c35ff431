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

``SafeMultiProcessCollector`` differs from prometheus_client's collector in one
way: a file that cannot be read (the 0-byte file a worker killed while creating
it leaves behind, or a truncated one) is skipped and logged instead of failing
the whole scrape. It also reports how many files it merged and skipped, so the
pile-up of files from recycled workers is visible and can be alerted on.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


class SafeMultiProcessCollector(MultiProcessCollector):
    """MultiProcessCollector that skips unreadable files instead of failing the scrape."""

    def __init__(self, registry: CollectorRegistry | None, path: str | None = None) -> None:
        super().__init__(registry, path)  # type: ignore[no-untyped-call]
        self.stats = MergeStats()

    def collect(self) -> Iterable[Metric]:
        path: str = self._path
        files = sorted(glob.glob(os.path.join(path, "*.db")))
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
        self.stats = MergeStats(files=len(files), skipped=len(skipped))
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

