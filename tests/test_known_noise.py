"""The third-party noise listed in tasks/known_noise.py is dropped at our entry points, by exact message only."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.known_noise import KNOWN_LOG_RECORDS, KNOWN_WARNINGS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import logging, sys, warnings
warnings.simplefilter("default")
if sys.argv[1] == "entry":
    import flows.cli  # the CLI's (and every flow run's) first import of ours
import deepspeed  # logs the accelerator line on a machine without a GPU
from tasks.known_noise import KNOWN_LOG_RECORDS, KNOWN_WARNINGS
for w in KNOWN_WARNINGS:
    warnings.warn(w.message, w.category)
warnings.warn("an unlisted warning", FutureWarning)
warnings.warn(KNOWN_WARNINGS[0].message + " (reworded)", FutureWarning)
for r in KNOWN_LOG_RECORDS:
    logging.getLogger(r.logger).warning(r.message)
logging.getLogger("DeepSpeed").warning("an unlisted DeepSpeed line")
"""


def _output(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_entry_points_print_none_of_the_listed_messages_and_every_other_one():
    quiet, loud = _output("entry"), _output("bare")
    for text in [w.message for w in KNOWN_WARNINGS] + [r.message for r in KNOWN_LOG_RECORDS]:
        assert text in loud  # without our entry point each one shows: the filter is what removes it
        assert quiet.count(text) == quiet.count(text + " (reworded)"), text  # only the reworded copy is left
    for kept in ("an unlisted warning", "an unlisted DeepSpeed line", "(reworded)"):
        assert kept in quiet and kept in loud


def test_the_filters_are_idempotent_and_exact():
    import logging
    import warnings

    from tasks.known_noise import quiet_known_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        quiet_known_noise()
        for w in KNOWN_WARNINGS:
            warnings.warn(w.message, w.category)
            warnings.warn("prefix " + w.message, w.category)
    assert [str(c.message) for c in caught] == ["prefix " + w.message for w in KNOWN_WARNINGS]
    for r in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(r.logger)
        assert len(logger.filters) == 1
        record = logger.makeRecord(r.logger, logging.WARNING, __file__, 1, r.message, None, None)
        assert not logger.filters[0].filter(record)
        assert logger.filters[0].filter(logger.makeRecord(r.logger, logging.WARNING, __file__, 1, "other", None, None))
