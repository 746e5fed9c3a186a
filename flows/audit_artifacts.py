"""Publish a shard audit (tasks/audit.py) as Prefect artifacts, and the run's state when it found a mismatch."""
from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed, State

from flows.gate_artifacts import artifact_key
from tasks import storage
from tasks.audit import AUDIT_FILE, AuditReport


def audit_markdown(report: AuditReport, limit: int = 20) -> str:
    head = "content matches its labels" if report.ok else "**MISMATCH**"
    lines = [f"## Shard audit: {head}", "", report.summary(), "",
             "| check | checked | mismatched |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['checked']} | {r['mismatched']} |" for r in report.table()]
    if report.mismatches:
        lines += ["", "| sample | window | check | what differs |", "|---|---|---|---|"]
        lines += [f"| `{m.key}` | {m.window} | {m.check} | {m.detail} |" for m in report.mismatches[:limit]]
    return "\n".join(lines)


def publish_audit(report: AuditReport, key_prefix: str) -> None:
    key = artifact_key(key_prefix, "audit")
    create_table_artifact(report.table(), key=key + "-table", description=report.summary())
    create_markdown_artifact(audit_markdown(report), key=key, description="shard audit")


def audit_state(report: AuditReport, output: str, run_report: dict) -> State:
    """Failed(name="AUDIT-MISMATCH"); the audit's findings and the run's report go to `<output>/audit.json`."""
    fs, base = storage.filesystem(output)
    storage.write_bytes(fs, storage.join(base, AUDIT_FILE),
                        json.dumps({"audit": report.to_json(), "run": run_report}, indent=1, default=str).encode())
    first = report.mismatches[0]
    return Failed(name="AUDIT-MISMATCH", message=f"shard audit: {report.summary()}; first: {first.key} "
                                                 f"{first.check}: {first.detail} (all in {output}/{AUDIT_FILE})")
