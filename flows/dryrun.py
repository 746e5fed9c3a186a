"""The dry-run flow: the main job on the sample clips, locally (manifest -> preprocess)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from datasets_manifest import build_manifest
from datasets_manifest.schema import write_manifest
from flows.preprocess import with_workers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "samples"


@flow(name="dry-run")
def dry_run(
    out: str = "dryrun-output",
    samples: str = str(DEFAULT_SAMPLES),
    batch_size: int = 1,
    workers: int = 2,
    window_n: int = 8,
    progress: bool = False,
) -> dict:
    """Build the samples manifest and preprocess it into shards under `out`."""
    logger = get_run_logger()
    out_dir, samples_dir = Path(out).resolve(), Path(samples).resolve()
    if not samples_dir.is_dir():
        raise FileNotFoundError(f"sample clips not found at {samples_dir}")
    built = build_manifest("samples", samples_dir)
    manifest = write_manifest(built.rows, out_dir / "manifest" / "samples.parquet")
    logger.info(f"dry-run: {len(built.rows)} sample clips from {samples_dir} -> {out_dir}")
    return with_workers(workers)(
        dataset="samples", manifest=str(manifest), output_root=str(out_dir),
        batch_size=batch_size, window_n=window_n, progress=progress,
    )
