"""How a run ends, as a Prefect state name and a process exit code a scheduler can act on.

    0  done: every clip was processed; clips rejected for their input are normal and listed
    1  the run itself broke (an error of ours outside any one clip; the log says where)
    2  bad command line (argparse)
    3  NO-GO: a gate judged the data or the model not good enough to go on
    4  AUDIT-MISMATCH: a shard sample does not hold what its label says
    5  CLIPS-FAILED: the run finished, but some clips failed through our own error (status "failed", not a
       rejection of their input); their reasons are in the summary and the ledger; re-run after the fix
    6  UNUSABLE-INPUT: the manifest has no valid row (or cannot be read); nothing was run
    7  BAD-WEIGHTS: model weights are missing or do not fit their architectures; nothing was run
"""
from __future__ import annotations

from tasks.reasons import shorten

NO_GO = "NO-GO"
AUDIT_MISMATCH = "AUDIT-MISMATCH"
CLIPS_FAILED = "CLIPS-FAILED"
UNUSABLE_INPUT = "UNUSABLE-INPUT"
BAD_WEIGHTS = "BAD-WEIGHTS"

EXIT_CODES = {NO_GO: 3, AUDIT_MISMATCH: 4, CLIPS_FAILED: 5, UNUSABLE_INPUT: 6, BAD_WEIGHTS: 7}


def exit_code(state_name: str) -> int:
    """The exit code of a run that did not complete: its named outcome, else 1."""
    return EXIT_CODES.get(state_name, 1)


def failed_clips(report: dict) -> list[dict]:
    """The clips of a preprocess report that failed through our own error (not rejected for their input)."""
    return [r for r in report.get("rejected") or [] if r.get("status") == "failed"]


def unusable_manifest_message(manifest: str, errors: list) -> str:
    """What to fix when no row of the manifest can be used."""
    if not errors:
        return f"manifest {manifest} has no rows: nothing to do (build one with `./run manifest DATASET SRC -o OUT.parquet`)"
    shown = "; ".join(shorten(f"row {e.clip_id.removeprefix('row-')}: {e.detail}", 300) for e in errors[:3])
    return (f"manifest {manifest}: none of its {len(errors)} rows is valid, nothing was run. First: {shown}. "
            f"Fix those rows (the full list is in the ledger) or point at the right manifest.")

