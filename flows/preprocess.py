"""The preprocess flow: manifest -> per-clip steps over batches -> 3D-latent gate -> shards.

Two profiles, declared in tasks/steps/pipeline.py: `talking_head` (download, face crop, motion, pose check, HuBERT,
VAE, shard) and `general` (download, centre crop, VAE, shard: video-only samples for the pretrain stage).

Reads like the DAG in DESIGN.md: each clip step is one Prefect task per *batch* of clips (not per clip, so
orchestration stays cheap at 30K+ clips); batch b's crop starts as soon as batch b's download is done. The
dataset-level "3D latent quality" gate runs once every clip has been through the pose cross-check; a no-go
ends the run in a named failed state before any shard is written. The flow is three calls: plan_run (weights,
manifest, steps, nothing run yet) -> run_and_shard (clip steps, gate, shards) -> finish (audit, ledger, report).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from datasets_manifest.schema import read_manifest, validate_dataset_name
from flows.audit_artifacts import audit_state, publish_audit
from flows.gate_artifacts import publish_gate
from flows.layout import DatasetLayout
from flows.outcomes import BAD_WEIGHTS, UNUSABLE_INPUT, unusable_manifest_message
from flows.preprocess_options import (
    ModelWeights,
    PreprocessOptions,
    Profile,
    QualityChecks,
    RunnerOptions,
    StorageOptions,
    WindowOptions,
)
from flows.progress import Progress
from flows.run_artifacts import ProgressArtifact, publish_contact_sheet, publish_summary
from flows.runners import RayConfig, batch_submitter
from models.weights import WeightsError
from tasks import storage as tasks_storage
from tasks.audit import AuditConfig, AuditModels, AuditReport, audit_shards
from tasks.contact_sheet import AcceptedClip, RejectedClip, contact_sheet
from tasks.feature_models import FeatureModels, dryrun_models
from tasks.gate_verdict import GateVerdict
from tasks.ledger import LEDGER_DIR, step_counts, write_ledger_part
from tasks.run_report import preprocess_report, rejected_rows
from tasks.step_runner import ClipState, LedgerEntry, Step, run_step
from tasks.step_store import StepStore, fingerprint
from tasks.steps.audio_features import AudioFeaturesStep
from tasks.steps.crop import CropStep
from tasks.steps.download import DOWNLOADED_VIDEO, DownloadStep
from tasks.steps.flame_struct import FlameStructStep
from tasks.steps.motion import MotionStep
from tasks.steps.pipeline import (
    TALKING_HEAD,
    TALKING_HEAD_FLAME,
    PreprocessProfile,
    StepOptions,
    build_steps,
    preprocess_profile,
    wanted_steps,
    weights_needed,
)
from tasks.steps.pose_check import PoseCheckConfig, PoseCheckStep, latent_quality_gate
from tasks.steps.shard import (
    GroupResult,
    ShardConfig,
    ShardStep,
    begin_shard_set,
    merge_shard_groups,
    plan_groups,
    write_shard_group,
)
from tasks.steps.shard_inputs import group_key, profile_part, shard_clip, struct_source, struct_stats
from tasks.steps.vae_latents import VaeLatentsStep


@dataclass
class BatchResult:
    states: list[ClipState]
    entries: list[LedgerEntry] = field(default_factory=list)


def clip_steps_for(profile: PreprocessProfile, wanted: tuple[str, ...], layout: DatasetLayout,
                   models: Optional[FeatureModels], windows: WindowOptions, weights: ModelWeights,
                   checks: QualityChecks) -> list[Step]:
    """The clip steps of `wanted`, in the profile's order, configured from the parameter groups (the feature steps
    only with `models`)."""
    options = StepOptions(download_cache=layout.download_cache, models=models, windows=windows.shard_config(),
                          pose=PoseCheckConfig(threshold_deg=checks.pose_threshold_deg), flame_dir=weights.flame_dir)
    return build_steps(profile, wanted, options)


def _run_name(run_id: str) -> str:
    """The name of this run's ledger part (and contact sheet): when it was written, then the run id."""
    return f"run-{time.strftime('%Y%m%dT%H%M%S')}-{run_id[:8]}"


