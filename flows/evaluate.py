"""The evaluate stage: an exported model on a shard set's held-out split (training/evaluate.py does the work), its
table and plots published as artifacts. `dualforce evaluate` runs it; the ablation flow runs it per variant."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.gate_artifacts import artifact_key
from flows.review import image_markdown
from training.evaluate import EvaluateOptions, evaluate_model


def publish_evaluation(out_dir: Path, summary: list[dict[str, Any]], long_sequence: list[dict[str, Any]],
                       table: str, key: str) -> None:
    rows = [{"metric": r["name"], "value": r["value"], "status": r["status"], "note": r["reason"],
             "seconds": round(r["seconds"], 3)} for r in summary + long_sequence]
    create_table_artifact(rows, key=artifact_key(key, "evaluation"), description=f"evaluation in {out_dir}")
    plots = sorted(out_dir.glob("metric-*.png"))
    create_markdown_artifact("\n".join([table, "", *(image_markdown(p) for p in plots)]),
                             key=artifact_key(key, "evaluation-plots"), description=f"metric plots in {out_dir}")


@flow(name="evaluate")
def evaluate_flow(model: str, shards: str, out: str, options: Optional[dict[str, Any]] = None,
                  artifact_prefix: str = "") -> dict[str, Any]:
    """`options`: training.evaluate.EvaluateOptions fields. Returns the summary and where the files are."""
    logger = get_run_logger()
    report = evaluate_model(model, shards, out, EvaluateOptions(**(options or {})))
    table = (report.out_dir / "evaluation.md").read_text()
    publish_evaluation(report.out_dir, report.summary, report.long_sequence, table,
                       artifact_prefix or Path(model).name)
    logger.info("evaluation of %s written to %s (%.1f s)", model, report.out_dir, report.seconds)
    return {"out_dir": str(report.out_dir), "summary": report.summary, "long_sequence": report.long_sequence,
            "table": table, "seconds": report.seconds}
