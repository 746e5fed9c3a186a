"""The backfill flow: after a step's version is bumped (its class in tasks/steps/) or its config changes, first say which stored
step results are stale and for how many clips, then run preprocess, which recomputes exactly those and what they
feed (their cache keys changed) and reuses everything else; the shard set is rebuilt from the new results.

The listing is a table artifact (`backfill-<dataset>-stale`) and part of the result, so the deployment's run page
shows what the version bump cost before and what it did after (the preprocess report's step counts: ran vs
skipped).
"""
from __future__ import annotations

from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from datasets_manifest.schema import read_manifest, validate_dataset_name
from flows.layout import DatasetLayout
from flows.preprocess import clip_steps_for, preprocess, resolve_models, with_workers
from flows.preprocess_options import PreprocessOptions, Profile
from models.weights import WeightsError
from tasks.step_runner import stale_scan
from tasks.step_store import StepStore
from tasks.steps.pipeline import preprocess_profile, wanted_steps


@task(name="stale-step-results", cache_policy=NO_CACHE)
def stale_results(dataset: str, manifest: str, output_root: str, profile: str, options: PreprocessOptions) -> list[dict]:
    """Per clip step of the run: current / stale / behind a stale step / missing (tasks/step_runner.stale_scan)."""
    chosen = preprocess_profile(profile)
    wanted = wanted_steps(chosen, options.steps)
    storage = options.storage
    layout = DatasetLayout(output_root, dataset, storage.work_root, storage.scratch_root)
    models = None
    if any(s in wanted for s in chosen.feature_steps):
        try:  # the feature steps' keys need the weight paths, not the loaded models
            models = resolve_models(options.weights, chosen, validate=False)
        except (ValueError, WeightsError):
            models = None  # preprocess says what is wrong with them; the listing leaves those steps out
    clip_steps = clip_steps_for(chosen, wanted, layout, models, options.windows, options.weights, options.checks)
    rows, _ = read_manifest(manifest)
    rows = rows[:options.limit] if options.limit is not None else rows
    return stale_scan(clip_steps, rows, StepStore(layout.steps, storage.scratch_root))


@flow(name="backfill", log_prints=True)
def backfill(
    dataset: str,
    manifest: str,
    output_root: str,
    profile: Profile = "talking_head",
    preprocess_options: PreprocessOptions = PreprocessOptions(),
    workers: Optional[int] = None,
) -> dict | State:
    """List the stale step results, then preprocess with the same options (steps, limit and the parameter groups
    of flows/preprocess_options.py, as the pipeline flow takes them); `workers`: batches at a time (default: one
    per CPU)."""
    logger = get_run_logger()
    validate_dataset_name(dataset)
    listing = stale_results(dataset, manifest, output_root, profile, preprocess_options)
    create_table_artifact(table=listing, key=f"backfill-{dataset.lower()}-stale",
                          description=f"{dataset}: stored step results before the backfill")
    for row in listing:
        logger.info(f"{row['step']} (version {row['version']}): {row['stale']} stale, {row['behind_stale']} behind a "
                    f"stale step, {row['missing']} missing, {row['current']} current")
    if not any(row["stale"] or row["behind_stale"] or row["missing"] for row in listing):
        logger.info("every stored result is current: the run below reuses them all and only checks the shard set")
    run = with_workers(workers) if workers else preprocess
    state = run(dataset=dataset, manifest=manifest, output_root=output_root, profile=profile,
                **preprocess_options.flow_parameters(), return_state=True)
    if not state.is_completed():
        return state
    return {"stale_before": listing, "preprocess": state.result()}
