"""prefetched: the same items in the same order, at most `depth` ahead, errors where they happened, and a producer
that stops (and closes its source) when the consumer stops early."""
from __future__ import annotations

import threading
import time

import pytest

from tasks.prefetch import prefetched


def test_yields_every_item_in_order_from_another_thread():
    threads = []

    def source():
        for i in range(50):
            threads.append(threading.current_thread().name)
            yield i

    assert list(prefetched(source(), depth=3)) == list(range(50))
    assert set(threads) == {"prefetch"}


def test_stays_at_most_depth_items_ahead():
    produced = []

    def source():
        for i in range(20):
            produced.append(i)
            yield i

    items = prefetched(source(), depth=2)
    assert next(items) == 0
    time.sleep(0.3)  # room for the producer to run as far ahead as it may
    # taken 1, queued 2, and one more produced but waiting for a free slot
    assert len(produced) <= 1 + 2 + 1
    assert list(items) == list(range(1, 20))


def test_the_producers_error_is_raised_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("corrupt frame 3")

    got = []
    with pytest.raises(ValueError, match="corrupt frame 3"):
        for item in prefetched(source()):
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_stops_the_producer_and_closes_its_source():
    closed = threading.Event()
    produced = []

    def source():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    items = prefetched(source(), depth=2)
    assert next(items) == 0
    items.close()  # what a loop broken by an exception does
    assert closed.is_set()
    assert len(produced) < 10
    with pytest.raises(ValueError):
        prefetched([], depth=0).__next__()
