"""The preprocess flow: manifest -> per-clip steps over batches -> shards, with a ledger and artifacts.

Reads like the DAG in DESIGN.md: each clip step is one Prefect task per *batch* of clips (not per clip,
so orchestration stays cheap at 30K+ clips); batch b's crop starts as soon as batch b's download is done.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from datasets_manifest.schema import read_manifest
from flows.layout import DatasetLayout
from flows.progress import Progress
from tasks.crop import CROP_INFO
from tasks.download import DownloadConfig
from tasks.ledger import step_counts, write_ledger_part
from tasks.shard import ShardClip, ShardConfig, write_shards
from tasks.step_runner import ClipState, LedgerEntry, Step, run_step
from tasks.step_store import StepStore, fingerprint
from tasks.steps import CropStep, DownloadStep

CLIP_STEPS = ("download", "crop")
ALL_STEPS = (*CLIP_STEPS, "shard")


@dataclass
class BatchResult:
    states: list[ClipState]
    entries: list[LedgerEntry] = field(default_factory=list)


def build_steps(names: tuple[str, ...], layout: DatasetLayout) -> list[Step]:
    available: dict[str, Step] = {
        "download": DownloadStep(DownloadConfig(cache_dir=layout.download_cache)),
        "crop": CropStep(),
    }
    return [available[n] for n in names if n in available]


@task(name="load-manifest", cache_policy=NO_CACHE)
def load_clips(manifest: str, limit: Optional[int]) -> tuple[list[ClipState], list[LedgerEntry]]:
    rows, bad = read_manifest(manifest)
    if limit is not None:
        rows = rows[:limit]
    now = time.time()
    errors = [
        LedgerEntry(f"row-{e.index}", "", "manifest", "rejected", "ran", "malformed_row", e.reason, "", "", "", 0.0, "", now)
        for e in bad
    ]
    return [ClipState(r) for r in rows], errors


@task(name="run-step-batch", cache_policy=NO_CACHE)
def run_step_batch(step: Step, batch: BatchResult, steps_root: str, run_id: str, progress: Optional[Progress] = None) -> BatchResult:
    logger = get_run_logger()
    store = StepStore(steps_root)

    def report(state: ClipState, entry: LedgerEntry) -> None:
        how = "cached" if entry.action == "skipped" else f"{entry.seconds:.1f}s"
        if entry.status == "ok":
            logger.info(f"{step.name} {entry.clip_id}: ok ({how})")
        else:
            logger.warning(f"{step.name} {entry.clip_id}: {entry.status} [{entry.reason}] {entry.detail}")
        if progress:
            progress.advance(f"{step.name} {entry.clip_id}")

    new = run_step(step, batch.states, store, run_id, on_clip=report)
    if progress:  # clips already dropped by an earlier step still count as done for this one
        progress.advance_many(len(batch.states) - len(new))
    return BatchResult(batch.states, batch.entries + new)


@task(name="write-shards", cache_policy=NO_CACHE)
def shard_clips(states: list[ClipState], layout: DatasetLayout, shard_cfg: ShardConfig, run_id: str) -> tuple[dict, list[LedgerEntry]]:
    import json

    logger = get_run_logger()
    store = StepStore(layout.steps)
    ready = [s for s in states if s.alive and "crop" in s.records]
    clips = []
    for s in ready:
        crop_dir = store.clip_dir("crop", s.row.clip_id)
        frames = json.loads((crop_dir / CROP_INFO).read_text())["frames"]
        clips.append(ShardClip(
            row=s.row, crop_dir=crop_dir, frames=frames,
            step_versions={name: rec.version for name, rec in s.records.items()},
            lineage={name: rec.checksum for name, rec in s.records.items()},
        ))
    key = fingerprint("shard", shard_cfg, sorted((c.row.model_dump_json(), sorted(c.lineage.items())) for c in clips))
    t0 = time.perf_counter()
    per_clip: dict[str, int] = {}
    stats = write_shards(clips, layout.shards, shard_cfg, key=key, on_clip=lambda c, n: per_clip.__setitem__(c.row.clip_id, n))
    seconds = time.perf_counter() - t0
    logger.info(f"shards: {stats.samples} samples in {stats.shards} shards ({'cached' if stats.skipped else f'{seconds:.1f}s'})")
    now = time.time()
    entries = [
        LedgerEntry(c.row.clip_id, c.row.dataset, "shard", "ok" if per_clip.get(c.row.clip_id, 1) else "rejected",
                    "skipped" if stats.skipped else "ran", "" if per_clip.get(c.row.clip_id, 1) else "too_short",
                    "" if per_clip.get(c.row.clip_id, 1) else "shorter than one window", "1", key, "",
                    0.0 if stats.skipped else seconds / max(1, len(clips)), run_id, now)
        for c in clips
    ]
    return {"samples": stats.samples, "shards": stats.shards, "bytes": stats.bytes, "per_split": stats.per_split,
            "skipped": stats.skipped, "seconds": seconds, "out_dir": str(stats.out_dir)}, entries


def _publish(dataset: str, counts: list[dict], rejected: list[dict], shard_stats: Optional[dict]) -> None:
    slug = "".join(ch if ch.isalnum() else "-" for ch in dataset.lower())
    create_table_artifact(table=counts, key=f"preprocess-{slug}-steps", description=f"Per-step clip counts for {dataset}")
    if rejected:
        create_table_artifact(table=rejected, key=f"preprocess-{slug}-failures", description="Clips that did not make it, with reasons")
    if shard_stats:
        md = (f"### {dataset}: {shard_stats['samples']} samples in {shard_stats['shards']} shards\n\n"
              f"Output: `{shard_stats['out_dir']}`\n\nPer split: {shard_stats['per_split']}")
        create_markdown_artifact(markdown=md, key=f"preprocess-{slug}-shards", description="Shard set summary")


@flow(name="preprocess", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1))
def preprocess(
    dataset: str,
    manifest: str,
    output_root: str,
    steps: Optional[list[str]] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    window_n: int = 8,
    window_stride: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Preprocess one dataset's manifest into shards under `output_root/<dataset>/`."""
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or uuid.uuid4())
    wanted = tuple(steps) if steps else ALL_STEPS
    unknown = set(wanted) - set(ALL_STEPS)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; choose from {ALL_STEPS}")
    layout = DatasetLayout(Path(output_root), dataset)
    cleaned = StepStore(layout.steps).clean_staging()
    if cleaned:
        logger.info(f"removed {cleaned} leftovers of an interrupted run")
    states, manifest_errors = load_clips(manifest, limit)
    clip_steps = build_steps(tuple(s for s in CLIP_STEPS if s in wanted), layout)
    logger.info(f"{dataset}: {len(states)} clips, steps {list(wanted)}, batches of {batch_size}")
    bar = Progress(total=len(states) * len(clip_steps), desc=dataset) if progress else None

    batches = [BatchResult(states[i : i + batch_size]) for i in range(0, len(states), batch_size)]
    step_seconds: dict[str, float] = {}
    runner = run_step_batch.with_options(task_run_name="{step.name}-batch")
    futures = batches
    for step in clip_steps:
        futures = [runner.submit(step, f, str(layout.steps), run_id, bar) for f in futures]
    results: list[BatchResult] = [f.result() if hasattr(f, "result") else f for f in futures]
    if bar:
        bar.close()
    entries = manifest_errors + [e for r in results for e in r.entries]
    all_states = [s for r in results for s in r.states]

    shard_stats = None
    if "shard" in wanted:
        shard_stats, shard_entries = shard_clips(all_states, layout, ShardConfig(n=window_n, stride=window_stride), run_id)
        entries += shard_entries
    write_ledger_part(layout.ledger, entries, f"run-{time.strftime('%Y%m%dT%H%M%S')}-{run_id[:8]}")

    counts = step_counts(entries)
    for c in counts:
        step_seconds[c["step"]] = c["seconds"]
    rejected = [
        {"clip_id": s.row.clip_id, "step": s.failure.step, "status": s.failure.status, "reason": s.failure.reason, "detail": s.failure.detail}
        for s in all_states if s.failure
    ] + [{"clip_id": e.clip_id, "step": "manifest", "status": "rejected", "reason": e.reason, "detail": e.detail} for e in manifest_errors]
    _publish(dataset, counts, rejected, shard_stats)
    return {
        "dataset": dataset,
        "clips_in": len(states) + len(manifest_errors),
        "clips_out": sum(1 for s in all_states if s.alive),
        "rejected": rejected,
        "step_counts": counts,
        "shards": shard_stats,
        "output": str(layout.base),
        "run_id": run_id,
    }


def with_workers(workers: int):
    """The flow with a thread pool of `workers` batches at a time (steps shell out to ffmpeg or release the GIL)."""
    return preprocess.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers)))
