"""Gunicorn settings for the gateway: uvicorn workers + prometheus_client multiprocess mode.

Run from the repository root::

    PROMETHEUS_MULTIPROC_DIR=/run/metrics-gateway gunicorn -c gunicorn.conf.py app.main:app

With several workers each one is a separate process with its own metrics; for
GET /metrics to report the whole server, every worker writes its samples to
mmap files in ``PROMETHEUS_MULTIPROC_DIR`` and the worker answering a scrape
merges them (app/monitoring/registry.py). Three hooks keep that directory right:

``on_starting``  (master, once) creates the directory and empties it, so counts
                 from a previous run are not added to this one.
``child_exit``   (master, each dead worker) ``compact_dead_worker(pid)``
                 (app/monitoring/registry.py): drops the dead worker's ``live*``
                 gauges, folds its counters, histograms and max/min/sum/mostrecent
                 gauges into one archive file set and deletes its files. Totals stay
                 exact and a scrape costs the same after 1,000 recycled workers as
                 after none.
``on_exit``      (master) removes the directory if this file created it.

``on_starting`` also creates the workers' shared "who asked lately" board of the query
API's scheduler (app/common/activity.py), so the fair scheduler's throttle of a flooding
client sees its neighbours on every worker.

If ``PROMETHEUS_MULTIPROC_DIR`` is unset, a private temporary directory is
created here, before any worker imports prometheus_client, and exported to the
workers (they are forked from this process and inherit its environment).

Module-level names are gunicorn settings; helpers are underscored so gunicorn
does not read them as settings.
"""

from __future__ import annotations

import os as _os
import shutil as _shutil
import tempfile as _tempfile
from pathlib import Path as _Path
from typing import Any as _Any

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_created_dir: str | None = None
if not _os.environ.get(_MULTIPROC_ENV):
    _created_dir = _tempfile.mkdtemp(prefix="metrics-gateway-prom-")
    _os.environ[_MULTIPROC_ENV] = _created_dir


bind = _os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(_os.environ.get("WEB_CONCURRENCY", "2"))
# The gateway's uvicorn worker (app/ops/server.py): a request read timeout, a
# connection cap per worker and accept() errors logged once per episode. Stock
# UvicornWorker holds slow and silent clients for ever and ignores worker_connections.
worker_class = "app.ops.server.GatewayUvicornWorker"
# Connections one worker holds at most (never more than its open-file limit allows);
# at the cap the oldest idle one makes room. HTTP_REQUEST_READ_TIMEOUT_SECONDS
# (default 10) bounds how long a client may take to send a request.
worker_connections = int(_os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
backlog = int(_os.environ.get("GUNICORN_BACKLOG", "2048"))
# Idle kept-alive connections are closed after this many seconds.
keepalive = int(_os.environ.get("GUNICORN_KEEPALIVE", "5"))
# gunicornc's control socket: nothing here uses it, and in the image the home
# directory it defaults to is not writable.
control_socket_disable = True
# Worker recycling (off unless asked for): a dead worker's metric files are
# compacted into an archive by child_exit, so they do not pile up.
max_requests = int(_os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
max_requests_jitter = int(_os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "0"))
graceful_timeout = int(_os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
timeout = int(_os.environ.get("GUNICORN_TIMEOUT", "60"))
accesslog = _os.environ.get("GUNICORN_ACCESSLOG") or None


def _multiproc_dir() -> _Path:
    return _Path(_os.environ[_MULTIPROC_ENV])


def on_starting(server: _Any) -> None:
    """Create the multiprocess directory and delete what a previous run left in it."""
    path = _multiproc_dir()
    path.mkdir(parents=True, exist_ok=True)
    # Empty it rather than removing it: it may be a mount point (emptyDir, tmpfs).
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            _shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    server.log.info("prometheus multiprocess directory %s emptied", path)
    # The query API's "who asked lately" board (app/common/activity.py), shared by the
    # workers forked after this: a client's flood on one worker is throttled while its
    # neighbour asks on another. Standard library only: nothing else of the app loads here.
    from app.common.activity import share_across_fork

    share_across_fork()


def child_exit(server: _Any, worker: _Any) -> None:
    """A worker died (exit, crash, SIGKILL or recycling): fold its metric files into the archive."""
    from app.monitoring.registry import compact_dead_worker

    try:
        compact_dead_worker(str(_multiproc_dir()), worker.pid)
    except Exception as exc:  # the master must survive; the files stay and are still merged
        server.log.warning("metric files of worker %s not compacted: %r", worker.pid, exc)


def on_exit(server: _Any) -> None:
    if _created_dir is not None:
        _shutil.rmtree(_created_dir, ignore_errors=True)
