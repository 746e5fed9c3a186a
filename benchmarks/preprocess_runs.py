"""Timed preprocess-flow runs over many short copies of the sample clips (shared by the flow benchmarks).

A "copy" is a manifest row cutting [start, start + seconds] out of a sample clip: every copy is a distinct
clip (its own download trim, crop, ledger rows), so N copies cost N clips of work without N source files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"
# (file, seconds of usable audio + video): clips must hold a face and audio to get through crop
SOURCES = (("sun.mp4", 22.0), ("more/lp_d12.mp4", 7.3), ("more/lp_s18.mp4", 9.4))


def malloc_env() -> dict[str, str]:
    """scripts/malloc.env's settings, with what the environment already sets winning (as ./run exports them): the
    runs a benchmark measures get the allocator our users' processes get."""
    pairs = (line.split("=", 1) for line in (REPO / "scripts" / "malloc.env").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {key: os.environ.get(key, value) for key, value in pairs}


def prefect_env(home: Path) -> None:
    """A private embedded Prefect (temporary server, SQLite under `home`), quiet, no telemetry."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def copies_manifest(path: Path, n: int, seconds: float = 1.6, samples: Path = SAMPLES) -> Path:
    """A manifest of `n` distinct clips of `seconds` each, cut round-robin from the sample clips."""
    from datasets_manifest.schema import ClipRow, write_manifest

    rows = []
    offsets = {name: 0.0 for name, _ in SOURCES}
    for i in range(n):
        name, length = SOURCES[i % len(SOURCES)]
        start = offsets[name]
        if start + seconds > length - 0.2:
            start = 0.0
        offsets[name] = start + seconds * 0.7  # overlapping cuts: more distinct clips from short sources
        rows.append(ClipRow(clip_id=f"copy{i:04d}", dataset="bench", source=str(samples / name), start_s=round(start, 3),
                            end_s=round(start + seconds, 3), identity=Path(name).stem))
    return write_manifest(rows, path)


@dataclass(frozen=True)
class TimedRun:
    workers: int
    clips: int
    clips_out: int
    wall_s: float  # around the flow call (Prefect server already warm)
    step_seconds: dict[str, float]  # per step, summed over clips, from the run's ledger

    @property
    def compute_s(self) -> float:
        return sum(self.step_seconds.values())


def run_preprocess(manifest: Path, out: Path, steps: list[str], workers: int, batch_size: int, **extra) -> TimedRun:
    """One preprocess run with `workers` parallel batches; wall time and the ledger's compute seconds. `extra`:
    further runner options (flows/preprocess_options.RunnerOptions: runner, processes, ray_address, ...)."""
    from flows.layout import DatasetLayout
    from flows.preprocess import preprocess, with_workers
    from tasks.ledger import read_ledger
    from tasks.steps.pipeline import TALKING_HEAD

    flow = preprocess if extra.get("runner") else with_workers(workers)
    t0 = time.perf_counter()
    report = flow(dataset="bench", manifest=str(manifest), output_root=str(out), steps=steps,
                  runner={"batch_size": batch_size, "progress": False, **extra},
                  windows={"shard_features": any(s in TALKING_HEAD.feature_steps for s in steps)})
    wall = time.perf_counter() - t0
    if not isinstance(report, dict):
        raise RuntimeError(f"preprocess run did not complete: {report}")
    seconds: dict[str, float] = {}
    for row in read_ledger(DatasetLayout(out, "bench").ledger).to_pylist():
        if row["action"] == "ran":
            seconds[row["step"]] = seconds.get(row["step"], 0.0) + row["seconds"]
    return TimedRun(workers, report["clips_in"], report["clips_out"], wall, seconds)


def warm_up(manifest_dir: Path, out: Path, steps: list[str]) -> float:
    """Start the embedded server and load every step's models once, outside the timed runs."""
    t0 = time.perf_counter()
    run_preprocess(copies_manifest(manifest_dir / "warmup.parquet", 1), out, steps, 1, 1)
    return time.perf_counter() - t0