@task(name="load-manifest", cache_policy=NO_CACHE)
def load_clips(manifest: str, limit: Optional[int]) -> tuple[list[ClipState], list[LedgerEntry]]:
    rows, bad = read_manifest(manifest)
    if limit is not None:
        rows = rows[:limit]
    now = time.time()
    errors = [
        LedgerEntry(clip_id=f"row-{e.index}", dataset="", step="manifest", status="rejected", action="ran",
                    reason="malformed_row", detail=e.reason, version="", key="", checksum="", seconds=0.0, run_id="",
                    finished_at=now)
        for e in bad
    ]
    return [ClipState(r) for r in rows], errors


def hydrate(states: list[ClipState], store: StepStore, steps: tuple[str, ...]) -> None:
    """Results of steps this run does not execute, taken from earlier runs (a shard-only run, a backfill)."""
    for state in states:
        for step in steps:
            rec = store.load(step, state.row.clip_id)
            if rec is not None and rec.status == "ok":
                state.records[step] = rec


@task(name="run-step-batch", cache_policy=NO_CACHE)
def run_step_batch(step: Step, batch: BatchResult, steps_root: str, run_id: str, progress: Optional[Progress] = None,
                   scratch_root: Optional[str] = None, retry_rejected: bool = False) -> BatchResult:
    logger = get_run_logger()
    store = StepStore(steps_root, scratch_root)

    def report(state: ClipState, entry: LedgerEntry) -> None:
        if entry.status != "ok":  # a clip that did not make it gets its own line; the others are counted below
            logger.warning(f"{step.name} {entry.clip_id}: {entry.status} [{entry.reason}] {entry.detail}")
        if progress:
            progress.advance(f"{step.name} {entry.clip_id}")

    new = run_step(step, batch.states, store, run_id, on_clip=report, retry_rejected=retry_rejected)
    if progress:  # clips already dropped by an earlier step still count as done for this one
        progress.advance_many(len(batch.states) - len(new))
    if new:
        logger.info(batch_line(step.name, new))
    return BatchResult(batch.states, batch.entries + new)


def batch_line(step: str, entries: list[LedgerEntry]) -> str:
    """One log line per batch and step (a line per clip was 4.6 lines a clip in the Prefect database at 1,000
    clips, 46,000 at 10,000): `crop: 7 ok (2 cached), 1 rejected in 5.2s`."""
    ok = [e for e in entries if e.status == "ok"]
    cached = sum(1 for e in ok if e.action == "skipped")
    others = Counter(e.status for e in entries if e.status != "ok")
    parts = [f"{len(ok)} ok" + (f" ({cached} cached)" if cached else "")]
    parts += [f"{n} {status}" for status, n in sorted(others.items())]
    return f"{step}: {', '.join(parts)} in {sum(e.seconds for e in entries):.1f}s"


def run_clip_steps(clip_steps: list[Step], states: list[ClipState], submitter, layout: DatasetLayout, run_id: str,
                   scratch_root: Optional[str], retry_rejected: bool, batch_size: int, dataset: str,
                   progress: Optional[Progress] = None) -> list[BatchResult]:
    """The steps over batches of clips: batch b's next step starts as soon as its previous one is done."""
    futures: list = [BatchResult(states[i : i + batch_size]) for i in range(0, len(states), batch_size)]
    batch_task = run_step_batch.with_options(task_run_name="{step.name}-batch")
    submitted: list = []
    for step in clip_steps:
        futures = [submitter.submit(batch_task, step.name, step=step, batch=f, steps_root=str(layout.steps),
                                    run_id=run_id, progress=progress, scratch_root=scratch_root,
                                    retry_rejected=retry_rejected) for f in futures]
        submitted += futures
    if submitted:  # the UI's progress bar moves as each batch-step finishes, in whatever order
        moving = ProgressArtifact(len(states) * len(clip_steps), f"preprocess-{dataset}",
                                  f"clip-steps ({len(states)} clips x {len(clip_steps)} steps)")
        for done in as_completed(submitted):
            moving.advance(len(done.result().states))
    return [f.result() if hasattr(f, "result") else f for f in futures]


