"""`dualforce ablate MATRIX`: the review's ablation matrix as one flow.

Per variant (training/ablation.py: the base run with one thing changed, same shards and seed): the train flow as a
subflow (its gates judged live), `dualforce export` of the run it ended in, then the evaluate flow on the matrix's
held-out split. Variants run `parallel` at a time (each a task whose subflows launch their own trainer processes).
Then one comparison table (every metric per variant, and its change against the baseline) and one plot:
OUT/ablation.json, OUT/ablation.md, OUT/ablation.png, and the same as artifacts. A variant whose training ends
NO-GO is reported as such (no evaluation); re-running the matrix resumes every run from its checkpoints.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Union

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.evaluate import evaluate_flow
from flows.gate_artifacts import artifact_key
from flows.review import image_markdown
from flows.train import train_flow
from training.ablation import AblationMatrix, VariantSpec, comparison_rows, load_matrix, plot_comparison, variant_train
from training.gates import ReviewOptions, read_gate_log
from training.launch import LaunchSpec
from training.metrics import METRICS_FILE, read_metrics
from training.shard_sets import train_data_fields

RESULT_FILE = "ablation.json"


@task(name="ablation-variant")
def run_variant(matrix: AblationMatrix, variant: VariantSpec, data: dict[str, Any]) -> dict[str, Any]:
    """Train, export and evaluate one variant; returns its verdict, final loss and metric values."""
    from training.export import export_run

    logger = get_run_logger()
    started = time.perf_counter()
    out = Path(matrix.out_dir) / variant.name
    cfg = {**data, **variant_train(matrix, variant), "out_dir": str(out / "train")}
    state = train_flow.with_options(flow_run_name=f"{matrix.name}-{variant.name}-train")(
        cfg, gates=matrix.gates, launch=LaunchSpec(nproc_per_node=matrix.launch.nproc_per_node,
                                                   launcher=matrix.launch.launcher),
        review=ReviewOptions(auto_approve=True), return_state=True)
    gates = read_gate_log(out / "train")
    run_dir = Path(gates[-1]["run_dir"]) if gates else None
    losses = [r["loss"] for r in read_metrics(run_dir / METRICS_FILE) if "loss" in r] if run_dir else []
    result: dict[str, Any] = {"verdict": "GO" if state.is_completed() else state.name, "message": state.message or "",
                              "run_dir": str(run_dir) if run_dir else None,
                              "final_loss": losses[-1] if losses else None, "metrics": {}}
    if not state.is_completed() or run_dir is None:
        logger.warning("%s: training ended %s; not evaluated", variant.name, result["verdict"])
        return dict(result, seconds=time.perf_counter() - started)
    model = export_run(run_dir, out / "model").out_dir
    evaluation = evaluate_flow.with_options(flow_run_name=f"{matrix.name}-{variant.name}-evaluate")(
        str(model), matrix.shards[0], str(out / "evaluation"), dict(matrix.evaluate, progress=False),
        artifact_prefix=f"{matrix.name}-{variant.name}")
    result["metrics"] = {r["name"]: r["value"] for r in evaluation["summary"] + evaluation["long_sequence"]}
    result["evaluation"] = evaluation["out_dir"]
    return dict(result, seconds=time.perf_counter() - started)


def comparison_markdown(matrix: AblationMatrix, rows: list[dict[str, Any]], plot: Path | None) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = [c for k in keys if not k.endswith(" vs baseline") for c in (k, f"{k} vs baseline") if c in keys]
    lines = [f"## Ablation matrix {matrix.name}: {len(rows)} variants", "",
             "Each variant is the base run with one thing changed (same shards, same seed); `vs baseline` is the "
             "variant's value minus the baseline's. Empty: the metric was skipped (no weights) or the variant did "
             "not finish training.", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else
                                                                    str(r[c])) for c in columns) + " |")
    if plot is not None:
        lines += ["", image_markdown(plot)]
    return "\n".join(lines)


@flow(name="ablate")
def ablation_flow(matrix: Union[str, dict[str, Any]]) -> dict[str, Any]:
    """`matrix`: a matrix file (YAML/JSON, training/ablation.py) or its content as a dict."""
    logger = get_run_logger()
    m = load_matrix(matrix)
    data = train_data_fields(m.shards, m.split)
    out = Path(m.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("ablation matrix %s: %d variants, %d at a time -> %s", m.name, len(m.variants), m.parallel, out)
    results: dict[str, dict[str, Any]] = {}
    for start in range(0, len(m.variants), m.parallel):
        batch = m.variants[start:start + m.parallel]
        futures = [run_variant.with_options(task_run_name=f"variant-{v.name}").submit(m, v, data) for v in batch]
        for variant, future in zip(batch, futures):
            results[variant.name] = future.result()
            logger.info("%s: %s", variant.name, results[variant.name]["verdict"])
    rows = comparison_rows(m, results)
    metrics = list(dict.fromkeys(k for r in results.values() for k in r["metrics"]))
    plot = plot_comparison(rows, metrics, out / "ablation.png")
    table = comparison_markdown(m, rows, plot)
    (out / "ablation.md").write_text(table + "\n")
    tmp = out / f".{RESULT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"matrix": m.model_dump(), "results": results, "rows": rows}, indent=2, default=str))
    tmp.replace(out / RESULT_FILE)
    create_table_artifact(rows, key=artifact_key(m.name, "ablation"), description=f"ablation matrix {m.name}")
    create_markdown_artifact(table, key=artifact_key(m.name, "ablation-plot"), description=f"ablation {m.name}")
    return {"out_dir": str(out), "rows": rows, "results": results, "table": table}
