"""Orchestration + IO overhead of the preprocess flow: wall time vs the compute the ledger recorded.

    python -m benchmarks.orchestration_overhead [--clips 50 --seconds 1.6 --steps download crop shard]

Runs the flow with one worker (so wall time and summed step time are comparable) over --clips distinct short
clips cut from the sample clips. The baseline is the sum of the per-clip step seconds in the run's ledger
(measured inside each step); everything else — Prefect task submission and state tracking, batching, the
step store's status files and renames, manifest load, ledger write, artifacts — is overhead.
Goal: overhead <= 5% of the compute. The embedded Prefect server is started (and the landmarker loaded) by a
warm-up run first; its start-up time is printed separately: a long-lived server pays it once.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.preprocess_runs import copies_manifest, prefect_env, run_preprocess, warm_up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=50)
    p.add_argument("--seconds", type=float, default=1.6, help="length of each clip copy (>= 1.32 s: 33 frames)")
    p.add_argument("--steps", nargs="+", default=["download", "crop", "shard"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--goal", type=float, default=0.05)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefect_env(tmp / "prefect")
        warm = warm_up(tmp, tmp / "warm", args.steps)
        manifest = copies_manifest(tmp / "copies.parquet", args.clips, args.seconds)
        run = run_preprocess(manifest, tmp / "out", args.steps, workers=1, batch_size=args.batch_size)
    overhead = run.wall_s / run.compute_s - 1.0
    print(json.dumps({
        "clips": run.clips, "clips_out": run.clips_out, "steps": args.steps, "workers": 1,
        "baseline_compute_s (ledger sum)": round(run.compute_s, 2),
        "per_step_s": {k: round(v, 2) for k, v in run.step_seconds.items()},
        "wall_s": round(run.wall_s, 2),
        "ratio_wall_to_compute": round(run.wall_s / run.compute_s, 4),
        "overhead": f"{overhead:.1%}", "goal": f"<= {args.goal:.0%}", "met": overhead <= args.goal,
        "warmup_s (server start + first clip, paid once)": round(warm, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
