"""The CLI progress bar: log lines printed while it is open land on lines of their own, above the bar."""
from __future__ import annotations

import logging
import re
import sys

from flows.progress import Progress


def test_log_lines_print_above_the_bar_and_the_handlers_come_back(capsys):
    console = logging.StreamHandler(sys.stderr)  # what Prefect's console handler is: a stream on stderr
    logging.root.addHandler(console)
    try:
        bar = Progress(total=3, desc="clips")
        assert console not in logging.root.handlers  # swapped for tqdm's writer while the bar is open
        bar.advance("crop a")
        logging.getLogger("dualforce.test").warning("crop a: ok")
        bar.advance("crop b")
        bar.advance("crop c")
        bar.close()
        bar.close()  # idempotent: the flow closes it on every way out
        assert console in logging.root.handlers
        logging.getLogger("dualforce.test").warning("after the bar")
    finally:
        logging.root.removeHandler(console)
    err = capsys.readouterr().err
    pieces = re.split(r"[\r\n]", err)
    assert "crop a: ok" in pieces  # a line of its own, not glued to the end of a bar line
    assert "after the bar" in pieces
    assert any(p.startswith("clips: 100%") for p in pieces)
    assert not any("crop a: ok" in p and p != "crop a: ok" for p in pieces)
