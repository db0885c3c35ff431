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

Each process marks its own slot per client (a hash of the client's scheduling key and
the process id), so the board also tells how many of the server's processes a client is
asking at once (the scheduler paces a throttled client by it). The board is approximate
by design: slots are found by hash with a short probe; a write races with another worker's write at worst
into one wrong mark, which only makes a throttle start or end one mark late. It holds
only hashes and times, never a token or a name. ``time.monotonic`` is the one clock: it is
system-wide on Linux, so marks compare across processes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time

SLOTS = 512
PROBE = 8
_SLOT = struct.Struct("<QQd")  # key hash (0: free), process id, monotonic time of the last mark
WRITE_EVERY = 0.1  # seconds between two marks of one client by one process
READ_EVERY = 0.05  # seconds a scan of the board is reused
FORGET = 60.0  # a mark this old frees its slot for another client

_shared: mmap.mmap | None = None


def share_across_fork() -> None:
    """Create the shared mapping (once, in a server's master process): every Board created
    after this, in this process or in a child forked from it, marks and reads the same one."""
    global _shared
    if _shared is None:
        _shared = mmap.mmap(-1, 2 * SLOTS * _SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1


class Board:
    """Marks of clients' requests, one per client and process: ``others_active`` tells
    whether anybody else asked lately, ``processes`` how many processes a client asked;
    and turns: ``hold_turn``/``turn_elsewhere`` keep a throttled client to one upstream
    query at a time (and its pauses) across the server's processes."""

    def __init__(self) -> None:
        # Two tables: "asked lately" marks, then turns (until when a process holds a client's turn).
        self._map = _shared if _shared is not None else mmap.mmap(-1, 2 * SLOTS * _SLOT.size)
        self._written: dict[int, float] = {}
        self._scan: tuple[float, float, list[tuple[int, int]]] = (-1.0, 0.0, [])  # at, window, (hash, pid)

    def mark(self, key: str) -> None:
        """The client asked now (written at most every WRITE_EVERY seconds per client)."""
        h, pid, now = _hash(key), os.getpid(), time.monotonic()
        if now - self._written.get(h, -1e9) < WRITE_EVERY:
            return
        if len(self._written) > 4 * SLOTS:
            self._written.clear()
        self._written[h] = now
        self._put(0, h, pid, now, now)

    def hold_turn(self, key: str, until: float) -> None:
        """This process holds `key`'s turn until `until` (monotonic): running, then pausing."""
        self._put(SLOTS, _hash(key), os.getpid(), until, time.monotonic())

    def turn_elsewhere(self, key: str) -> float:
        """Until when another process holds `key`'s turn (0.0: none does now)."""
        h, pid, now = _hash(key), os.getpid(), time.monotonic()
        table = memoryview(self._map)[SLOTS * _SLOT.size:]
        return max((t for other, p, t in _SLOT.iter_unpack(table) if other == h and p != pid and t > now),
                   default=0.0)

    def _put(self, base: int, h: int, pid: int, value: float, now: float) -> None:
        start = (h ^ pid * 0x9E3779B97F4A7C15) % SLOTS
        for i in range(PROBE):
            offset = (base + (start + i) % SLOTS) * _SLOT.size
            old, old_pid, at = _SLOT.unpack_from(self._map, offset)
            if (old, old_pid) == (h, pid) or old == 0 or now - at > FORGET:
                _SLOT.pack_into(self._map, offset, h, pid, value)
                return
        _SLOT.pack_into(self._map, (base + start) * _SLOT.size, h, pid, value)  # all taken: evict the first

    def others_active(self, key: str, within: float) -> bool:
        """Whether a client other than `key` asked within the last `within` seconds."""
        h = _hash(key)
        return any(other != h for other, _ in self._recent(within))

    def processes(self, key: str, within: float) -> int:
        """How many processes `key` asked within the last `within` seconds (at least one)."""
        h = _hash(key)
        return max(1, len({pid for other, pid in self._recent(within) if other == h}))

    def _recent(self, within: float) -> list[tuple[int, int]]:
        now = time.monotonic()
        at, window, marks = self._scan
        if now - at > READ_EVERY or window != within:
            table = memoryview(self._map)[:SLOTS * _SLOT.size]
            marks = [(h, pid) for h, pid, t in _SLOT.iter_unpack(table) if h and now - t <= within]
            self._scan = (now, within, marks)
        return marks
