"""The dry-run flow: the main job on the sample clips, locally: manifest -> preprocess -> a few training steps."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from datasets_manifest import build_manifest
from datasets_manifest.schema import write_manifest
from flows.pipeline import pipeline
from flows.preprocess import with_workers
from flows.run_artifacts import publish_summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "samples"

# A few ZeRO-2 steps of the tiny model on 2 CPU processes: proves the shards train, not that anything learns.
DRYRUN_TRAIN = dict(model_variant="tiny", ds_config="zero2", total_steps=4, micro_batch=1, ckpt_every=2,
                    warmup_steps=1, num_workers=0, shuffle_buffer=4)


@flow(name="dry-run")
def dry_run(
    out: str = "dryrun-output",
    samples: str = str(DEFAULT_SAMPLES),
    batch_size: int = 1,
    workers: int = 2,
    window_n: int = 4,
    window_stride: int = 200,
    train_steps: int = 4,
    train_processes: int = 2,
    progress: bool = False,
):
    """Build the samples manifest, preprocess it with dry-run models, then train a few steps on the shards.

    Windows are 17 frames every 200 frames: on CPU the Wan VAE (even a tiny one) costs about 0.5 s per
    512x512 frame, so the dry-run encodes a sparse sample of windows rather than every frame. Shards hold 2
    samples each so that both training processes get shards of their own.
    """
    logger = get_run_logger()
    out_dir, samples_dir = Path(out).resolve(), Path(samples).resolve()
    if not samples_dir.is_dir():
        raise FileNotFoundError(f"sample clips not found at {samples_dir}")
    built = build_manifest("samples", samples_dir)
    manifest = write_manifest(built.rows, out_dir / "manifest" / "samples.parquet")
    logger.info(f"dry-run: {len(built.rows)} sample clips from {samples_dir} -> {out_dir}")
    options = dict(batch_size=batch_size, window_n=window_n, window_stride=window_stride, shard_max_samples=2,
                   models="dryrun", progress=progress, audit_fraction=0.5)  # 2 of the 4 samples, every member
    if train_steps <= 0:
        report = with_workers(workers)(dataset="samples", manifest=str(manifest), output_root=str(out_dir), **options)
        result = {"preprocess": report, "training": None}
    else:
        result = pipeline(dataset="samples", manifest=str(manifest), output_root=str(out_dir),
                          preprocess_options=options, train=dict(DRYRUN_TRAIN, total_steps=train_steps),
                          nproc_per_node=train_processes, workers=workers)
    if isinstance(result, dict) and isinstance(result.get("preprocess"), dict):
        publish_summary(result, "dry-run")  # the run a user opens in the UI carries the CLI's summary
    return result
