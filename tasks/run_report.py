"""The preprocess run's report: what came in, what made it, what did not and why, the gate, the shards, the audit.

Built from the clip states and ledger rows by keyword, so the flow only hands over what it has; the report is what
the CLI prints, the summary artifact shows and a parent flow (pipeline, dry run) reads.
"""
from __future__ import annotations

from typing import Optional

from tasks.step_runner import ClipState, LedgerEntry


def rejected_rows(states: list[ClipState], manifest_errors: list[LedgerEntry]) -> list[dict]:
    """One row per clip that did not make it: the step, rejected (its input) or failed (our error), and why."""
    return [
        {"clip_id": s.row.clip_id, "step": s.failure.step, "status": s.failure.status, "reason": s.failure.reason,
         "detail": s.failure.detail}
        for s in states if s.failure
    ] + [{"clip_id": e.clip_id, "step": "manifest", "status": "rejected", "reason": e.reason, "detail": e.detail}
         for e in manifest_errors]


def preprocess_report(*, dataset: str, profile: str, clips_in: int, states: list[ClipState], rejected: list[dict],
                      step_counts: list[dict], shards: Optional[dict], gate: Optional[dict],
                      struct_source: Optional[str], audit, contact_sheet: Optional[str], untrained_dryrun: bool,
                      output: str, runner: str, run_id: str) -> dict:
    return {
        "dataset": dataset,
        "profile": profile,
        "clips_in": clips_in,
        "clips_out": sum(1 for s in states if s.alive),
        "clips_retryable": sum(1 for s in states if s.failure and s.failure.status == "retryable"),
        "rejected": rejected,
        "step_counts": step_counts,
        "shards": shards,
        "gate": gate,
        "struct_source": struct_source,
        "audit": None if audit is None else {"ok": audit.ok, "summary": audit.summary(), "checks": audit.table()},
        "contact_sheet": contact_sheet,
        "untrained_dryrun_models": untrained_dryrun,
        "output": output,
        "runner": runner,
        "run_id": run_id,
    }
