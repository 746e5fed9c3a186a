"""A thread-safe progress bar for the CLI (Prefect logs carry the same events for the UI).

While the bar is open, log records that would go to the terminal (Prefect's console handler on the root
logger) are written through tqdm, above the bar, instead of into the middle of its line.
"""
from __future__ import annotations

import sys
import threading

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class Progress:
    def __init__(self, total: int, desc: str):
        self._bar = tqdm(total=total, desc=desc, unit="clip-step", file=sys.stderr, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._logs_above = logging_redirect_tqdm()
        self._logs_above.__enter__()

    def advance(self, what: str = "") -> None:
        with self._lock:
            if what:
                self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    def advance_many(self, n: int) -> None:
        if n > 0:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        """Idempotent: the flow calls it on every way out."""
        if self._logs_above is not None:
            self._logs_above.__exit__(None, None, None)
            self._logs_above = None
        self._bar.close()
