"""The "who asked lately" board (app/common/activity.py): private per process by default,
shared by processes forked after ``share_across_fork`` (gunicorn's workers)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator

import pytest

from app.common import activity
from app.common.activity import Board


@pytest.fixture
def shared() -> Iterator[None]:
    activity.share_across_fork()
    yield
    activity._shared = None  # later boards in this process are private again


def test_others_active_sees_other_clients_only_and_forgets_them() -> None:
    board = Board()
    board.mark("a")
    assert not board.others_active("a", 1.0)  # only itself
    board.mark("b")
    time.sleep(activity.READ_EVERY + 0.01)
    assert board.others_active("a", 1.0) and board.others_active("b", 1.0)
    time.sleep(0.2)
    assert not board.others_active("a", 0.1)  # b asked more than 0.1 s ago


def test_boards_are_private_without_sharing() -> None:
    one, two = Board(), Board()
    one.mark("b")
    assert not two.others_active("a", 1.0)


def _mark_in_child(key: str) -> None:
    Board().mark(key)


def test_a_forked_worker_marks_what_its_siblings_read(shared: None) -> None:
    parent = Board()
    child = multiprocessing.get_context("fork").Process(target=_mark_in_child, args=("b",))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert parent.others_active("a", 5.0)  # b asked on another worker
    assert not parent.others_active("b", 5.0)


def test_many_clients_fit_and_a_full_probe_evicts() -> None:
    board = Board()
    for i in range(activity.SLOTS * 2):  # more clients than slots: bounded, never an error
        board.mark(f"client-{i}")
    assert board.others_active("client-0", 5.0)


def _mark_twice_in_child(key: str) -> None:
    Board().mark(key)
    Board().mark("b")


def test_the_board_counts_the_processes_a_client_asks(shared: None) -> None:
    parent = Board()
    parent.mark("a")
    assert parent.processes("a", 5.0) == 1
    child = multiprocessing.get_context("fork").Process(target=_mark_twice_in_child, args=("a",))
    child.start()
    child.join(10)
    time.sleep(activity.READ_EVERY + 0.01)
    assert parent.processes("a", 5.0) == 2  # a asked this process and the forked one
    assert parent.processes("b", 5.0) == 1
    assert parent.processes("nobody", 5.0) == 1  # at least the asking one


def _hold_in_child(key: str, seconds: float) -> None:
    Board().hold_turn(key, time.monotonic() + seconds)


def test_a_turn_held_by_another_process_is_seen_until_it_ends(shared: None) -> None:
    parent = Board()
    assert parent.turn_elsewhere("flood") == 0.0
    parent.hold_turn("flood", time.monotonic() + 5)
    assert parent.turn_elsewhere("flood") == 0.0  # its own turn is not "elsewhere"
    child = multiprocessing.get_context("fork").Process(target=_hold_in_child, args=("flood", 0.3))
    child.start()
    child.join(10)
    until = parent.turn_elsewhere("flood")
    assert until > time.monotonic() and parent.turn_elsewhere("other") == 0.0
    time.sleep(max(0.0, until - time.monotonic()) + 0.01)
    assert parent.turn_elsewhere("flood") == 0.0  # the pause ended
    assert not parent.others_active("a", 5.0)  # turns are not "asked lately" marks
