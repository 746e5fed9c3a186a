"""The sample-review gate: at the review step a person looks at the latest training output and answers.

The flow pauses (Prefect's pause with a typed input, so the UI shows a form and validates the answer), the
artifacts it published just before say what there is to look at, and the answer decides what runs next:
continue, stop (a NO-GO), or adjust (change the loss weights or the step count for the rest of the run).
Unattended runs answer for themselves: `auto_approve`, or the timeout's default action.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Literal, Optional, get_args

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Running

from tasks.gate_verdict import GateVerdict
from training.gates import OnTimeout
from training.validation import latest_samples


class ReviewAnswer(RunInput):
    """What the reviewer answers (the form Prefect's UI shows on the paused run)."""

    decision: Literal["continue", "stop", "adjust"] = "continue"
    note: str = ""
    loss_options: dict[str, float] = {}  # adjust: Diffusion Forcing fields from here on, e.g. struct_loss_weight
    total_steps: Optional[int] = None  # adjust: train to this step instead (the LR schedule keeps its length,
    # restored from the checkpoint: steps past the original end run at the final rate)


def image_markdown(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f"![{path.stem}](data:image/png;base64,{encoded})\n\nFile: `{path}`\n"


def publish_review_request(step: int, run_dir: Path, plot: Path, timeout_s: int, on_timeout: str) -> None:
    """What the reviewer looks at: the newest validation samples' contact sheet and the loss curve."""
    latest = latest_samples(run_dir)  # the newest validation round only (training/validation.py)
    samples = [Path(latest["dir"]) / latest["sheet"]] if latest else []
    lines = [f"## Sample review at step {step}: **waiting for an answer**", "",
             f"Run `{run_dir}`. Answer on the paused flow run (continue / stop / adjust, with a note). "
             f"Without an answer in {timeout_s} s the run will {on_timeout}.", ""]
    lines += [image_markdown(p) for p in samples] or ["No validation samples were written by this run; its loss curve:", ""]
    lines.append(image_markdown(plot))
    create_markdown_artifact("\n".join(lines), key="train-review-request", description=f"review at step {step}")


def _back_to_running() -> None:
    """After a pause times out the run is still Paused on the server; the flow goes on, so it says so."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.get_id(), Running(), force=True)


def ask_reviewer(step: int, auto_approve: bool, timeout_s: int, on_timeout: str) -> tuple[ReviewAnswer, str]:
    """(the answer, who gave it: "person" | "auto-approve" | "timeout")."""
    if on_timeout not in get_args(OnTimeout):
        raise ValueError(f"review on_timeout must be continue or stop, got {on_timeout!r}")
    if auto_approve:
        return ReviewAnswer(decision="continue", note="auto-approved (unattended run)"), "auto-approve"
    logger = get_run_logger()
    logger.info("review at step %d: paused for an answer (up to %d s)", step, timeout_s)
    try:
        answer = pause_flow_run(wait_for_input=ReviewAnswer, timeout=timeout_s, poll_interval=min(10, max(1, timeout_s // 30)),
                                key=f"review-step{step}")
    except FlowPauseTimeout:
        _back_to_running()
        return ReviewAnswer(decision=on_timeout, note=f"no answer within {timeout_s} s"), "timeout"
    return answer, "person"


def review_verdict(step: int, answer: ReviewAnswer, answered_by: str) -> GateVerdict:
    numbers = {"step": step, "decision": answer.decision, "note": answer.note, "answered_by": answered_by,
               "loss_options": answer.loss_options or None, "total_steps": answer.total_steps}
    summary = f"{answer.decision} ({answered_by})" + (f": {answer.note}" if answer.note else "")
    if answer.decision == "stop":
        return GateVerdict("review", False, summary, numbers, "stopped by the sample review; the checkpoint is kept")
    return GateVerdict("review", True, summary, numbers)