def flame_candidates(states: list[ClipState]) -> list[ClipState]:
    """Every clip the crop accepted, with only its download and crop results: the FLAME struct source does not
    need LivePortrait's motion, so clips the pose check rejected for disagreeing with it come back."""
    keep = (DownloadStep.name, CropStep.name)
    return [ClipState(s.row, {k: r for k, r in s.records.items() if k in keep}) for s in states
            if all(k in s.records and s.records[k].status == "ok" for k in keep)]


@task(name="audit-shards", cache_policy=NO_CACHE)
def audit_task(layout: DatasetLayout, models: Optional[FeatureModels], cfg: AuditConfig,
               profile: PreprocessProfile = TALKING_HEAD) -> AuditReport:
    """Re-derive a fraction of the new shard set's samples from the step outputs; publish what was compared."""
    from tasks import feature_models as loaded

    if models is None:
        extractors = AuditModels()
    else:  # the general profile has no motion step (and a real run of it names no LivePortrait weights)
        extractors = AuditModels(loaded.wan_vae(models),
                                 loaded.motion_extractor(models) if MotionStep.name in profile.feature_steps else None)
    report = audit_shards(layout.base / "shards", layout.steps, extractors, cfg)
    publish_audit(report, key_prefix=f"preprocess-{layout.dataset}")
    (get_run_logger().info if report.ok else get_run_logger().error)(f"audit: {report.summary()}")
    return report


@task(name="contact-sheet", cache_policy=NO_CACHE)
def contact_sheet_task(states: list[ClipState], layout: DatasetLayout, run_name: str,
                       crop_step: str = CropStep.name) -> Optional[Path]:
    """The run's contact sheet beside its ledger part, and as an artifact."""
    steps = Path(layout.steps)
    accepted = [AcceptedClip(s.row.clip_id, steps / crop_step / s.row.clip_id) for s in states
                if s.alive and crop_step in s.records]
    rejected = []
    for s in states:
        if s.failure is None:
            continue
        downloaded = steps / DownloadStep.name / s.row.clip_id / DOWNLOADED_VIDEO
        local = Path(s.row.source.split("#sha256=")[0])
        source = downloaded if downloaded.is_file() else (local if local.is_absolute() and local.is_file() else None)
        rejected.append(RejectedClip(s.row.clip_id, s.failure.step, s.failure.reason, source))
    png = contact_sheet(accepted, rejected, layout.base / LEDGER_DIR / f"contact-sheet-{run_name}.png",
                        run_id=f"{layout.dataset} {run_name}")
    if png is not None:
        publish_contact_sheet(png, f"preprocess-{layout.dataset}")
    return png


@task(name="latent-quality-gate", cache_policy=NO_CACHE)
def latent_gate(states: list[ClipState], max_drop_ratio: float) -> GateVerdict:
    per_clip = {}
    for s in states:
        rec = s.records.get(PoseCheckStep.name)
        if rec is not None and "total" in rec.info:
            per_clip[s.row.clip_id] = (int(rec.info["dropped"]), int(rec.info["total"]))
    verdict = latent_quality_gate(per_clip, max_drop_ratio)
    get_run_logger().info(f"gate 3d_latent_quality: {verdict.summary}")
    return verdict


@task(name="write-shard-group", cache_policy=NO_CACHE)
def shard_group(group: str, states: list[ClipState], steps_root: str, shards_out: str, shard_cfg: ShardConfig,
                with_features: bool, key: str, scratch_root: Optional[str] = None,
                profile: PreprocessProfile = TALKING_HEAD) -> GroupResult:
    """One shard group, on whichever worker: its clips' windows into `<split>/shard-<group>-*.tar`."""
    with StepStore(steps_root, scratch_root) as store:  # a remote store's local copies are freed on exit
        clips = [shard_clip(s, store, with_features, profile) for s in states]
        result = write_shard_group(clips, shards_out, group, shard_cfg, key)
    get_run_logger().info(f"shard group {group}: {sum(s['samples'] for s in result.shards)} samples in "
                          f"{len(result.shards)} shards ({'cached' if result.skipped else f'{result.seconds:.1f}s'})")
    return result


