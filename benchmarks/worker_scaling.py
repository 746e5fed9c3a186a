"""Scaling of the preprocess flow's CPU steps from 1 to 2 workers (goal: >= 1.8x), local and on Ray.

    python -m benchmarks.worker_scaling [--clips 24 --seconds 1.6 --steps download crop --ray-address ADDR]

The same manifest of distinct short clips is run with flows.preprocess.with_workers(1) and (2), each into a
fresh output folder (nothing cached); the baseline is the 1-worker wall time of the same run. The Ray
variant runs when the flow accepts `runner="ray"` (and `ray_address`): on a machine with 2 cores its figure
is again the ratio to the local 1-worker wall time. Note the steps already use more than one core each
(ffmpeg decodes in its own process; libx264 encodes with 2 threads), so 2 workers on 2 cores cannot reach 2x.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
from pathlib import Path

from benchmarks.preprocess_runs import copies_manifest, prefect_env, run_preprocess, warm_up


def ray_options(workers: int, address: str | None) -> tuple[dict | None, str]:
    """The flow's Ray parameters when it has them, else None and why."""
    from flows.preprocess import preprocess

    params = inspect.signature(preprocess.fn).parameters
    if "runner" not in params:
        return None, "skipped: this flows.preprocess has no `runner` parameter"
    try:
        import ray  # noqa: F401
        import prefect_ray  # noqa: F401
    except ImportError as exc:
        return None, f"skipped: {exc.name} is not installed"
    opts: dict = {"runner": "ray"}
    if "ray_address" in params and address:
        opts["ray_address"] = address
    if "workers" in params:
        opts["workers"] = workers
    return opts, "ran"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=1.6)
    p.add_argument("--steps", nargs="+", default=["download", "crop"])
    p.add_argument("--batch-size", type=int, default=2, help="clips per task; small so 2 workers stay busy")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local one started by the flow)")
    p.add_argument("--goal", type=float, default=1.8)
    args = p.parse_args()
    result: dict = {"clips": args.clips, "steps": args.steps, "cpus_here": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefect_env(tmp / "prefect")
        warm_up(tmp, tmp / "warm", args.steps)
        manifest = copies_manifest(tmp / "copies.parquet", args.clips, args.seconds)
        one = run_preprocess(manifest, tmp / "w1", args.steps, 1, args.batch_size)
        many = run_preprocess(manifest, tmp / f"w{args.workers}", args.steps, args.workers, args.batch_size)
        result["local"] = {
            "baseline_1_worker_wall_s": round(one.wall_s, 2),
            f"{args.workers}_workers_wall_s": round(many.wall_s, 2),
            "speedup": round(one.wall_s / many.wall_s, 3),
            "compute_s_1_vs_n (ledger sums: >1 means steps slow down when sharing cores)":
                [round(one.compute_s, 1), round(many.compute_s, 1)],
            "goal": f">= {args.goal}x", "met": one.wall_s / many.wall_s >= args.goal,
        }
        opts, why = ray_options(args.workers, args.ray_address)
        if opts is None:
            result["ray"] = why
        else:
            ray_run = run_preprocess(manifest, tmp / "ray", args.steps, args.workers, args.batch_size, **opts)
            result["ray"] = {"options": opts, "wall_s": round(ray_run.wall_s, 2),
                             "speedup_vs_local_1_worker": round(one.wall_s / ray_run.wall_s, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
