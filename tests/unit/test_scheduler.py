"""The fair scheduler alone (app/gateway/engines/scheduler.py): round-robin across clients,
per-client concurrency, bounded queues, deadlines, cancellation; and the edge's
cancellation when the caller goes away (promapi.until_gone)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response

from app.common.clients import Client, Limits
from app.gateway.engines.scheduler import PACE, FairQueue, Rejected, Scheduler, Ticket
from app.gateway.routes.promapi import until_gone
from app.gateway.settings import GatewaySettings

SCHED = Scheduler(GatewaySettings())


def ticket(name: str, **limits: Any) -> Ticket:
    return Ticket(Client(f"name:{name}", name), Limits(**{"max_concurrent_queries": 8, "max_queued_queries": 100,
                                                          **limits}), SCHED)


async def run_all(queue: FairQueue, jobs: list[tuple[Ticket, float]], order: list[str],
                  deadline: float | None = None) -> list[Any]:
    async def one(t: Ticket, hold: float) -> None:
        async with queue.slot(t, deadline=deadline):
            order.append(t.label)
            await asyncio.sleep(hold)

    tasks = []
    for t, hold in jobs:
        tasks.append(asyncio.create_task(one(t, hold)))
        await asyncio.sleep(0)  # arrival order
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_a_flooding_client_does_not_starve_a_light_one() -> None:
    async def main() -> list[str]:
        queue = FairQueue("upstream", capacity=1, max_waiting=100)
        a, b = ticket("a"), ticket("b")
        order: list[str] = []
        # Ten of A's queued first, then one of B's: B goes second, not eleventh.
        await run_all(queue, [(a, 0.01)] * 10 + [(b, 0.01)], order)
        return order

    order = asyncio.run(main())
    assert order.index("b") == 1, order
    assert len(order) == 11


def test_round_robin_alternates_between_waiting_clients() -> None:
    async def main() -> list[str]:
        queue = FairQueue("upstream", capacity=1, max_waiting=100)
        a, b = ticket("a"), ticket("b")
        order: list[str] = []
        await run_all(queue, [(a, 0.005)] * 4 + [(b, 0.005)] * 4, order)
        return order

    order = asyncio.run(main())
    assert order == ["a", "b"] * 4, order


def test_per_client_concurrency_leaves_room_for_others() -> None:
    async def main() -> tuple[int, list[str]]:
        queue = FairQueue("upstream", capacity=4, max_waiting=100)
        a, b = ticket("a", max_concurrent_queries=1), ticket("b")
        order: list[str] = []
        peak = 0

        async def watch() -> None:
            nonlocal peak
            for _ in range(20):
                peak = max(peak, queue._clients.get(a.client.key, type("z", (), {"running": 0})).running)
                await asyncio.sleep(0.002)

        w = asyncio.create_task(watch())
        await run_all(queue, [(a, 0.01)] * 3 + [(b, 0.01)] * 2, order)
        await w
        return peak, order

    peak, order = asyncio.run(main())
    assert peak == 1
    assert order[:3].count("b") == 2, order  # both of B's ran while A's waited on its own limit


def test_bounded_queue_refuses_at_once() -> None:
    async def main() -> list[Any]:
        queue = FairQueue("upstream", capacity=1, max_waiting=100)
        return await run_all(queue, [(ticket("a", max_queued_queries=2), 0.05) for _ in range(5)], [])

    outcomes = asyncio.run(main())
    refused = [o for o in outcomes if isinstance(o, Rejected)]
    assert len(refused) == 2 and all(r.reason == "queue_full" for r in refused)
    assert all("'a'" in r.message for r in refused)


def test_gateway_wide_bound_on_waiting_requests_spares_a_clients_first() -> None:
    """The gateway-wide bound counts requests (not their split parts) and never refuses a
    client's first waiting request: one client's week-long parts filled it for everybody
    (a neighbour's small query got 429 "the gateway has 256 queries waiting")."""
    async def main() -> list[Any]:
        queue = FairQueue("upstream", capacity=1, max_waiting=2)
        a, b = ticket("a"), ticket("b")
        a2, a3 = Ticket(a.client, a.limits, SCHED), Ticket(a.client, a.limits, SCHED)

        async def one(t: Ticket) -> None:
            async with queue.slot(t):
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(one(ticket("first")))]  # runs
        await asyncio.sleep(0)
        for t in (a, a, a, a, a, a2, a3, b):  # a: one request of five parts, then two more requests
            tasks.append(asyncio.create_task(one(t)))
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes[:7] == [None] * 7  # the first, a's five parts and a's second request
    assert isinstance(outcomes[7], Rejected) and outcomes[7].reason == "gateway_busy"  # a's third
    assert outcomes[8] is None  # b's first waiting request, though two requests wait


