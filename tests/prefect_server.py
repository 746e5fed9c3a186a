"""One Prefect test server per pytest process, shared by every test module that runs flows in-process.

`prefect_test_harness` migrates a fresh SQLite database and starts a server process: about 17 s on the shared
2-core machine, paid once per module when each module opened its own. Here the first module that asks starts
it and it stays up (its settings active) until the pytest session ends. Tests that read the API back filter by
artifact key or flow-run state of their own runs, so one database for all of them changes no assertion.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Optional

import pytest

_running: Optional[ExitStack] = None


def shared_prefect_server(config: pytest.Config, startup_timeout: int = 180) -> None:
    """Start the session's Prefect test server unless it is up already; it stops when the session ends."""
    global _running
    if _running is not None:
        return
    from prefect.testing.utilities import prefect_test_harness

    stack = ExitStack()
    stack.enter_context(prefect_test_harness(server_startup_timeout=startup_timeout))

    def stop() -> None:
        global _running
        _running = None
        stack.close()

    config.add_cleanup(stop)
    _running = stack