def shard_clips(states: list[ClipState], layout: DatasetLayout, shard_cfg: ShardConfig, with_features: bool,
                run_id: str, groups: int, submitter,
                profile: PreprocessProfile = TALKING_HEAD) -> tuple[dict, list[LedgerEntry]]:
    """Shard groups in parallel (one task each), then the one merge: index, stats, garbage collection."""
    logger = get_run_logger()
    step = ShardStep(shard_cfg, (profile.crop_step, *profile.feature_steps) if with_features else (profile.crop_step,))
    ready = step.ready(states)
    planned = plan_groups(ready, groups, clip_id=lambda s: s.row.clip_id)
    keys = {g: group_key(g, members, shard_cfg, with_features, profile) for g, members in planned.items()}
    set_key = fingerprint("shard-set", shard_cfg, with_features, groups, sorted(keys.items()), *profile_part(profile))
    t0 = time.perf_counter()
    done = begin_shard_set(layout.shards_url, set_key)
    futures = [submitter.submit(shard_group.with_options(task_run_name=f"shard-{g}"), step.name, group=g, states=members,
                                steps_root=str(layout.steps), shards_out=layout.shards_url, shard_cfg=shard_cfg,
                                with_features=with_features, key=keys[g],
                                scratch_root=None if layout.scratch_root is None else str(layout.scratch_root),
                                profile=profile)
               for g, members in planned.items()]
    results: list[GroupResult] = [f.result() for f in futures]
    if done is None:
        merged = merge_shard_groups(layout.shards_url, results, shard_cfg, set_key, groups, profile.sample_profile,
                                    struct_stats(ready, profile) if with_features else None)
        if merged.removed:
            logger.info(f"shards: removed {len(merged.removed)} files no index lists (an interrupted or older run's)")
        stats = {"samples": merged.samples, "shards": merged.shards, "bytes": merged.bytes, "per_split": merged.per_split}
    else:
        stats = {k: done[k] for k in ("samples", "shards", "bytes", "per_split")}
    seconds = time.perf_counter() - t0
    skipped = done is not None
    logger.info(f"shards: {stats['samples']} samples in {stats['shards']} shards ({'cached' if skipped else f'{seconds:.1f}s'})")
    entries = step.ledger_entries(results, planned, run_id)
    return {**stats, "skipped": skipped, "seconds": seconds, "out_dir": layout.shards_url, "groups": len(planned)}, entries


def _publish(dataset: str, counts: list[dict], rejected: list[dict], shard_stats: Optional[dict]) -> None:
    slug = "".join(ch if ch.isalnum() else "-" for ch in dataset.lower())
    create_table_artifact(table=counts, key=f"preprocess-{slug}-steps", description=f"Per-step clip counts for {dataset}")
    if rejected:
        create_table_artifact(table=rejected, key=f"preprocess-{slug}-failures",
                              description="Clips that did not make it, with reasons")
    if shard_stats:
        md = (f"### {dataset}: {shard_stats['samples']} samples in {shard_stats['shards']} shards\n\n"
              f"Output: `{shard_stats['out_dir']}`\n\nPer split: {shard_stats['per_split']}")
        create_markdown_artifact(markdown=md, key=f"preprocess-{slug}-shards", description="Shard set summary")


def resolve_models(weights: ModelWeights, profile: PreprocessProfile = TALKING_HEAD,
                   validate: bool = True) -> FeatureModels:
    """`dryrun`: write random models of the real architectures; `real`: check every weight path the profile
    needs first (the general profile needs the Wan VAE alone) and, with `validate`, load each strictly."""
    if weights.models == "dryrun":
        return dryrun_models()
    given = {"liveportrait_root": weights.liveportrait_root, "hubert": weights.hubert, "wan_vae": weights.wan_vae}
    needed = weights_needed(profile)
    missing = [n for n in needed if not given[n]]
    if missing:
        raise ValueError(f"a real run needs {', '.join(missing)} (weights are never downloaded; models='dryrun' for random ones)")
    used = {n: v if n in needed else "" for n, v in given.items()}  # "": a model this profile does not load
    chosen = FeatureModels(used["liveportrait_root"], used["hubert"], used["wan_vae"], weights.wan_vae_subfolder,
                           device=weights.device)
    if validate:
        chosen.validate()
    return chosen