def test_a_waiter_leaves_at_its_deadline() -> None:
    async def main() -> tuple[list[Any], float]:
        loop = asyncio.get_running_loop()
        queue = FairQueue("upstream", capacity=1, max_waiting=10)
        t0 = loop.time()
        outcomes = await run_all(queue, [(ticket("a"), 0.5), (ticket("b"), 0.0)], [], deadline=t0 + 0.1)
        return outcomes, loop.time() - t0

    outcomes, took = asyncio.run(main())
    assert outcomes[0] is None
    assert isinstance(outcomes[1], Rejected) and outcomes[1].reason == "deadline"
    assert queue_empty_after(outcomes)
    assert took < 0.7


def queue_empty_after(outcomes: list[Any]) -> bool:
    return all(o is None or isinstance(o, Rejected) for o in outcomes)


def test_a_cancelled_waiter_frees_its_place() -> None:
    async def main() -> tuple[list[str], int, int]:
        queue = FairQueue("upstream", capacity=1, max_waiting=10)
        a, b, c = ticket("a"), ticket("b"), ticket("c")
        order: list[str] = []

        async def one(t: Ticket, hold: float) -> None:
            async with queue.slot(t):
                order.append(t.label)
                await asyncio.sleep(hold)

        first = asyncio.create_task(one(a, 0.05))
        await asyncio.sleep(0)
        gone = asyncio.create_task(one(b, 0.0))
        await asyncio.sleep(0)
        last = asyncio.create_task(one(c, 0.0))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(first, last, return_exceptions=True)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return order, queue.waiting, queue.in_use

    order, waiting, in_use = asyncio.run(main())
    assert order == ["a", "c"]
    assert waiting == 0 and in_use == 0


def test_the_work_stops_when_the_caller_goes_away() -> None:
    async def main() -> tuple[Response, bool]:
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""},
                          receive)
        cancelled = False

        async def work() -> Response:
            nonlocal cancelled
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled = True
                raise
            return Response(b"late")

        return await asyncio.wait_for(until_gone(request, work()), 2), cancelled

    response, cancelled = asyncio.run(main())
    assert response.status_code == 499 and cancelled


def test_clients_with_big_answers_get_fewer_slots_at_once() -> None:
    async def main() -> tuple[int, float]:
        queue = FairQueue("upstream", capacity=8, max_waiting=100)
        a, b = ticket("a"), ticket("b")
        queue.sizes.add(a.client.key, 7 * 1024 * 1024)  # its answers: 7 MB
        assert queue.cost_of(a) == 2 and queue.cost_of(b) == 1
        peak = 0
        b_waited = -1.0

        async def one() -> None:
            nonlocal peak
            async with queue.slot(a, cost=queue.cost_of(a)):
                peak = max(peak, queue._clients[a.client.key].running)
                await asyncio.sleep(0.05)

        async def light() -> None:
            nonlocal b_waited
            await asyncio.sleep(0.01)  # A holds all it may by now
            async with queue.slot(b):
                b_waited = b.stats.queue_seconds

        await asyncio.gather(*(one() for _ in range(6)), light())
        return peak, b_waited

    peak, b_waited = asyncio.run(main())
    assert peak == 2  # half the capacity, two units each
    assert 0 <= b_waited < 0.01  # another client's first request does not wait


