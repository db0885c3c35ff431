"""Who may spend the gateway's and the upstream's work next: fair, bounded, within deadlines.

Two lanes, one mechanism (:class:`FairQueue`):

- ``upstream``: query API requests in flight to the upstream, at most
  ``settings.api_upstream_slots`` at once (the rest of the connection pool is the
  figures': they never wait here, which is their bulkhead), and at most a client's
  ``max_concurrent_queries`` for one client;
- ``heavy``: CPU-heavy work on big answers (decoding, assembling), ``API_HEAVY_WORKERS``
  jobs at once in worker threads, so one client's megabyte answers take their turn
  with everybody else's instead of holding the interpreter for all of them.

Waiting work is served round-robin across clients (each client with work waiting gets
one turn per round, so a client with forty requests queued cannot starve one with one),
bounded per client (``max_queued_queries``) and in total (``API_MAX_WAITING_QUERIES``),
and each waiter leaves at its own deadline (:class:`Rejected`, a 429 for the caller) or
when its caller goes away (cancellation).

The request's :class:`Ticket` (client, effective limits, timings) rides in a context
variable set at the HTTP edge, so every part of the work a request causes asks for
permission here, including fetches spawned as their own tasks (which copy the context):
``async with scheduler.upstream.slot(ticket, deadline=...)`` around an upstream request
(the upstream client does it for the query API's categories), :func:`heavy` around CPU
work. The parts of a long range query split by interval (issue 21) ask the same way,
each for its own slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.common import tracing
from app.common.activity import Board
from app.common.clients import Client, Limits
from app.gateway import metrics as gm
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.jsonsteps import paused_gc

_T = TypeVar("_T")


_Body = bytes  # (Stats has a field named `bytes`)


class Rejected(UpstreamError):
    """No slot for this request: its client's queue (or the gateway's) is full, or its
    deadline passed while it waited. An UpstreamError so that it travels the same paths
    as upstream failures (shared fetches hand it to their waiters); never counted by the
    breaker (nothing was asked)."""

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__("rejected", message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True)
class Stats:
    """What one request cost, for Server-Timing, the slow-query log and the metrics."""

    queue_seconds: float = 0.0
    upstream_seconds: float = 0.0
    heavy_seconds: float = 0.0
    upstream_queries: int = 0
    # What the route learned about the query (for the slow-query log).
    start: float | None = None
    end: float | None = None
    step: float | None = None
    time: float | None = None
    series: int | None = None
    bytes: int | None = None
    answer: _Body | None = None  # the body sent, its series counted only if the log line needs them


@dataclass(eq=False, slots=True)
class Ticket:
    """One API request's standing: who asks, under which limits, what it has spent."""

    client: Client
    limits: Limits
    scheduler: Scheduler
    stats: Stats = field(default_factory=Stats)
    deadline: float | None = None  # event-loop time by which the request must be answered
    lanes: set[str] = field(default_factory=set)  # lanes where one of its parts has had a turn
    refused: Rejected | None = None  # one part refused for the deadline: the others are too
    throttled: bool = False  # a turn of its was paced (its client keeps the upstream busy)

    @property
    def label(self) -> str:
        return self.client.label


_current: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("gateway_ticket", default=None)

# A waiter gives up this long before its request's deadline, so that its caller hears "not
# your turn" (429) rather than the request's own timeout (503).
GIVE_UP_EARLY = 0.1


def throttled(ticket: Ticket) -> Rejected:
    """The refusal of a request whose deadline went on the turns its client was paced to
    (counted against the client as ``throttled``)."""
    gm.client_rejected(ticket.label, "throttled")
    return Rejected("throttled", f"client {ticket.label!r} keeps the upstream busy while others wait, so its "
                    "queries take turns; this one did not finish before its deadline; retry later", 1.0)


def current() -> Ticket | None:
    """The ticket of the API request this code runs for (None for the figures and background work)."""
    return _current.get()


def enter(ticket: Ticket) -> contextvars.Token[Ticket | None]:
    return _current.set(ticket)


def leave(token: contextvars.Token[Ticket | None]) -> None:
    _current.reset(token)


