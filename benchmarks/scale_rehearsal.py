"""Scale rehearsal: how the preprocess flow's costs grow with the clip count.

    python -m benchmarks.scale_rehearsal [--clips 100 1000 10000] [--ray-clips 1000] [--steps download crop shard]

Per N, in a fresh process of its own (so its peak RSS is the run's) with a private embedded Prefect: a manifest of
N distinct short clips cut from the sample clips (benchmarks/preprocess_runs.py: every clip is real work, a
download with trim, a crop, a shard window), preprocess run locally with 2 workers, then again (everything
reused). Recorded: wall time per clip, orchestration seconds per clip (wall minus the ledger's step seconds, over
the workers), the flow process's peak RSS, the Prefect database's size and the task runs, artifacts and log lines
it holds, the ledger's rows and read time, the backfill's stale listing time, `plan`'s time and the second run's
time. With --ray-clips, the same on a local Ray instance with 2 workers. Written to OUT/scale_rehearsal.json and a
plot per figure against N (OUT/scale_rehearsal.png); the table's last column is each figure per clip relative to
the smallest N (1.00: linear).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.preprocess_runs import malloc_env

FIGURES = ("wall_s_per_clip", "orchestration_s_per_clip", "peak_rss_mb", "prefect_db_mb", "task_runs", "artifacts",
           "log_lines", "stale_listing_s", "plan_s", "second_run_s_per_clip")


def _db_counts(db: Path) -> dict[str, int]:
    """Rows the run left in the Prefect database (the embedded server is gone by now, so read its SQLite file)."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {name: con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for name, table in (("task_runs", "task_run"), ("flow_runs", "flow_run"), ("artifacts", "artifact"),
                                    ("log_lines", "log"), ("events", "events"))}


def one_size(n: int, work: Path, steps: list[str], runner: str) -> dict[str, Any]:
    """The rehearsal at one N (run inside its own process: `--one`)."""
    from benchmarks.preprocess_runs import copies_manifest, prefect_env, run_preprocess
    from flows.backfill import stale_results
    from flows.cli import main as dualforce
    from flows.layout import DatasetLayout
    from flows.preprocess_options import PreprocessOptions
    from tasks.ledger import read_ledger

    prefect_env(work / "prefect")
    manifest = copies_manifest(work / "copies.parquet", n)
    extra = {"runner": "ray", "ray_num_cpus": 2} if runner == "ray" else {}
    first = run_preprocess(manifest, work / "out", steps, workers=2, batch_size=8, **extra)
    out: dict[str, Any] = {"clips": n, "runner": runner, "clips_out": first.clips_out, "wall_s": first.wall_s,
                           "compute_s": first.compute_s, "wall_s_per_clip": first.wall_s / n,
                           "orchestration_s_per_clip": max(first.wall_s - first.compute_s / 2, 0.0) / n}
    t0 = time.perf_counter()
    ledger = read_ledger(DatasetLayout(work / "out", "bench").ledger)
    out.update(ledger_rows=ledger.num_rows, ledger_read_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    stale_results.fn("bench", str(manifest), str(work / "out"), "talking_head", PreprocessOptions(steps=steps))
    out["stale_listing_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dualforce(["plan", "bench", "--cpus", "8", "--gpus", "1", "--manifest", str(manifest), "--ledger",
               str(work / "out" / "bench")])
    out["plan_s"] = time.perf_counter() - t0
    second = run_preprocess(manifest, work / "out", steps, workers=2, batch_size=8, **extra)
    out.update(second_run_s=second.wall_s, second_run_s_per_clip=second.wall_s / n)
    out.update(_db_counts(work / "prefect" / "prefect.db"))
    out["prefect_db_mb"] = sum(p.stat().st_size for p in (work / "prefect").glob("*.db*")) / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["malloc_env"] = {k: os.environ.get(k) for k in malloc_env()}
    return out


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(18, 7), dpi=80)
    for ax, name in zip(axes.flat, FIGURES):
        for runner in sorted({r["runner"] for r in results}):
            rs = [r for r in results if r["runner"] == runner]
            ax.plot([r["clips"] for r in rs], [r[name] for r in rs], "-o", label=runner)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("clips")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| runner | clips | " + " | ".join(FIGURES) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for r in results:
        lines.append(f"| {r['runner']} | {r['clips']:,} | " + " | ".join(f"{r[f]:.4g}" for f in FIGURES) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--ray-clips", type=int, nargs="*", default=[])
    p.add_argument("--steps", nargs="+", default=["download", "crop", "shard"])
    p.add_argument("--out", type=Path, default=Path("scale-rehearsal"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single size, in this process
    p.add_argument("--runner", default="local", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        result = one_size(args.one, args.out, args.steps, args.runner)
        (args.out / "result.json").write_text(json.dumps(result) + "\n")
        return [result]
    results = []
    for runner, sizes in (("local", args.clips), ("ray", args.ray_clips)):
        for n in sizes:
            work = args.out / f"{runner}-n{n}"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "benchmarks.scale_rehearsal", "--one", str(n), "--runner", runner,
                            "--out", str(work), "--steps", *args.steps], check=True, env={**os.environ, **malloc_env()})
            results.append(json.loads((work / "result.json").read_text()))
            print(f"{runner} {n:,} clips: {time.perf_counter() - t0:.0f} s", flush=True)
    (args.out / "scale_rehearsal.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "scale_rehearsal.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
