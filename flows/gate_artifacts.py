"""Publish a GateVerdict as Prefect artifacts and turn it into the flow's state.

Artifacts (keys are `<prefix>-<gate>`): a table of the measured numbers (or the verdict's own rows) and a
markdown verdict with the recommendation, with a plot PNG embedded when one is given. A no-go returns
Failed(name="NO-GO"); returning that state from a flow ends the run FAILED with the message. A gate whose step was
never reached is titled and named NOT EVALUATED, never GO.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Optional

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, Failed, State

from tasks.gate_verdict import GateVerdict


def artifact_key(prefix: str, gate: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{gate}".lower())).strip("-")


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def verdict_table(verdict: GateVerdict) -> list[dict[str, Any]]:
    if verdict.rows:
        return [{k: _cell(v) for k, v in row.items()} for row in verdict.rows]
    return [{"measure": k, "value": _cell(v)} for k, v in verdict.numbers.items()]


def verdict_markdown(verdict: GateVerdict, image: Optional[Path] = None) -> str:
    lines = [f"## Gate `{verdict.gate}`: **{verdict.head}**", "", verdict.summary, ""]
    if verdict.recommendation:
        lines += [f"**Recommendation:** {verdict.recommendation}", ""]
    lines += ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in verdict.numbers.items()]
    if image is not None and Path(image).exists():
        encoded = base64.b64encode(Path(image).read_bytes()).decode()
        lines += ["", f"![{verdict.gate}](data:image/png;base64,{encoded})", "", f"Plot file: `{image}`"]
    return "\n".join(lines)


def verdict_state(verdict: GateVerdict) -> State:
    if not verdict.evaluated:
        return Completed(name="NOT-EVALUATED", message=f"{verdict.gate}: {verdict.summary}")
    if verdict.go:
        return Completed(name="GO", message=f"{verdict.gate}: {verdict.summary}")
    message = f"NO-GO: {verdict.gate}: {verdict.summary}"
    if verdict.recommendation:
        message += f". Recommendation: {verdict.recommendation}"
    return Failed(name="NO-GO", message=message)


def publish_gate(verdict: GateVerdict, image: Optional[Path] = None, key_prefix: str = "gate") -> State:
    """Create the table + markdown artifacts for this verdict (inside a flow or task run) and return its state."""
    key = artifact_key(key_prefix, verdict.gate)
    create_table_artifact(verdict_table(verdict), key=key + "-table", description=verdict.summary)
    create_markdown_artifact(verdict_markdown(verdict, image), key=key, description=f"{verdict.head}: {verdict.summary}")
    return verdict_state(verdict)
