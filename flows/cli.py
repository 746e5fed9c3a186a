"""`dualforce` command line: dry-run, preprocess, manifest, and the model/training tools."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "samples"


def _prefect_env() -> None:
    """Embedded Prefect by default: a temporary local server, no telemetry, state under the repo."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_HOME", str(REPO / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _print_summary(report: dict, seconds: float) -> None:
    print()
    print(f"== {report['dataset']}: {report['clips_out']}/{report['clips_in']} clips made it through")
    for r in report["rejected"]:
        print(f"   - {r['clip_id']}: {r['status']} at {r['step']} [{r['reason']}] {r['detail']}")
    print(f"{'step':<16}{'ok':>5}{'rej':>5}{'fail':>6}{'cached':>8}{'seconds':>10}")
    for c in report["step_counts"]:
        print(f"{c['step']:<16}{c['ok']:>5}{c['rejected']:>5}{c['failed']:>6}{c['skipped']:>8}{c['seconds']:>10.2f}")
    sh = report.get("shards")
    if sh:
        print(f"samples: {sh['samples']} in {sh['shards']} shards ({sh['bytes'] / 1e6:.1f} MB), per split {sh['per_split']}")
    if report.get("gate"):
        print(f"gate 3d_latent_quality: {report['gate']['name']} - {report['gate']['message']}")
    print(f"wall time: {seconds:.1f}s" + (f" (runner: {report['runner']})" if report.get("runner") else ""))
    print(f"output: {report['output']}")


def _finish(state, seconds: float) -> dict | None:
    """Print the run's summary, or why it did not finish; returns the report when there is one."""
    if state.is_completed():
        result = state.result()
        _print_summary(result.get("preprocess", result), seconds)
        if result.get("training"):
            t = result["training"]
            print(f"training: {t['state']} after {t['steps']} steps, loss {t['first_loss']:.4f} -> {t['last_loss']:.4f}, "
                  f"{t['samples_per_s'] or 0:.1f} samples/s ({t['run_dir']})")
        return result
    print(f"\n{state.name}: {state.message}", file=sys.stderr)
    return None


def cmd_dry_run(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.dryrun import dry_run

    out = Path(args.out or Path.cwd() / "dryrun-output").resolve()
    print(f"dry-run: sample clips from {args.samples} -> {out} (extractors: untrained dry-run models)", file=sys.stderr)
    t0 = time.perf_counter()
    state = dry_run(out=str(out), samples=args.samples, batch_size=args.batch_size, workers=args.workers,
                    window_n=args.window_n, window_stride=args.window_stride, train_steps=args.train_steps,
                    progress=not args.no_progress, return_state=True)
    result = _finish(state, time.perf_counter() - t0)
    if result is None:
        return 3 if state.name == "NO-GO" else 1
    (out / "dryrun-report.json").write_text(json.dumps(result, indent=1, default=str))
    if not result["preprocess"].get("shards") or result["preprocess"]["shards"]["samples"] == 0:
        print("error: the dry-run produced no samples", file=sys.stderr)
        return 1
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.preprocess import with_workers

    t0 = time.perf_counter()
    state = with_workers(args.workers)(
        dataset=args.dataset, manifest=args.manifest, output_root=args.out, steps=args.steps or None,
        limit=args.limit, batch_size=args.batch_size, window_n=args.window_n, window_stride=args.window_stride,
        models=args.models, liveportrait_root=args.liveportrait_root, hubert=args.hubert, wan_vae=args.wan_vae,
        wan_vae_subfolder=args.wan_vae_subfolder, device=args.device, flame_dir=args.flame_dir,
        runner=args.runner, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
        processes=args.workers if args.runner == "processes" else None,
        cpus_per_batch=args.cpus_per_batch, gpus_per_batch=args.gpus_per_batch, shard_groups=args.shard_groups,
        work_root=args.work_root, scratch_root=args.scratch_root, progress=not args.no_progress, return_state=True,
    )
    report = _finish(state, time.perf_counter() - t0)
    if report is None:
        return 3 if state.name == "NO-GO" else 1
    return 0


def _json_arg(value: str | None) -> dict | None:
    """A JSON object given inline or as a path to a .json file."""
    if value is None:
        return None
    text = Path(value).read_text() if Path(value).is_file() else value
    data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"expected a JSON object, got {type(data).__name__}")
    return data


def cmd_train(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.train import launch_kwargs, train_flow

    state = train_flow(_json_arg(args.config), gates=_json_arg(args.gates), return_state=True, **launch_kwargs(args))
    print(f"{state.name}: {state.message}", file=sys.stderr if not state.is_completed() else sys.stdout)
    return 0 if state.is_completed() else (3 if state.name == "NO-GO" else 1)


def cmd_pipeline(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    state = pipeline(dataset=args.dataset, manifest=args.manifest, output_root=args.out,
                     preprocess_options=_json_arg(args.preprocess), train=_json_arg(args.train),
                     gates=_json_arg(args.gates), nproc_per_node=args.nproc_per_node, launcher=args.launcher,
                     workers=args.workers, return_state=True)
    result = _finish(state, time.perf_counter() - t0)
    if result is None:
        return 3 if state.name == "NO-GO" else 1
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from datasets_manifest import manifest_command

    print(manifest_command(args.dataset, args.src, args.out, seed=args.seed))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from models.dualforce import model_info

    print(model_info(args.config))
    return 0


def _add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="output root (a folder or an fsspec URL)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualforce", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dry-run", help="the main job on the sample clips, locally: manifest -> 7 steps -> shards -> a few training steps")
    d.add_argument("--out", help="output folder (default: ./dryrun-output)")
    d.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="folder of sample clips")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--batch-size", type=int, default=1)
    d.add_argument("--window-n", type=int, default=4, help="windows of 4n+1 frames")
    d.add_argument("--window-stride", type=int, default=100, help="frames between window starts")
    d.add_argument("--train-steps", type=int, default=4, help="ZeRO-2 steps on 2 CPU processes (0: no training)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_dry_run)

    pp = sub.add_parser("preprocess", help="run the preprocess flow on a manifest")
    _add_dataset_arguments(pp)
    pp.add_argument("--steps", nargs="*")
    pp.add_argument("--limit", type=int)
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--workers", type=int, default=2)
    pp.add_argument("--window-n", type=int, default=8, help="windows of 4n+1 frames")
    pp.add_argument("--window-stride", type=int, help="frames between window starts (default: the window)")
    pp.add_argument("--models", choices=["real", "dryrun"], default="real")
    pp.add_argument("--liveportrait-root", help="folder holding LivePortrait's pretrained_weights/")
    pp.add_argument("--hubert", help="HuBERT save_pretrained folder or a repo id in the HF cache")
    pp.add_argument("--wan-vae", help="Wan VAE folder (or pipeline folder with --wan-vae-subfolder vae) or cached repo id")
    pp.add_argument("--wan-vae-subfolder")
    pp.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    pp.add_argument("--flame-dir", help="per-clip FLAME parameter files <clip_id>.npz for the pose cross-check")
    pp.add_argument("--runner", choices=["local", "processes", "ray"], default="local",
                    help="local: threads of this process; processes: --workers worker processes on this machine; "
                         "ray: one Ray task per batch")
    pp.add_argument("--ray-address", help="'auto', a cluster address, or none for a local Ray instance")
    pp.add_argument("--ray-num-cpus", type=int, help="CPUs of a local Ray instance")
    pp.add_argument("--cpus-per-batch", type=float, default=1.0)
    pp.add_argument("--gpus-per-batch", type=float, default=1.0, help="for the GPU steps, when the cluster has GPUs")
    pp.add_argument("--shard-groups", type=int, default=16, help="independent shard writers, merged at the end")
    pp.add_argument("--work-root", help="folder or fsspec URL for step outputs (default: under --out)")
    pp.add_argument("--scratch-root", help="local folder where workers stage step files when the step outputs are "
                                           "remote (default: a per-user folder in the system temp dir)")
    pp.add_argument("--no-progress", action="store_true")
    pp.set_defaults(func=cmd_preprocess)

    m = sub.add_parser("manifest", help="build a normalised clip manifest from a dataset's published metadata")
    m.add_argument("dataset")
    m.add_argument("src")
    m.add_argument("-o", "--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_manifest)

    from datasets_manifest.plan import add_plan_parser
    from flows.server import add_server_parser
    from flows.train import add_launch_arguments

    t = sub.add_parser("train", help="the training stage flow (DeepSpeed launcher or torchrun, with gates)")
    t.add_argument("--config", required=True, help="TrainConfig as JSON (inline or a .json file)")
    t.add_argument("--gates", help="TrainingGateConfig as JSON (inline or a .json file)")
    add_launch_arguments(t)  # nodes, processes, rendezvous, hostfile (docs/multinode.md)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("pipeline", help="preprocess -> 3D-latent gate -> train, as one flow")
    _add_dataset_arguments(pl)
    pl.add_argument("--preprocess", help="extra preprocess parameters as JSON (models, weights, windows, ...)")
    pl.add_argument("--train", help="TrainConfig fields as JSON (the data fields come from the shards)")
    pl.add_argument("--gates", help="TrainingGateConfig fields as JSON")
    pl.add_argument("--nproc-per-node", type=int, default=2)
    pl.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    pl.add_argument("--workers", type=int, default=2)
    pl.set_defaults(func=cmd_pipeline)

    add_server_parser(sub)
    add_plan_parser(sub)

    mi = sub.add_parser("model-info", help="parameter counts per module and FLOPs per training step of a DualForce config")
    mi.add_argument("config", help="tiny | lite")
    mi.set_defaults(func=cmd_model_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
