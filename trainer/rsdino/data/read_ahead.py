"""One read-ahead primitive: a bounded window of work in a thread pool, results in input order.

Object-store reads are latency-bound, so the data path overlaps them with threads; the window
bounds the memory held by finished results that wait for an earlier, slower one.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    thread_name: str = "rsdino-read-ahead",
) -> Iterator[Result]:
    """``function(item)`` for each item, by ``workers`` threads at most ``2 * workers`` items
    ahead of the consumer, yielded in the order of ``items``.

    An exception is raised where its item's result would have been yielded. Closing the
    iterator early cancels the work not yet started and waits for the work in flight, so no
    thread outlives it.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    remaining = iter(items)
    pending: deque[Future[Result]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix=thread_name)
    try:
        for item in itertools.islice(remaining, 2 * workers):
            pending.append(pool.submit(function, item))
        while pending:
            done = pending.popleft()
            for item in itertools.islice(remaining, 1):
                pending.append(pool.submit(function, item))
            yield done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