@dataclass(eq=False, slots=True)
class _Waiter:
    fut: asyncio.Future[None]
    cost: int
    limit: int
    request: int  # id() of the ticket: parts of one request are one request in the queue


@dataclass(eq=False, slots=True)
class _Client:
    key: str
    running: int = 0
    not_before: float = 0.0  # monotonic time of its next turn at the earliest (paced)
    units: int = 0  # capacity held
    waiting: deque[_Waiter] = field(default_factory=deque)
    served_at: int = 0  # the grant counter at its last grant: least recently served goes first


BYTES_PER_UNIT = 2 * 1024 * 1024
# A client keeping the upstream busy this many seconds per second (its slots' time, decayed
# over USAGE_SECONDS) is heavy: while another client has asked within ACTIVE_SECONDS, a heavy
# client runs one upstream request at a time, so the upstream's other cores stay free for the
# others' small queries (on a 2-core Prometheus, a week-long flood at two parts at once made
# a neighbour's p90 16x its quiet p90; at one, 2.5x). Alone, it uses its whole limit: the
# throttle costs nothing when nobody else asks. A dashboard's refresh is a burst of small
# queries, far below half an upstream second per second.
HEAVY_SHARE = 0.5
USAGE_SECONDS = 5.0
ACTIVE_SECONDS = 1.0
# ... and, throttled, it waits PACE times its last slot's time before its next turn: the
# upstream (2 cores here, shared with the gateway and the clients themselves) is kept just
# short of saturation, where a small query's wait grows fastest. The flood keeps ~80% of
# one upstream core, whichever of a server's workers its requests land on.
PACE = 0.25
TURN_LEASE_SECONDS = 60.0  # a turn held by a process that died is free after this at the latest
TURN_POLL_SECONDS = 0.1  # a turn held elsewhere is looked at again after this at the latest


class _Moving(dict[str, float]):
    """Moving averages by client key, bounded in entries (cleared when full: they relearn)."""

    MAX_KEYS = 4096

    def add(self, key: str, value: float) -> None:
        if len(self) >= self.MAX_KEYS and key not in self:
            self.clear()
        old = self.get(key)
        self[key] = value if old is None else 0.7 * old + 0.3 * value


class _Usage(dict[str, tuple[float, float]]):
    """Upstream seconds per second by client key, decayed over USAGE_SECONDS; bounded in
    entries like _Moving."""

    def add(self, key: str, seconds: float, now: float) -> None:
        if len(self) >= _Moving.MAX_KEYS and key not in self:
            self.clear()
        self[key] = (self._decayed(key, now) + seconds, now)

    def share(self, key: str, now: float) -> float:
        return self._decayed(key, now) / USAGE_SECONDS

    def _decayed(self, key: str, now: float) -> float:
        busy, at = self.get(key, (0.0, now))
        return busy * math.exp(-(now - at) / USAGE_SECONDS)


