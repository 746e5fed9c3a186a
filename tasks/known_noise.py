"""Third-party messages that tell our users nothing, dropped by their exact text at our entry points.

Listed here, each with the reason, and nowhere else; `quiet_known_noise()` is called by the `flows` package (the
CLI, the server command and every deployment's flow run import it first) and by the trainer process
(training/train.py). Filters match one message exactly: an unlisted warning, or a listed one reworded by a new
release, still shows. Nothing here touches the global warning or logging configuration beyond these entries.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownLogRecord:
    logger: str
    message: str
    why: str


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    message: str
    why: str


KNOWN_LOG_RECORDS = (
    KnownLogRecord(
        "DeepSpeed",
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        "printed by every command on a machine without a GPU as soon as DeepSpeed is imported, even by commands "
        "that never train; the device a run uses is in our own log lines",
    ),
)

KNOWN_WARNINGS = (
    KnownWarning(
        FutureWarning,
        "`torch.distributed.all_gather_into_tensor` is deprecated. "
        "Please use `torch.distributed.all_gather_single` instead.",
        "DeepSpeed's ZeRO gathers call it, not our code: one warning per rank and gather site, a wall of them "
        "right above the dry-run's summary; nothing a user of ours can change",
    ),
)


class _DropExact(logging.Filter):
    """Drops a logger's records whose formatted message is one of `messages`."""

    def __init__(self, messages: frozenset[str]):
        super().__init__("dualforce.known_noise")
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


def quiet_known_noise() -> None:
    """Install the filters (idempotent: calling it again adds nothing)."""
    by_logger: dict[str, set[str]] = {}
    for entry in KNOWN_LOG_RECORDS:
        by_logger.setdefault(entry.logger, set()).add(entry.message)
    for name, messages in by_logger.items():
        # getLogger before the library creates it is fine: it gets this same object and keeps the filter
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExact) for f in logger.filters):
            logger.addFilter(_DropExact(frozenset(messages)))
    for entry in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(entry.message) + r"\Z", category=entry.category)
