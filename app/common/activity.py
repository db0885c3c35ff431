"""Which clients asked lately, seen by every worker process of one server.

Why: the query API's scheduler throttles a client that keeps the upstream busy only
while another client is active (app/gateway/engines/scheduler.py). Under gunicorn each
worker has its own scheduler and sees only the connections it accepted: a flood landing
on one worker and its neighbour's small queries on the other would never meet, and the
flood would run unthrottled beside them. So the "asked lately" marks live on a board of
fixed slots in shared memory: :func:`share_across_fork` (called by ``gunicorn.conf.py``
in the master, before the workers fork) makes every :class:`Board` created afterwards
write to the same anonymous shared mapping. Without it (one uvicorn process, tests)
each board is private to its scheduler.

The board is approximate by design: slots are found by a hash of the client's
scheduling key with a short probe; a write races with another worker's write at worst
into one wrong mark, which only makes a throttle start or end one mark late. It holds
only hashes and times, never a token or a name. ``time.monotonic`` is the one clock: it is
system-wide on Linux, so marks compare across processes.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
import time

SLOTS = 512
PROBE = 8
_SLOT = struct.Struct("<Qd")  # key hash (0: free), monotonic time of the last mark
WRITE_EVERY = 0.1  # seconds between two marks of one client by one process
READ_EVERY = 0.05  # seconds a scan of the board is reused
FORGET = 60.0  # a mark this old frees its slot for another client

_shared: mmap.mmap | None = None


def share_across_fork() -> None:
    """Create the shared mapping (once, in a server's master process): every Board created
    after this, in this process or in a child forked from it, marks and reads the same one."""
    global _shared
    if _shared is None:
        _shared = mmap.mmap(-1, SLOTS * _SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1


class Board:
    """Marks of clients' requests; ``others_active`` tells whether anybody else asked lately."""

    def __init__(self) -> None:
        self._map = _shared if _shared is not None else mmap.mmap(-1, SLOTS * _SLOT.size)
        self._written: dict[int, float] = {}
        self._scan: tuple[float, float, set[int]] = (-1.0, 0.0, set())  # at, window, hashes

    def mark(self, key: str) -> None:
        """The client asked now (written at most every WRITE_EVERY seconds per client)."""
        h, now = _hash(key), time.monotonic()
        if now - self._written.get(h, -1e9) < WRITE_EVERY:
            return
        if len(self._written) > 4 * SLOTS:
            self._written.clear()
        self._written[h] = now
        start = h % SLOTS
        for i in range(PROBE):
            offset = ((start + i) % SLOTS) * _SLOT.size
            old, at = _SLOT.unpack_from(self._map, offset)
            if old in (h, 0) or now - at > FORGET:
                _SLOT.pack_into(self._map, offset, h, now)
                return
        _SLOT.pack_into(self._map, start * _SLOT.size, h, now)  # all taken lately: evict the first

    def others_active(self, key: str, within: float) -> bool:
        """Whether a client other than `key` asked within the last `within` seconds."""
        now = time.monotonic()
        at, window, hashes = self._scan
        if now - at > READ_EVERY or window != within:
            hashes = {h for h, t in _SLOT.iter_unpack(self._map) if h and now - t <= within}
            self._scan = (now, within, hashes)
        return bool(hashes - {_hash(key)})