class FairQueue:
    """`capacity` units shared by clients, handed out round-robin to the clients waiting."""

    def __init__(self, name: str, capacity: int, max_waiting: int, board: Board | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self.waiting = 0
        self._clients: dict[str, _Client] = {}
        self._ring: dict[str, _Client] = {}  # clients with waiters
        self._grants = 0
        # Per client: how long its slots are held (moving average), and how big its answers
        # are: the work one of its requests costs, learned from the last ones.
        self.held = _Moving()
        self.sizes = _Moving()
        self.usage = _Usage()
        # Who asked lately, across the server's workers (app/common/activity.py): the
        # scheduler's lanes share one.
        self.board = board or Board()
        self._timer: asyncio.TimerHandle | None = None

    def cost_of(self, ticket: Ticket) -> int:
        """Units one upstream request of this client takes: 1, plus one per BYTES_PER_UNIT its
        recent answers had (at most half the capacity). A client pulling megabyte answers gets
        fewer of them in flight at once, leaving the upstream's CPU to the others."""
        return min(1 + int(self.sizes.get(ticket.client.key, 0.0) // BYTES_PER_UNIT), self.max_cost)

    @property
    def max_cost(self) -> int:
        return max(1, self.capacity // 4)

    @property
    def client_units(self) -> int:
        """Capacity one client may hold: half (all of it when it is one unit), so that
        another client's first request never waits for a turn."""
        return max(1, self.capacity // 2)

    def _fits(self, state: _Client, cost: int, limit: int) -> bool:
        throttled = self._throttled(state.key)
        if not (state.running < (1 if throttled else limit) and self.in_use + cost <= self.capacity
                and state.units + cost <= self.client_units and state.not_before <= time.monotonic()):
            return False
        if self.name == "upstream" and throttled:
            # One turn at a time across the server's workers: wait while another holds it.
            until = self.board.turn_elsewhere(state.key)
            if until > 0.0:
                self._wake(until)
                return False
        return True

    def _wake(self, at: float) -> None:
        """Dispatch again at monotonic time `at` (a turn held elsewhere ends; bounded wait)."""
        if self._timer is not None:
            return
        delay = min(max(0.005, at - time.monotonic()), TURN_POLL_SECONDS)

        def fire() -> None:
            self._timer = None
            self._dispatch()

        self._timer = asyncio.get_running_loop().call_later(delay, fire)

    def _limit(self, key: str, limit: int) -> int:
        """A client's concurrency now: one for a heavy client while others are active."""
        return 1 if limit > 1 and self._throttled(key) else limit

    def _throttled(self, key: str) -> bool:
        """A client keeping the upstream busy while another client is active."""
        return (self.usage.share(key, time.monotonic()) >= HEAVY_SHARE
                and self.board.others_active(key, ACTIVE_SECONDS))

    @asynccontextmanager
    async def slot(self, ticket: Ticket, *, cost: int = 1, deadline: float | None = None,
                   limit: int | None = None, queue: int | None = None) -> AsyncIterator[None]:
        """Hold `cost` units (at least one, at most a quarter of the capacity) and one of the
        client's `limit` concurrent slots (default: its ``max_concurrent_queries``) while the
        body runs; one client holds at most half the capacity.

        `deadline`: event-loop time by which the slot must be granted, else Rejected;
        `queue`: how many of the client's requests may wait (default: its ``max_queued_queries``).
        """
        if ticket.refused is not None:
            raise ticket.refused
        cost = max(1, min(cost, self.max_cost))
        limit = limit or ticket.limits.max_concurrent_queries or self.capacity
        key = ticket.client.key
        state = self._clients.setdefault(key, _Client(key))
        self.board.mark(key)
        started = time.perf_counter()
        if not self._ring and self._fits(state, cost, limit):
            self._grant(state, cost)
        else:
            with tracing.span("scheduler wait", {"gateway.lane": self.name, "gateway.client": ticket.label}):
                await self._wait(ticket, state, cost, limit, deadline,
                                 ticket.limits.max_queued_queries if queue is None else queue)
        waited = time.perf_counter() - started
        ticket.stats.queue_seconds += waited
        gm.client_queue_wait(ticket.label, self.name, waited)
        expected = self._expected(ticket, state, limit)
        if (deadline is not None and expected is not None and self.name not in ticket.lanes
                and state.running + len(state.waiting) > 1
                and asyncio.get_running_loop().time() + expected > deadline):
            # Its turn came too late for what its queries take: not started only to time
            # out (a client's lone query always runs, so the estimate keeps learning; the
            # other parts of a request under way are not refused half way through).
            self._release(key, state, cost)
            refused = self._reject(ticket, "deadline", f"client {ticket.label!r}: its queries take "
                                   f"{expected:.1f}s and this one's deadline is nearer; retry later")
            self._refuse_request(ticket, state, refused)
            raise refused
        ticket.lanes.add(self.name)
        turn = self.name == "upstream" and self._throttled(key)
        if turn:
            ticket.throttled = True
            self.board.hold_turn(key, time.monotonic() + TURN_LEASE_SECONDS)
        held_from = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - held_from
            self.held.add(key, spent)
            self.usage.add(key, spent, time.monotonic())
            if turn or self._throttled(key):
                # Its next turn, in this worker or another, comes after a pause.
                pause = PACE * spent
                state.not_before = time.monotonic() + pause
                if turn:
                    self.board.hold_turn(key, state.not_before)
                asyncio.get_running_loop().call_later(pause, self._dispatch)
            self._release(key, state, cost)

    def _expected(self, ticket: Ticket, state: _Client, limit: int) -> float | None:
        """How long the request will hold this lane, from its client's recent slots: its
        parts waiting with this one run at most the client's current concurrency at once
        (a week split in eight parts, one at a time, takes eight slots' time)."""
        key = ticket.client.key
        held = self.held.get(key)
        if held is None:
            return None
        parts = 1 + sum(1 for w in state.waiting if w.request == id(ticket))
        # Throttled, its turns are taken one at a time by all the server's workers it asks.
        paced = self.board.processes(key, ACTIVE_SECONDS) * (1 + PACE) if self._throttled(key) else 1.0
        return held * math.ceil(parts / max(1, self._limit(key, limit))) * paced

    @staticmethod
    def _refuse_request(ticket: Ticket, state: _Client, refused: Rejected) -> None:
        """The whole request is refused: its later parts at once, and those waiting here leave
        with the refusal (their waiters see it when they wake)."""
        ticket.refused = refused
        for w in state.waiting:
            if w.request == id(ticket) and not w.fut.done():
                w.fut.set_exception(refused)

    def _release(self, key: str, state: _Client, cost: int) -> None:
        state.running -= 1
        state.units -= cost
        self.in_use -= cost
        if state.running == 0 and not state.waiting:
            self._clients.pop(key, None)
        self._dispatch()

    def _grant(self, state: _Client, cost: int) -> None:
        state.running += 1
        state.units += cost
        self.in_use += cost
        self._grants += 1
        state.served_at = self._grants

    async def _wait(self, ticket: Ticket, state: _Client, cost: int, limit: int, deadline: float | None,
                    queue: int | None) -> None:
        key = ticket.client.key
        # The queue bounds requests: the parts of a request already admitted (a range split
        # by interval) wait with it, never refused half way through.
        queued = {w.request for w in state.waiting}
        if queue is not None and id(ticket) not in queued and len(queued) >= queue:
            self._forget_idle(key, state)
            raise self._reject(ticket, "queue_full",
                               f"client {ticket.label!r} already has {len(queued)} queries waiting "
                               f"(its limit); retry later")
        # The gateway-wide bound counts requests too, and never refuses a client's first
        # waiting request: one client's split parts cannot fill it for everybody.
        if queued and id(ticket) not in queued and self._waiting_requests() >= self.max_waiting:
            self._forget_idle(key, state)
            raise self._reject(ticket, "gateway_busy", f"the gateway has {self.max_waiting} queries waiting; "
                               "retry later")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), cost, limit, id(ticket))
        state.waiting.append(waiter)
        self._ring.setdefault(key, state)
        self.waiting += 1
        self._dispatch()  # capacity may be free for it now (others were only waiting on their own limits)
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter.fut)
        except BaseException as exc:
            if waiter.fut.done() and not waiter.fut.cancelled() and waiter.fut.exception() is None:
                # Granted as we gave up: hand the slot back.
                state.running -= 1
                state.units -= cost
                self.in_use -= cost
            else:
                waiter.fut.cancel()
            self._drop(key, state, waiter)
            self._dispatch()
            if isinstance(exc, TimeoutError):
                raise self._reject(ticket, "deadline", f"client {ticket.label!r}: no slot free for this query "
                                   "before its deadline (its other queries are running); retry later") from None
            raise
        finally:
            self.waiting -= 1

    def _waiting_requests(self) -> int:
        return sum(len({w.request for w in st.waiting}) for st in self._ring.values())

    def _drop(self, key: str, state: _Client, waiter: _Waiter) -> None:
        try:
            state.waiting.remove(waiter)
        except ValueError:
            pass
        if not state.waiting:
            self._ring.pop(key, None)
        self._forget_idle(key, state)

    def _forget_idle(self, key: str, state: _Client) -> None:
        if state.running == 0 and not state.waiting:
            self._clients.pop(key, None)

    def _reject(self, ticket: Ticket, reason: str, message: str) -> Rejected:
        gm.client_rejected(ticket.label, reason)
        return Rejected(reason, message, retry_after=1.0)

    def _dispatch(self) -> None:
        """Grant slots round-robin: the waiting client served least recently first, one grant
        per client per round."""
        progressed = True
        while progressed and self._ring:
            progressed = False
            for key, state in sorted(self._ring.items(), key=lambda item: item[1].served_at):
                while state.waiting and state.waiting[0].fut.done():
                    state.waiting.popleft()
                if not state.waiting:
                    del self._ring[key]
                    continue
                head = state.waiting[0]
                if not self._fits(state, head.cost, head.limit):
                    continue
                state.waiting.popleft()
                self._grant(state, head.cost)
                head.fut.set_result(None)
                if not state.waiting:
                    del self._ring[key]
                progressed = True


class Scheduler:
    """The lanes of one gateway process (see the module docstring)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        board = Board()
        self.upstream = FairQueue("upstream", settings.api_upstream_slots, settings.api_max_waiting_queries, board)
        self.heavy = FairQueue("heavy", settings.api_heavy_workers, settings.api_max_waiting_queries, board)
        self.defaults = Limits(
            max_concurrent_queries=settings.client_max_concurrent_queries,
            max_queued_queries=settings.client_max_queued_queries,
            max_range_seconds=settings.client_max_range_seconds or None,
            max_lookback_seconds=settings.client_max_lookback_seconds or None,
            max_points_per_series=settings.client_max_points_per_series,
            max_series=settings.client_max_series or None,
            max_response_bytes=settings.client_max_response_bytes or None,
            max_query_length=settings.client_max_query_length or None,
            blocked_queries=tuple(settings.client_blocked_queries),
        )

    def start(self) -> None:
        """Per process, at start: a short thread switch interval, so that heavy work in worker
        threads holds the interpreter for at most that long whenever the event loop wakes
        (Python's default, 5 ms, adds up to tens of milliseconds per request under a flood)."""
        interval = self.settings.api_heavy_switch_interval_seconds
        if interval > 0:
            sys.setswitchinterval(min(sys.getswitchinterval(), interval))

    def ticket(self, client: Client) -> Ticket:
        """One API request's ticket (and its count in the client's request metric)."""
        gm.client_request(client.label)
        return Ticket(client, client.limits.over(self.defaults), self)


@asynccontextmanager
async def upstream_slot(category: str, deadline: float) -> AsyncIterator[Ticket | None]:
    """The upstream client's one call: a slot in the upstream lane for a query API request
    (`category` of the API), nothing for the figures and background work (their bulkhead)."""
    ticket = current()
    if ticket is None or category not in ("api", "range", "instant"):
        yield None
        return
    lane = ticket.scheduler.upstream
    async with lane.slot(ticket, cost=lane.cost_of(ticket), deadline=deadline - GIVE_UP_EARLY):
        started = time.perf_counter()
        try:
            yield ticket
        finally:
            spent = time.perf_counter() - started
            ticket.stats.upstream_seconds += spent
            ticket.stats.upstream_queries += 1
            gm.client_upstream_seconds(ticket.label, spent)


def _without_gc(fn: Callable[..., _T], *args: Any) -> _T:
    # Big answers make hundreds of thousands of acyclic objects: without the collector's
    # full passes over them (see app.gateway.upstream.paused_gc), 3.5x more of them are
    # worked per second and the loop stalls less (docs/benchmarks.md, noisy neighbour).
    with paused_gc():
        return fn(*args)


async def heavy(fn: Callable[..., _T], *args: Any) -> _T:
    """Run CPU-heavy work on a big answer in a worker thread, in the heavy lane: its turn
    among every client's heavy work, its seconds counted against the client that asked."""
    ticket = current()
    if ticket is None:
        return await asyncio.to_thread(_without_gc, fn, *args)
    lane = ticket.scheduler.heavy
    deadline = None if ticket.deadline is None else ticket.deadline - GIVE_UP_EARLY
    async with lane.slot(ticket, limit=lane.capacity, queue=None, deadline=deadline):
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(_without_gc, fn, *args)
        finally:
            spent = time.perf_counter() - started
            ticket.stats.heavy_seconds += spent
            gm.client_heavy_seconds(ticket.label, spent)