@dataclass
class ShardPhase:
    """What the gate and shard phase leaves: the clips (revived by the FLAME fallback), the profile their samples
    were made with, the ledger rows it added, the gate's state and the fallback taken, the shard set's stats."""

    states: list[ClipState]
    profile: PreprocessProfile
    entries: list[LedgerEntry]
    gate_state: Optional[State]
    fallback: Optional[str]
    shard_stats: Optional[dict]


def gate_then_shard(states: list[ClipState], wanted: tuple[str, ...], profile: PreprocessProfile, submitter,
                    layout: DatasetLayout, feature_models: Optional[FeatureModels], windows: WindowOptions,
                    with_features: bool, weights: ModelWeights, checks: QualityChecks, run_id: str,
                    run_batches: dict) -> ShardPhase:
    """The 3D-latent gate when the pose check ran; on a NO-GO with FLAME files, its remedy (the struct step from
    the tracker files for every cropped clip); then the shards, unless the gate stopped the run."""
    logger = get_run_logger()
    entries: list[LedgerEntry] = []
    gate_state = fallback = None
    if PoseCheckStep.name in wanted:
        gate_state = publish_gate(latent_gate(states, checks.max_frame_drop_ratio), key_prefix=f"preprocess-{layout.dataset}")
    if gate_state is not None and gate_state.is_failed() and weights.flame_dir and ShardStep.name in wanted:
        revived = flame_candidates(states)
        fallback = (f"struct source switched to FLAME: {len(revived)} clips re-run from the tracker files in "
                    f"{weights.flame_dir}")
        logger.warning(f"3D-latent gate NO-GO: {fallback}")
        flame_steps = clip_steps_for(TALKING_HEAD_FLAME, (FlameStructStep.name, AudioFeaturesStep.name,
                                                          VaeLatentsStep.name), layout, feature_models, windows,
                                     weights, checks)
        flame_results = run_clip_steps(flame_steps, revived, submitter, **run_batches)
        entries += [e for r in flame_results for e in r.entries]
        by_id = {s.row.clip_id: s for r in flame_results for s in r.states}
        states = [by_id.get(s.row.clip_id, s) for s in states]
        profile = TALKING_HEAD_FLAME
    shard_stats = None
    if ShardStep.name in wanted and (gate_state is None or not gate_state.is_failed() or fallback):
        shard_stats, shard_entries = shard_clips(states, layout, windows.shard_config(), with_features, run_id,
                                                 windows.shard_groups, submitter, profile)
        entries += shard_entries
    return ShardPhase(states, profile, entries, gate_state, fallback, shard_stats)


@flow(name="preprocess", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1))
def preprocess(
    dataset: str,
    manifest: str,
    output_root: str,
    profile: Profile = "talking_head",
    steps: Optional[list[str]] = None,
    limit: Optional[int] = None,
    weights: ModelWeights = ModelWeights(),
    windows: WindowOptions = WindowOptions(),
    runner: RunnerOptions = RunnerOptions(),
    storage: StorageOptions = StorageOptions(),
    checks: QualityChecks = QualityChecks(),
) -> dict:
    """Preprocess one dataset's manifest into shards under `output_root/<dataset>/`.

    `profile`: "talking_head" (face crop, motion, pose check, HuBERT, VAE: every member) or "general" (centre
    crop and VAE: video-only samples, video.mp4 + meta.json + the two latents, for the pretrain stage; real
    runs name only the Wan VAE). `steps` chooses among the profile's steps (default: all of them); `limit` takes
    the manifest's first rows. The groups (flows/preprocess_options.py): `weights` (dryrun or real, the weight
    paths, the FLAME fallback's files), `windows` (window size and stride, shard sizes, whether shards carry the
    features), `runner` ("local" threads, a "processes" pool or "ray" tasks; batch size and resources; see
    flows/runners.py), `storage` (work_root for step outputs and a local scratch_root; output_root and work_root
    may be fsspec URLs, see flows/layout.py) and `checks` (pose threshold, the 3D-latent gate's drop limit, the
    audited share of the new shard set -- a mismatch ends the run AUDIT-MISMATCH -- and whether cached rejections
    run again; transient failures, status `retryable`, are always retried).
    """
    options = PreprocessOptions(steps=steps, limit=limit, weights=weights, windows=windows, runner=runner,
                                storage=storage, checks=checks)
    plan = plan_run(dataset, manifest, output_root, profile, options)
    if isinstance(plan, State):  # unusable weights or manifest: nothing was run
        return plan
    results, phase = run_and_shard(plan, options)
    return finish(plan, results, phase, options)


