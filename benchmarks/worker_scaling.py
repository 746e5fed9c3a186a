"""Scaling of the preprocess flow's CPU steps from 1 to 2 workers (goal: >= 1.8x), local and on Ray.

    python -m benchmarks.worker_scaling [--clips 24 --seconds 1.6 --steps download crop --ray-address ADDR]

The same manifest of distinct short clips is run with 1 and with 2 workers, each into a fresh output folder
(nothing cached); the baseline is the 1-worker wall time of the same kind of run. The figures:

- `one_core_per_worker`: the run is pinned (sched_setaffinity, inherited by ffmpeg and Ray workers) to as many
  cores as it has workers: 1 worker on 1 core vs 2 workers on 2 cores. This is the scaling a cluster sees when
  it adds a worker with its core; it is what the >= 1.8x goal is about.
- `processes_one_core_per_worker`: the same with `runner="processes"` (worker processes instead of threads:
  the crop's Python face tracking holds the interpreter lock, so threads of one process share it).
- `ray_one_core_per_worker`: the same with `runner="ray"`: a local Ray instance of 1 CPU on 1 core, then of
  2 CPUs on 2 cores (with --ray-address, one run on that cluster against the local 1-worker baseline).
- `shared_cores`: 1 and 2 workers (threads) on all of this machine's cores. A single worker already keeps more
  than one core busy (ffmpeg decodes and libx264 encodes in their own processes while the crop tracks the face),
  so on a 2-core machine this ratio is bounded by cores / (cores one worker uses), reported as
  `cores_busy_1_worker` (process-tree CPU seconds / wall seconds).

The pool runners (processes, Ray) start their worker interpreters inside the timed run, so small runs
understate their scaling: use >= 100 clips for those figures. Each run is a fresh child process with its own
embedded Prefect server, started by a warm-up run that is not timed.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.preprocess_runs import REPO, copies_manifest, prefect_env, run_preprocess, warm_up


def ray_options(workers: int, address: str | None) -> tuple[dict | None, str]:
    """The flow's Ray parameters when it has them, else None and why."""
    from flows.preprocess import preprocess

    params = inspect.signature(preprocess.fn).parameters
    if "runner" not in params:
        return None, "skipped: this flows.preprocess has no `runner` parameter"
    try:
        import prefect_ray  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        return None, f"skipped: {exc.name} is not installed"
    opts: dict = {"runner": "ray"}
    if address:
        opts["ray_address"] = address
    elif "ray_num_cpus" in params:
        opts["ray_num_cpus"] = workers
    return opts, "ran"


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ffmpeg, Ray workers once they exit)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _child(spec: dict) -> dict:
    """One timed run inside a fresh process (pinned to `cpus` when given)."""
    if spec["cpus"] is not None:
        os.sched_setaffinity(0, set(spec["cpus"]))
    work = Path(spec["work"])
    prefect_env(work / "prefect")
    warm_up(work, work / "warm", spec["steps"])
    cpu0 = _cpu_seconds()
    run = run_preprocess(Path(spec["manifest"]), work / "out", spec["steps"], spec["workers"], spec["batch_size"],
                         **spec["extra"])
    return {"wall_s": run.wall_s, "compute_s": run.compute_s, "cpu_s": _cpu_seconds() - cpu0,
            "clips_out": run.clips_out}


def timed_run(work: Path, manifest: Path, steps: list[str], workers: int, batch_size: int,
              cpus: list[int] | None, extra: dict | None = None) -> dict:
    spec = {"work": str(work), "manifest": str(manifest), "steps": steps, "workers": workers,
            "batch_size": batch_size, "cpus": cpus, "extra": extra or {}}
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker_scaling", "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run with {workers} workers failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(one: dict, many: dict, goal: float, workers: int) -> dict:
    speedup = one["wall_s"] / many["wall_s"]
    return {
        "baseline_1_worker_wall_s": round(one["wall_s"], 2),
        f"{workers}_workers_wall_s": round(many["wall_s"], 2),
        "speedup": round(speedup, 3),
        "cores_busy_1_worker": round(one["cpu_s"] / one["wall_s"], 2),
        "step_seconds_summed_1_vs_n": [round(one["compute_s"], 1), round(many["compute_s"], 1)],
        "goal": f">= {goal}x", "met": speedup >= goal,
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=1.6)
    p.add_argument("--steps", nargs="+", default=["download", "crop"])
    p.add_argument("--batch-size", type=int, default=2, help="clips per task; small so 2 workers stay busy")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local one started by the flow)")
    p.add_argument("--no-ray", action="store_true", help="the same as leaving `ray` out of --configs")
    p.add_argument("--configs", nargs="+", default=["threads", "processes", "shared", "ray"],
                   choices=["threads", "processes", "shared", "ray"],
                   help="pinned threads, pinned processes, threads on shared cores, pinned local Ray")
    p.add_argument("--goal", type=float, default=1.8)
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    result: dict = {"clips": args.clips, "steps": args.steps, "cores_here": len(cores)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = copies_manifest(tmp / "copies.parquet", args.clips, args.seconds)

        def run(name: str, workers: int, cpus: list[int] | None, extra: dict | None = None) -> dict:
            return timed_run(tmp / name, manifest, args.steps, workers, args.batch_size, cpus, extra)

        pinned_one = shared_one = None
        if len(cores) < args.workers:
            result["one_core_per_worker"] = f"skipped: {len(cores)} cores < {args.workers} workers"
        elif "threads" in args.configs:
            pinned_one = run("pin1", 1, cores[:1])
            pinned_many = run("pinN", args.workers, cores[: args.workers])
            result["one_core_per_worker"] = _ratio(pinned_one, pinned_many, args.goal, args.workers)
        if len(cores) >= args.workers and "processes" in args.configs:
            procs_one = run("proc1", 1, cores[:1], {"runner": "processes", "processes": 1})
            procs_many = run("procN", args.workers, cores[: args.workers], {"runner": "processes", "processes": args.workers})
            result["processes_one_core_per_worker"] = _ratio(procs_one, procs_many, args.goal, args.workers)
        if "shared" in args.configs:
            shared_one = run("shared1", 1, None)
            shared_many = run("sharedN", args.workers, None)
            result["shared_cores"] = _ratio(shared_one, shared_many, args.goal, args.workers)
        if args.no_ray or "ray" not in args.configs:
            result["ray"] = "skipped (not in --configs, or --no-ray)"
        elif args.ray_address:  # a cluster's size is its own: one run, against the local baselines
            opts, why = ray_options(args.workers, args.ray_address)
            ray_run = run("ray", args.workers, None, opts) if opts else None
            result["ray"] = why if ray_run is None else {
                "options": opts, "wall_s": round(ray_run["wall_s"], 2),
                "speedup_vs_local_1_worker_shared": round(shared_one["wall_s"] / ray_run["wall_s"], 3)
                if shared_one else None}
        elif len(cores) < args.workers:
            result["ray_one_core_per_worker"] = f"skipped: {len(cores)} cores < {args.workers} workers"
        else:  # a local Ray instance of 1 CPU on 1 core, then of N CPUs on N cores
            opts_one, why = ray_options(1, None)
            opts_many, _ = ray_options(args.workers, None)
            if opts_one is None:
                result["ray_one_core_per_worker"] = why
            else:
                ray_one = run("ray1", 1, cores[:1], opts_one)
                ray_many = run("rayN", args.workers, cores[: args.workers], opts_many)
                result["ray_one_core_per_worker"] = _ratio(ray_one, ray_many, args.goal, args.workers)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