def test_work_that_cannot_finish_before_its_deadline_is_not_started() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        queue = FairQueue("upstream", capacity=8, max_waiting=100)
        a = ticket("a")
        queue.held.add(a.client.key, 1.0)  # its queries hold a slot ~1 s

        async def one(deadline: float) -> None:
            request = Ticket(a.client, a.limits, SCHED)  # each call its own request
            async with queue.slot(request, deadline=deadline):
                await asyncio.sleep(0.05)

        far = loop.time() + 5
        return await asyncio.gather(one(far), one(loop.time() + 0.3), return_exceptions=True)

    first, second = asyncio.run(main())
    assert first is None  # a lone query always runs (the estimate keeps learning)
    assert isinstance(second, Rejected) and second.reason == "deadline"


def test_the_queue_counts_requests_not_their_parts() -> None:
    async def main() -> list[Any]:
        queue = FairQueue("upstream", capacity=1, max_waiting=100)
        split = ticket("a", max_queued_queries=1)  # one request, five parts
        other = Ticket(split.client, split.limits, SCHED)  # a second request of the same client

        async def part(t: Ticket) -> None:
            async with queue.slot(t):
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(part(split)) for _ in range(5)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(part(other)))
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes[:5] == [None] * 5  # every part of the admitted request runs
    assert isinstance(outcomes[5], Rejected) and outcomes[5].reason == "queue_full"


def test_one_client_opening_a_week_long_dashboard_is_queued_not_refused() -> None:
    """With the default limits, one token (a Grafana datasource) opening 20 week-long panels
    of 8 split parts each: every part gets its turn, none is refused (a queue of 16 refused
    the dashboard: the 4 slots were held by one panel's parts, 19 panels waited)."""
    sched = Scheduler(GatewaySettings())

    async def main() -> list[Any]:
        queue = sched.upstream
        client = Client("name:grafana", "grafana")

        async def panel() -> None:
            t = sched.ticket(client)

            async def part() -> None:
                async with queue.slot(t):
                    await asyncio.sleep(0.001)

            await asyncio.gather(*(part() for _ in range(8)))

        return await asyncio.gather(*(panel() for _ in range(20)), return_exceptions=True)

    assert asyncio.run(main()) == [None] * 20


def test_a_heavy_client_runs_one_at_a_time_while_others_are_active() -> None:
    """A client keeping the upstream busy (a week-long flood) uses its whole limit alone,
    and one slot at a time while another client has asked lately: the upstream's other
    cores stay free for the neighbour's small queries. A light client is never throttled."""
    def peak(with_neighbour: bool, heavy: bool) -> int:
        async def main() -> int:
            queue = FairQueue("upstream", capacity=8, max_waiting=100)
            a = ticket("a", max_concurrent_queries=4)
            if heavy:  # it has kept the upstream busy: 10 s of slots lately, two per second
                queue.usage.add(a.client.key, 10.0, time.monotonic())
            running, most = 0, 0

            async def part() -> None:
                nonlocal running, most
                async with queue.slot(a):
                    running += 1
                    most = max(most, running)
                    await asyncio.sleep(0.01)
                    running -= 1

            if with_neighbour:
                async with queue.slot(ticket("b")):
                    pass
            await asyncio.gather(*(part() for _ in range(4)))
            return most

        return asyncio.run(main())

    assert peak(with_neighbour=False, heavy=True) == 4
    assert peak(with_neighbour=True, heavy=False) == 4
    assert peak(with_neighbour=True, heavy=True) == 1


