"""A thread-safe progress bar for the CLI (Prefect logs carry the same events for the UI)."""
from __future__ import annotations

import sys
import threading

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str):
        self._bar = tqdm(total=total, desc=desc, unit="clip-step", file=sys.stderr, dynamic_ncols=True)
        self._lock = threading.Lock()

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
        self._bar.close()
