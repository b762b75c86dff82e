"""The read-ahead primitive under storage reads and packing: order, bound, errors, early close."""

from __future__ import annotations

import threading
import time

import pytest

from rsdino.data.read_ahead import ordered_map


def test_results_come_in_input_order_whatever_finishes_first() -> None:
    delays = [0.05, 0.0, 0.03, 0.0, 0.01, 0.0]

    def slow_square(index: int) -> int:
        time.sleep(delays[index])
        return index * index

    assert list(ordered_map(slow_square, range(6), workers=3)) == [0, 1, 4, 9, 16, 25]


def test_no_more_than_twice_the_workers_run_ahead_of_the_consumer() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def record(index: int) -> int:
        with lock:
            started.append(index)
        return index

    results = ordered_map(record, range(100), workers=2)
    assert next(results) == 0
    time.sleep(0.05)  # let the pool run as far ahead as it may
    with lock:
        assert max(started) <= 4  # items 0-3 submitted at first, item 4 when 0 was taken
    results.close()


def test_an_error_surfaces_at_its_item_and_closing_leaves_no_thread_behind() -> None:
    def fail_at_three(index: int) -> int:
        if index == 3:
            raise OSError(f"item {index} unreadable")
        return index

    results = ordered_map(fail_at_three, range(10), workers=2, thread_name="rsdino-test-pool")
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="item 3 unreadable"):
        next(results)
    assert not [t for t in threading.enumerate() if t.name.startswith("rsdino-test-pool")]


def test_closing_early_cancels_work_not_started() -> None:
    calls: list[int] = []
    gate = threading.Event()

    def wait_then_record(index: int) -> int:
        gate.wait(1.0)
        calls.append(index)
        return index

    results = ordered_map(wait_then_record, range(50), workers=1, thread_name="rsdino-test-close")
    gate.set()
    assert next(results) == 0
    results.close()
    assert len(calls) <= 3  # the first window (2 items) and the one submitted after item 0
    assert not [t for t in threading.enumerate() if t.name.startswith("rsdino-test-close")]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        next(ordered_map(str, [1], workers=0))