def test_a_split_request_is_refused_when_all_its_parts_cannot_finish_in_time() -> None:
    """A request's parts run at most the client's concurrency at once: eight parts of
    0.3 s, one at a time, need 2.4 s. With 1.5 s left it is refused at its first turn (a
    429 now) instead of timing out half way through (a 503 at the deadline)."""
    async def main(left: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        queue = FairQueue("upstream", capacity=8, max_waiting=100)
        a = ticket("a", max_concurrent_queries=1)
        queue.held.add(a.client.key, 0.3)
        busy = Ticket(a.client, a.limits, SCHED)
        split = Ticket(a.client, a.limits, SCHED)

        async def part(t: Ticket, hold: float) -> None:
            async with queue.slot(t, deadline=loop.time() + left):
                await asyncio.sleep(hold)

        first = asyncio.create_task(part(busy, 0.01))  # running: the split request waits its turn
        await asyncio.sleep(0)
        return await asyncio.gather(first, *(part(split, 0.001) for _ in range(8)), return_exceptions=True)

    refused = asyncio.run(main(1.5))
    assert all(isinstance(o, Rejected) and o.reason == "deadline" for o in refused[1:])
    assert asyncio.run(main(5.0)) == [None] * 9


def test_a_throttled_heavy_client_waits_a_quarter_of_its_last_turn_before_the_next() -> None:
    """Throttled, a heavy client's next turn comes PACE x its last slot's time after it ends
    (the upstream is kept short of saturation); alone, its turns follow at once."""
    def gaps(with_neighbour: bool) -> list[float]:
        async def main() -> list[float]:
            queue = FairQueue("upstream", capacity=8, max_waiting=100)
            a = ticket("a", max_concurrent_queries=4)
            queue.usage.add(a.client.key, 10.0, time.monotonic())
            if with_neighbour:
                async with queue.slot(ticket("b")):
                    pass
            spans: list[tuple[float, float]] = []

            async def part() -> None:
                async with queue.slot(a):
                    t = time.monotonic()
                    await asyncio.sleep(0.08)
                spans.append((t, time.monotonic()))

            await asyncio.gather(*(part() for _ in range(3)))
            spans.sort()
            return [b0 - a1 for (_, a1), (b0, _) in itertools.pairwise(spans)]

        return asyncio.run(main())

    paced = gaps(with_neighbour=True)
    assert PACE == 0.25 and all(g >= 0.8 * 0.25 * 0.08 for g in paced), paced  # a quarter of 80 ms
    assert all(g < 0 for g in gaps(with_neighbour=False))  # alone: overlapping, no pause


def test_a_paced_request_past_its_deadline_is_told_429_not_an_upstream_timeout() -> None:
    """When a request's deadline went on the turns its client was paced to, the answer is
    429 with Retry-After (the gateway's fairness, not an upstream failure); the same
    timeout for a request that was never paced stays Prometheus' 503 timeout."""
    from app.gateway.engines import scheduler
    from app.gateway.routes.envelope import from_upstream
    from app.gateway.upstream.answers import UpstreamError

    def answer(throttled: bool) -> tuple[int, dict[str, str]]:
        t = ticket("flood")
        t.throttled = throttled
        token = scheduler.enter(t)
        try:
            err = from_upstream(UpstreamError("timeout", "request deadline reached before the upstream answered"))
        finally:
            scheduler.leave(token)
        return err.status, err.headers

    assert answer(True) == (429, {"Retry-After": "1"})
    assert answer(False)[0] == 503


def test_a_turn_granted_under_the_throttle_marks_the_request() -> None:
    async def main() -> tuple[bool, bool]:
        queue = FairQueue("upstream", capacity=8, max_waiting=100)
        heavy, light = ticket("a"), ticket("b")
        queue.usage.add(heavy.client.key, 10.0, time.monotonic())
        async with queue.slot(light):
            pass
        async with queue.slot(heavy):
            pass
        return heavy.throttled, light.throttled

    assert asyncio.run(main()) == (True, False)