@dataclass
class RunPlan:
    """What a run will do, settled before any clip is touched: the profile and steps, where outputs go, the models,
    the clips (with what earlier runs left of the steps this one does not run), whether shards carry features."""

    run_id: str
    dataset: str
    profile: PreprocessProfile
    wanted: tuple[str, ...]
    layout: DatasetLayout
    store: StepStore
    feature_models: Optional[FeatureModels]
    states: list[ClipState]
    manifest_errors: list[LedgerEntry]
    clip_steps: list[Step]
    with_features: bool


def plan_run(dataset: str, manifest: str, output_root: str, profile: str,
             options: PreprocessOptions) -> RunPlan | State:
    """Check the weights and read the manifest (a failed state naming what to fix when either is unusable)."""
    logger = get_run_logger()
    weights, windows, storage = options.weights, options.windows, options.storage
    run_id = str(flow_run.get_id() or uuid.uuid4())
    chosen = preprocess_profile(profile)
    wanted = wanted_steps(chosen, options.steps)
    validate_dataset_name(dataset)  # it names a folder under output_root
    layout = DatasetLayout(output_root, dataset, storage.work_root, storage.scratch_root)
    needs_models = any(s in wanted for s in chosen.feature_steps)
    feature_models = None
    if needs_models:  # fail fast, before any clip is touched
        try:
            feature_models = resolve_models(weights, chosen)
        except WeightsError as exc:
            logger.error(str(exc))
            return Failed(name=BAD_WEIGHTS, message=str(exc))
        if feature_models.dryrun:
            logger.warning(f"DRY RUN: {', '.join(chosen.feature_steps)} use small randomly initialised models; their "
                           "outputs are marked untrained_dryrun")
    store = StepStore(layout.steps, storage.scratch_root)
    cleaned = store.clean_staging()
    if cleaned:
        logger.info(f"removed {cleaned} leftovers of an interrupted run")
    try:
        states, manifest_errors = load_clips(manifest, options.limit)
    except Exception as exc:  # a missing file, not parquet, another schema
        message = f"manifest {manifest} cannot be read ({type(exc).__name__}: {exc}); nothing was run"
        logger.error(message)
        return Failed(name=UNUSABLE_INPUT, message=message)
    if not states:  # nothing to do is not a data-quality verdict: say what to fix
        message = unusable_manifest_message(manifest, manifest_errors)
        write_ledger_part(layout.ledger, manifest_errors, _run_name(run_id))
        logger.error(message)
        return Failed(name=UNUSABLE_INPUT, message=message)
    clip_steps = clip_steps_for(chosen, wanted, layout, feature_models, windows, weights, options.checks)
    run_names = {step.name for step in clip_steps}
    hydrate(states, store, tuple(s for s in chosen.clip_steps if s not in run_names))
    if windows.shard_features is None:  # features when this run makes them, or an earlier one made them for all
        with_features = needs_models or bool(states) and all(all(n in s.records for n in chosen.feature_steps)
                                                             for s in states)
    else:
        with_features = windows.shard_features
    logger.info(f"{dataset}: {len(states)} clips, profile {profile}, steps {list(wanted)}")
    return RunPlan(run_id, dataset, chosen, wanted, layout, store, feature_models, states, manifest_errors, clip_steps,
                   with_features)


