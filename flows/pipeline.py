"""One pipeline: preprocess (with its 3D-latent data gate) -> train (with the training gates).

A no-go anywhere ends the run in that gate's named state; the training stage reads the shard set the
preprocess stage just wrote, so going from a dry-run to a cluster run changes parameters, not code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows.layout import DatasetLayout
from flows.preprocess import with_workers
from flows.preprocess_options import PreprocessOptions
from flows.run_artifacts import publish_summary
from flows.train import train_flow
from tasks.steps.shard import STATUS_FILE as SHARD_STATUS
from tasks.steps.shard import shard_files
from training.gates import TrainingGateConfig
from training.launch import Launcher, LaunchSpec, check_launch
from training.metrics import METRICS_FILE, read_metrics
from training.shard_sets import train_data_fields


@flow(name="pipeline")
def pipeline(
    dataset: str,
    manifest: str,
    output_root: str,
    preprocess_options: PreprocessOptions = PreprocessOptions(),
    train: Optional[dict[str, Any]] = None,
    gates: Optional[TrainingGateConfig] = None,
    nproc_per_node: int = 2,
    launcher: Launcher = "torchrun",
    workers: int = 2,
    launch: Optional[dict[str, Any]] = None,
) -> dict | State:
    """`preprocess_options`: the preprocess flow's parameter groups (weights, windows, runner, storage, checks:
    flows/preprocess_options.py); `train`: TrainConfig
    fields beyond the data ones; `gates`: TrainingGateConfig fields; `launch`: further LaunchSpec fields for
    many nodes (nnodes, hostfile, master_addr, master_port, ds_launcher, ...).

    This flow preprocesses too, so it runs once: on many nodes only the deepspeed launcher over pdsh/ssh
    fits (node 0 starts the others). One-flow-run-per-node setups run preprocess, then `dualforce train` per node.
    """
    launch = dict(launch or {})
    spec = LaunchSpec(nproc_per_node=nproc_per_node, launcher=launcher, **launch)
    plan = check_launch(spec)
    if plan.waits_for_peers:
        raise ValueError(
            "the pipeline flow runs preprocess and must run once; for one launcher per node (torchrun or "
            "deepspeed no_ssh) run the preprocess flow, then `dualforce train` on every node (docs/multinode.md)"
        )
    logger = get_run_logger()
    pre = with_workers(workers)(dataset=dataset, manifest=manifest, output_root=output_root,
                                **preprocess_options.flow_parameters(), return_state=True)
    if not pre.is_completed():
        logger.error(f"preprocess ended {pre.name}: {pre.message}")
        return pre
    report = pre.result()
    layout = DatasetLayout(Path(output_root), dataset)
    n_shards = len(shard_files(layout.shards, "train"))
    if n_shards < plan.world_size:
        return Failed(name="NO-GO", message=f"{n_shards} train shards for {plan.world_size} training processes: "
                      "each process needs at least one shard (lower shard_max_samples or the process count)")
    logger.info(f"preprocess: {report['clips_out']}/{report['clips_in']} clips, {report['shards']['samples']} samples "
                f"in {n_shards} train shards; starting training")
    # One training directory per shard set: a re-run on the same shards resumes, new shards start afresh.
    shard_key = json.loads((layout.shards / SHARD_STATUS).read_text())["key"][:12]
    train = dict(train or {})
    cfg = {**train_data_fields([layout.shards], video_only=bool(train.get("video_only"))), **train,
           "out_dir": str(layout.base / "train" / f"shards-{shard_key}")}
    trained = train_flow(cfg, gates=gates, launch=spec, return_state=True)
    if not trained.is_completed():
        return trained
    result = {"preprocess": report, "training": training_summary(Path(cfg["out_dir"]), trained.name, trained.message)}
    if flow_run.get_parent_flow_run_id() is None:  # the top-level run: it carries the summary the CLI prints
        publish_summary(result, f"pipeline-{dataset}")
    return result


def training_summary(train_dir: Path, verdict: str, message: Optional[str]) -> dict:
    """What the last training attempt did, from its metrics.jsonl."""
    runs = sorted(train_dir.glob(f"run-*/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime)
    records = read_metrics(runs[-1]) if runs else []
    steps = [r for r in records if "loss" in r]
    return {
        "state": verdict,
        "message": message,
        "run_dir": str(runs[-1].parent) if runs else None,
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "samples_per_s": steps[-1].get("samples_per_s") if steps else None,
        "validation": _validation_line(runs[-1].parent) if runs else None,
    }


def _validation_line(run_dir: Path) -> Optional[str]:
    """Where the run's newest validation samples are (training/validation.py), or None."""
    from training.validation import latest_samples

    latest = latest_samples(run_dir)
    if latest is None:
        return None
    return (f"validation samples at step {latest['step']}: {len(latest['clips'])} clip(s), truth | generated mp4s and "
            f"the contact sheet {Path(latest['dir']) / latest['sheet']}")
