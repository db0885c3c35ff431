"""Figures expire on a grid of TTL steps, so routes sharing figures refetch them in step."""

from __future__ import annotations

from app.gateway.caching.figures import QueryCache


def test_answers_fetched_in_one_step_expire_together() -> None:
    first = QueryCache.expiry(15, now=1001.0)
    # another route fetches later in the same step
    assert QueryCache.expiry(15, now=1003.0) == first == 1005.0  # the next multiple of 15 after both


def test_an_answer_fetched_at_the_end_of_a_step_lives_to_the_end_of_the_next() -> None:
    # 1 s before the boundary at 1020, less than a tenth of 15 s
    assert QueryCache.expiry(15, now=1019.0) == 1035.0
    # 4 s before it: the boundary itself
    assert QueryCache.expiry(15, now=1016.0) == 1020.0


def test_zero_ttl_is_not_cached() -> None:
    assert QueryCache.expiry(0, now=1000.0) == 1000.0