def run_and_shard(plan: RunPlan, options: PreprocessOptions) -> tuple[list[BatchResult], ShardPhase]:
    """The clip steps over batches on the chosen runner, then the gate and the shards."""
    runner, checks = options.runner, options.checks
    local = runner.runner == "local"
    bar = (Progress(total=len(plan.states) * len(plan.clip_steps), desc=plan.dataset)
           if runner.progress and local else None)
    ray_cfg = RayConfig(address=runner.ray_address, num_cpus=runner.ray_num_cpus, cpus_per_batch=runner.cpus_per_batch,
                        gpus_per_batch=runner.gpus_per_batch)
    run_batches = dict(layout=plan.layout, run_id=plan.run_id, scratch_root=options.storage.scratch_root,
                       retry_rejected=checks.retry_rejected, batch_size=runner.batch_size, dataset=plan.dataset)
    get_run_logger().info(f"{plan.dataset}: batches of {runner.batch_size} on the {runner.runner} runner")
    with batch_submitter(runner.runner, ray_cfg, runner.processes) as submitter:
        try:
            results = run_clip_steps(plan.clip_steps, plan.states, submitter, progress=bar, **run_batches)
        finally:
            if bar:
                bar.close()
        phase = gate_then_shard([s for r in results for s in r.states], plan.wanted, plan.profile, submitter,
                                plan.layout, plan.feature_models, options.windows, plan.with_features, options.weights,
                                checks,
                                plan.run_id, run_batches)
    return results, phase


def finish(plan: RunPlan, results: list[BatchResult], phase: ShardPhase, options: PreprocessOptions) -> dict | State:
    """Audit the new shard set, write the ledger part and the contact sheet, publish the report; the run's state is
    the gate's NO-GO or the audit's mismatch when either stopped it, else the report."""
    logger = get_run_logger()
    layout, dataset, feature_models = plan.layout, plan.dataset, plan.feature_models
    checks = options.checks
    entries = plan.manifest_errors + [e for r in results for e in r.entries] + phase.entries
    audit = None
    if phase.shard_stats and phase.shard_stats["samples"] and checks.audit_fraction > 0:
        if layout.is_local and tasks_storage.local_path(layout.steps) is not None:
            audit = audit_task(layout, feature_models, AuditConfig(fraction=checks.audit_fraction), phase.profile)
        else:
            logger.info("audit: skipped (it reads shards and step outputs from local folders)")
    run_name = _run_name(plan.run_id)
    write_ledger_part(layout.ledger, entries, run_name)
    sheet = (contact_sheet_task(phase.states, layout, run_name, phase.profile.crop_step)
             if layout.is_local and not plan.store.remote else None)

    counts = step_counts(entries)
    rejected = rejected_rows(phase.states, plan.manifest_errors)
    _publish(dataset, counts, rejected, phase.shard_stats)
    gate = phase.gate_state
    report = preprocess_report(
        dataset=dataset, profile=plan.profile.name, clips_in=len(plan.states) + len(plan.manifest_errors),
        states=phase.states, rejected=rejected, step_counts=counts, shards=phase.shard_stats,
        gate=None if gate is None else {"name": gate.name, "message": gate.message, "action": phase.fallback},
        struct_source=struct_source(phase.profile), audit=audit, contact_sheet=None if sheet is None else str(sheet),
        untrained_dryrun=bool(feature_models and feature_models.dryrun), output=layout.output,
        runner=options.runner.runner, run_id=plan.run_id)
    if flow_run.get_parent_flow_run_id() is None:  # run on its own: this run is the one a user opens
        publish_summary(report, f"preprocess-{dataset}")
    if gate is not None and gate.is_failed() and not phase.fallback:
        logger.error(gate.message)
        fs, base = tasks_storage.filesystem(layout.output)
        tasks_storage.write_bytes(fs, tasks_storage.join(base, "gate-no-go.json"),
                                  json.dumps(report, indent=1, default=str).encode())
        return gate
    if audit is not None and not audit.ok:
        return audit_state(audit, layout.output, report)
    return report


def with_workers(workers: int):
    """The flow with a thread pool of `workers` batches at a time (steps shell out to ffmpeg or release the GIL)."""
    return preprocess.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers)))
