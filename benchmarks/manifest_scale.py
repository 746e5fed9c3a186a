"""How the manifest-side commands grow with the row count: `manifest`, `plan` and a backfill's stale listing.

    python -m benchmarks.manifest_scale [--rows 1000 10000 100000] [--out DIR]

Per N: a CelebV-HQ-format `celebvhq_info.json` of N clips (the published layout: YouTube ids, time ranges,
normalised boxes; datasets_manifest/celebvhq.py) -> `manifest_command` (parse, split by identity, parquet written
atomically, summary; through the CLI, as a user runs it) -> `plan` on that manifest (step costs from --ledger, a
finished run) -> the backfill's stale listing (flows/backfill.stale_results: the talking-head profile's steps,
keyed with the dry-run weights) over a step store in which every clip has a stored result for every step, as after
a finished first run (written here before the clock starts). Printed per N: seconds and seconds per 1,000 rows of
each, and its ratio to the smallest N's (a ratio near 1 is linear; the issue's bound: under 60 s each at 100,000
rows).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flows.preprocess_options import ModelWeights, PreprocessOptions

DRYRUN = PreprocessOptions(weights=ModelWeights(models="dryrun"))

RATES = ["download=0.05", "crop=0.4", "motion=0.02", "pose_check=0.01", "audio_features=0.01",
         "vae_latents=0.05", "shard=0.03"]


def write_info(path: Path, rows: int) -> Path:
    """celebvhq_info.json with `rows` clips, ~20 per upload (identity), 2-12 s each."""
    clips = {f"{i // 20:011d}_{i % 20}": {"ytb_id": f"{i // 20:011d}", "version": "v0.1",
                                          "duration": {"start_sec": 3.0 * (i % 20), "end_sec": 3.0 * (i % 20) + 2 + i % 11},
                                          "bbox": {"top": 0.1, "bottom": 0.6, "left": 0.3, "right": 0.7},
                                          "attributes": {}}
             for i in range(rows)}
    path.write_text(json.dumps({"meta_info": {}, "clips": clips}))
    return path


def store_results(manifest: Path, output_root: Path, dataset: str) -> int:
    """A stored, current result of every step for every clip (status files only, keyed as a run keys them)."""
    from datasets_manifest.schema import read_manifest
    from flows.layout import DatasetLayout
    from flows.preprocess import clip_steps_for, resolve_models
    from tasks.step_runner import step_key
    from tasks.step_store import STATUS_FILE, StepRecord
    from tasks.steps.pipeline import preprocess_profile, wanted_steps

    options = DRYRUN
    profile = preprocess_profile("talking_head")
    layout = DatasetLayout(str(output_root), dataset)
    models = resolve_models(options.weights, profile, validate=False)
    steps = clip_steps_for(profile, wanted_steps(profile, None), layout, models, options.windows, options.weights,
                           options.checks)
    rows, _ = read_manifest(manifest)
    written = 0
    for row in rows:
        done: dict[str, StepRecord] = {}
        for step in steps:
            rec = StepRecord(row.clip_id, step.name, "ok", step_key(step, [done[r] for r in step.requires], row),
                             step.version, checksum=f"{row.clip_id}-{step.name}")
            folder = Path(layout.steps) / step.name / row.clip_id
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STATUS_FILE).write_text(json.dumps(asdict(rec)))
            done[step.name] = rec
            written += 1
    return written


def measure(rows: int, work: Path, ledger: Path) -> dict[str, Any]:
    from flows.backfill import stale_results
    from flows.cli import main as dualforce

    work.mkdir(parents=True, exist_ok=True)
    info = write_info(work / "celebvhq_info.json", rows)
    manifest = work / "celebvhq.parquet"
    out: dict[str, Any] = {"rows": rows}
    t0 = time.perf_counter()
    assert dualforce(["manifest", "celebvhq", str(info), "-o", str(manifest)]) == 0
    out["manifest_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert dualforce(["plan", "celebvhq", "--cpus", "64", "--gpus", "8", "--manifest", str(manifest),
                      "--ledger", str(ledger), *[a for r in RATES for a in ("--rate", r)]]) == 0
    out["plan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["stored_results"] = store_results(manifest, work / "out", "celebvhq")
    out["store_setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    listing = stale_results.fn("celebvhq", str(manifest), str(work / "out"), "talking_head", DRYRUN)
    out["stale_listing_s"] = time.perf_counter() - t0
    out["stale_listing"] = listing
    return out


def main(argv=None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--out", type=Path, default=Path("manifest-scale"))
    p.add_argument("--ledger", type=Path, default=Path("dryrun-output") / "samples",
                   help="a finished run's dataset folder for plan's step costs (default: the dry-run's)")
    args = p.parse_args(argv)
    if not (args.ledger / "ledger").is_dir():
        p.error(f"no ledger under {args.ledger}: run `./run dry-run` first or pass --ledger")
    measure(100, args.out / "warm-up", args.ledger)  # imports and first-use costs, not the rows'
    results = [measure(n, args.out / f"n{n}", args.ledger) for n in args.rows]
    base = results[0]
    print(f"\n{'rows':>8} | {'manifest s':>10} | {'plan s':>8} | {'stale listing s':>15} | per 1,000 rows vs {base['rows']:,}")
    for r in results:
        per = {k: r[k] / r["rows"] * 1000 for k in ("manifest_s", "plan_s", "stale_listing_s")}
        ratio = {k: per[k] / (base[k] / base["rows"] * 1000) for k in per}
        print(f"{r['rows']:>8,} | {r['manifest_s']:>10.2f} | {r['plan_s']:>8.2f} | {r['stale_listing_s']:>15.2f} | "
              + ", ".join(f"{k[:-2]} {per[k]:.3f} s ({ratio[k]:.2f}x)" for k in per))
    (args.out / "manifest_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
