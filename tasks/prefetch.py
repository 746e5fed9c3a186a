"""Run an iterator on a CPU thread, a few items ahead, while the caller's loop keeps the GPU busy.

The extractors' inputs are decoded frames (ffmpeg through a pipe, then resizing and stacking in numpy, which
release the GIL): without this the GPU waits for every batch to be decoded and the decoder waits for every batch
to be encoded. `prefetched` keeps at most `depth` items in flight (bounded memory), yields them in order, re-raises
the producer's exception at the point it happened, and stops the producer when the consumer stops early (a
rejected clip, an exception in the loop).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items` in order, produced on a background thread at most `depth` ahead of the consumer."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # a generator's cleanup (an ffmpeg pipe) runs on its own thread
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
