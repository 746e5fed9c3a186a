"""`dualforce` command line: dry-run, preprocess, manifest, and the model/training tools."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from flows.cli_checks import (
    InputRejected,
    at_least,
    build_manifest_checked,
    check_audit_inputs,
    check_preprocess,
    check_train_inputs,
    fraction,
    non_negative_float,
    positive_float,
    preprocess_options,
    window_frames_arg,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "samples"


def _prefect_env() -> None:
    """Embedded Prefect by default: a temporary local server, no telemetry, state under the repo."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_HOME", str(REPO / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _failed_exit_code(state) -> int:
    """The exit code of a run that did not complete (flows/outcomes.py lists them)."""
    from flows.outcomes import exit_code

    return exit_code(state.name)


def _done_exit_code(preprocess_report: dict | None) -> int:
    """0, or 5 (CLIPS-FAILED) when clips failed through our own error rather than being rejected."""
    from flows.outcomes import CLIPS_FAILED, EXIT_CODES, failed_clips
    from tasks.reasons import shorten

    failed = failed_clips(preprocess_report or {})
    if not failed:
        return 0
    print(f"\n{CLIPS_FAILED}: {len(failed)} clip(s) failed through an error of ours (not their input); the rest "
          f"finished. First: {failed[0]['clip_id']} at {failed[0]['step']}: {shorten(failed[0]['detail'], 300)}. "
          f"Re-run after the fix: finished steps are reused.", file=sys.stderr)
    return EXIT_CODES[CLIPS_FAILED]


def _finish(state, seconds: float) -> dict | None:
    """Print the run's summary, or why it did not finish; returns the report when there is one."""
    if state.is_completed():
        from flows.run_summary import run_lines

        result = state.result()
        print()
        print("\n".join(run_lines(result, seconds)))
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
                    window_frames=args.window_frames, window_stride=args.window_stride, train_steps=args.train_steps,
                    progress=not args.no_progress, return_state=True)
    result = _finish(state, time.perf_counter() - t0)
    if result is None:
        return _failed_exit_code(state)
    (out / "dryrun-report.json").write_text(json.dumps(result, indent=1, default=str))
    if not result["preprocess"].get("shards") or result["preprocess"]["shards"]["samples"] == 0:
        print("error: the dry-run produced no samples", file=sys.stderr)
        return 1
    return _done_exit_code(result["preprocess"])


def add_dry_run(sub) -> None:
    p = sub.add_parser("dry-run", help="the main job on the sample clips, locally: manifest -> 7 steps -> shards -> "
                                       "a few training steps")
    p.add_argument("--out", help="output folder (default: ./dryrun-output)")
    p.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="folder of sample clips")
    p.add_argument("--workers", type=at_least(1), default=2)
    p.add_argument("--batch-size", type=at_least(1), default=1)
    p.add_argument("--window-frames", type=window_frames_arg, default=17, help="video frames per window (4n+1)")
    p.add_argument("--window-stride", type=at_least(1), default=200, help="frames between window starts")
    p.add_argument("--train-steps", type=at_least(0), default=4, help="ZeRO-2 steps on 2 CPU processes (0: no training)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_dry_run)


def cmd_preprocess(args: argparse.Namespace) -> int:
    _prefect_env()  # before the checks import Prefect
    options = _checked_preprocess_options(args)
    from flows.preprocess import with_workers

    t0 = time.perf_counter()
    state = with_workers(args.workers)(dataset=args.dataset, manifest=args.manifest, output_root=args.out,
                                       profile=args.profile, **options.flow_parameters(), return_state=True)
    return _preprocess_exit(state, t0)


def add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="run the preprocess flow on a manifest")
    _add_preprocess_arguments(p)
    p.set_defaults(func=cmd_preprocess)


def cmd_backfill(args: argparse.Namespace) -> int:
    _prefect_env()  # before the checks import Prefect
    options = _checked_preprocess_options(args)
    from flows.backfill import backfill

    t0 = time.perf_counter()
    state = backfill(dataset=args.dataset, manifest=args.manifest, output_root=args.out, profile=args.profile,
                     preprocess_options=options, workers=args.workers, return_state=True)
    return _preprocess_exit(state, t0)


def add_backfill(sub) -> None:
    p = sub.add_parser("backfill", help="after bumping a step's version: list the stale step results, then "
                                        "recompute them and what they feed (the preprocess parameters)")
    _add_preprocess_arguments(p)
    p.set_defaults(func=cmd_backfill)


def _checked_preprocess_options(args: argparse.Namespace):
    """The preprocess flags as the flow's options, refused (exit 2 / 6, one line) before any work when they, the
    dataset name, the manifest or the steps cannot run."""
    options = preprocess_options(lambda: preprocess_options_of(args))
    check_preprocess(args.dataset, args.manifest, args.profile, options)
    return options


def preprocess_options_of(args: argparse.Namespace):
    """The CLI's preprocess flags in the flow's parameter groups (flows/preprocess_options.py)."""
    from flows.preprocess_options import (
        ModelWeights,
        PreprocessOptions,
        QualityChecks,
        RunnerOptions,
        StorageOptions,
        WindowOptions,
    )

    return PreprocessOptions(
        steps=args.steps or None, limit=args.limit,
        weights=ModelWeights(models=args.models, liveportrait_root=args.liveportrait_root, hubert=args.hubert,
                             wan_vae=args.wan_vae, wan_vae_subfolder=args.wan_vae_subfolder, device=args.device,
                             flame_dir=args.flame_dir),
        windows=WindowOptions(window_stride=args.window_stride, shard_groups=args.shard_groups,
                              **({"window_frames": args.window_frames} if args.window_frames else {})),
        runner=RunnerOptions(runner=args.runner, batch_size=args.batch_size, ray_address=args.ray_address,
                             ray_num_cpus=args.ray_num_cpus, cpus_per_batch=args.cpus_per_batch,
                             gpus_per_batch=args.gpus_per_batch, progress=not args.no_progress,
                             processes=args.workers if args.runner == "processes" else None),
        storage=StorageOptions(work_root=args.work_root, scratch_root=args.scratch_root),
        checks=QualityChecks(retry_rejected=args.retry_rejected, audit_fraction=args.audit_fraction),
    )


def _preprocess_exit(state, t0: float) -> int:
    """Print the run's summary; the exit code of its preprocess report (a backfill's is inside its result)."""
    result = _finish(state, time.perf_counter() - t0)
    if result is None:
        return _failed_exit_code(state)
    return _done_exit_code(result.get("preprocess", result))


def cmd_audit(args: argparse.Namespace) -> int:
    """Exit 0 when every audited sample matches what it was derived from, 4 on a mismatch."""
    from tasks.audit import AUDIT_FILE, AuditConfig, audit_models_for, audit_shards

    shards = Path(args.shards).resolve()
    steps = Path(args.steps_root).resolve() if args.steps_root else shards.parent / "steps"
    check_audit_inputs(shards, steps, args.fraction)
    models = audit_models_for(shards, args.models, args.liveportrait_root, args.wan_vae, args.wan_vae_subfolder)
    cfg = AuditConfig(fraction=args.fraction, seed=args.seed)
    from tqdm import tqdm

    with tqdm(desc="audit", unit="sample", disable=args.no_progress) as bar:
        report = audit_shards(shards, steps, models, cfg, on_sample=lambda key: bar.update(), keys=args.key or None)
    print(f"{'check':<12}{'checked':>9}{'mismatched':>12}")
    for row in report.table():
        print(f"{row['check']:<12}{row['checked']:>9}{row['mismatched']:>12}")
    for m in report.mismatches[:20]:
        print(f"   - {m.key} {m.window} {m.check}: {m.detail}")
    print(report.summary())
    (shards / AUDIT_FILE).write_text(json.dumps(report.to_json(), indent=1))
    return 0 if report.ok else 4


def add_audit(sub) -> None:
    p = sub.add_parser("audit", help="re-derive a fraction of a shard set's samples from the step outputs and "
                                     "compare their content (exit 4 on a mismatch)")
    p.add_argument("shards", help="a shard set folder (ROOT/DATASET/shards)")
    p.add_argument("--fraction", type=positive_float, default=0.05, help="share of the samples audited, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", action="append", help="audit this sample (repeatable) instead of a random fraction")
    p.add_argument("--steps-root", help="the step outputs (default: the shard folder's sibling steps/)")
    p.add_argument("--models", choices=["auto", "real", "dryrun", "none"], default="auto",
                   help="extractors for the latent and struct checks; auto: the dry-run ones when the samples say "
                        "they were made with them, else the weights given; none: skip those two checks")
    p.add_argument("--liveportrait-root")
    p.add_argument("--wan-vae")
    p.add_argument("--wan-vae-subfolder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_audit)


def _json_arg(value: str | None, flag: str = "") -> dict | None:
    """A JSON object given inline or as a path to a .json file (else a usage error, exit 2)."""
    from tasks.reasons import shorten

    if value is None:
        return None
    if value.endswith(".json") and not Path(value).is_file():
        raise InputRejected(2, f"{flag} {value}: no such file")
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputRejected(2, f"{flag} expected a JSON object or a .json file, got {shorten(value, 80)!r}: {exc}") \
            from None
    if not isinstance(data, dict):
        raise InputRejected(2, f"{flag} expected a JSON object, got {type(data).__name__} from {shorten(value, 80)!r}")
    return data


def cmd_train(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.train import launch_kwargs, review_options, train_flow
    from training.launch import LaunchSpec

    config, gates = _json_arg(args.config, "--config"), _json_arg(args.gates, "--gates")
    config = check_train_inputs(config, gates)
    try:
        launch = LaunchSpec(**launch_kwargs(args))
    except ValueError as exc:
        raise InputRejected(2, f"launch flags: {exc}") from None
    state = train_flow(config, gates=gates, launch=launch, review=review_options(args), return_state=True)
    print(f"{state.name}: {state.message}", file=sys.stderr if not state.is_completed() else sys.stdout)
    return 0 if state.is_completed() else _failed_exit_code(state)


def add_train(sub) -> None:
    from flows.train import add_launch_arguments, add_review_arguments

    p = sub.add_parser("train", help="the training stage flow (DeepSpeed launcher or torchrun, with gates)")
    p.add_argument("--config", required=True, help="TrainConfig as JSON (inline or a .json file)")
    p.add_argument("--gates", help="TrainingGateConfig as JSON (inline or a .json file)")
    add_launch_arguments(p)  # nodes, processes, rendezvous, hostfile (docs/multinode.md)
    add_review_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_pipeline(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.pipeline import pipeline
    from flows.preprocess_options import PreprocessOptions

    options = _json_arg(args.preprocess, "--preprocess") or {}
    train, gates = _json_arg(args.train, "--train"), _json_arg(args.gates, "--gates")
    check_preprocess(args.dataset, args.manifest, "talking_head",
                     preprocess_options(lambda: PreprocessOptions.model_validate(options), "--preprocess"))
    check_train_inputs({"shards": [], "out_dir": str(args.out), "window_frames": 9, **(train or {})}, gates, "--train")
    t0 = time.perf_counter()
    state = pipeline(dataset=args.dataset, manifest=args.manifest, output_root=args.out, preprocess_options=options,
                     train=train, gates=gates, nproc_per_node=args.nproc_per_node, launcher=args.launcher,
                     workers=args.workers, return_state=True)
    result = _finish(state, time.perf_counter() - t0)
    if result is None:
        return _failed_exit_code(state)
    return _done_exit_code(result.get("preprocess") if isinstance(result, dict) else None)


def add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="preprocess -> 3D-latent gate -> train, as one flow")
    _add_dataset_arguments(p)
    p.add_argument("--preprocess", help="the preprocess parameter groups as JSON (flows/preprocess_options.py), "
                                        "e.g. '{\"weights\": {\"models\": \"dryrun\"}}'")
    p.add_argument("--train", help="TrainConfig fields as JSON (the data fields come from the shards)")
    p.add_argument("--gates", help="TrainingGateConfig fields as JSON")
    p.add_argument("--nproc-per-node", type=at_least(1), default=2)
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    p.add_argument("--workers", type=at_least(1), default=2)
    p.set_defaults(func=cmd_pipeline)


def cmd_program(args: argparse.Namespace) -> int:
    """Exit 0 when every stage went through, 3 when a gate stopped the program (NO-GO), else the state's code."""
    _prefect_env()
    from flows.program import training_program
    from flows.run_summary import program_lines
    from training.program import load_program

    if (code := _check_input_file("program", load_program, args.program)) is not None:
        return code
    t0 = time.perf_counter()
    state = training_program(args.program, auto_approve=True if args.auto_approve else None,
                             review_timeout_s=args.review_timeout, return_state=True)
    if not state.is_completed():
        print(f"\n{state.name}: {state.message}", file=sys.stderr)
        return _failed_exit_code(state)
    print("\n".join(program_lines(state.result(), time.perf_counter() - t0)))
    return 0


def add_program(sub) -> None:
    p = sub.add_parser("program", help="the staged training program (concept -> pretrain -> joint), gate by gate")
    p.add_argument("program", help="a program file (configs/program-lite.yaml; training/program.py documents it)")
    p.add_argument("--auto-approve", action="store_true", help="answer the sample review with continue (unattended)")
    p.add_argument("--review-timeout", type=at_least(1), help="seconds the sample review waits for a person")
    p.set_defaults(func=cmd_program)


def _check_input_file(what: str, load, path: str) -> int | None:
    """Read a user's program / ablation file before any flow starts: None when it is usable, else the exit code
    (2: no such file; 6: it cannot be parsed or does not validate) after one line naming the file and the problem."""
    import pydantic

    from flows.outcomes import EXIT_CODES, UNUSABLE_INPUT
    from training.program import ConfigFileError

    if not Path(path).is_file():
        print(f"{what} file {path} does not exist", file=sys.stderr)
        return 2
    try:
        load(path)
    except ConfigFileError as exc:
        print(f"unusable {what}: {exc}", file=sys.stderr)
        return EXIT_CODES[UNUSABLE_INPUT]
    except (pydantic.ValidationError, ValueError) as exc:
        problems = exc.errors() if isinstance(exc, pydantic.ValidationError) else []
        text = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in problems) or str(exc)
        print(f"unusable {what} {path}: {text}", file=sys.stderr)
        return EXIT_CODES[UNUSABLE_INPUT]
    return None


def cmd_manifest(args: argparse.Namespace) -> int:
    print(build_manifest_checked(args.dataset, args.src, args.out, args.seed))
    return 0


def add_manifest(sub) -> None:
    p = sub.add_parser("manifest", help="build a normalised clip manifest from a dataset's published metadata")
    p.add_argument("dataset")
    p.add_argument("src")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_manifest)


def cmd_model_info(args: argparse.Namespace) -> int:
    from models.dualforce import CONFIG_NAMES, model_info

    if args.config not in CONFIG_NAMES:
        raise InputRejected(2, f"unknown DualForce config {args.config!r}; known: {', '.join(CONFIG_NAMES)}")
    if args.init_from:
        return _print_wan_plan(args)

    print(model_info(args.config))
    return 0


def add_model_info(sub) -> None:
    p = sub.add_parser("model-info", help="parameter counts per module and FLOPs per training step of a DualForce config")
    p.add_argument("config", help="a DualForce preset: tiny | lite")
    p.add_argument("--init-from", metavar="wan:PATH", help="also print what a warm start from these Wan 2.1 "
                   "transformer weights would transfer (a diffusers folder, or the original release's file)")
    p.add_argument("--layers", default="even", help="source blocks for the warm start: even | first | 0,2,4,...")
    p.set_defaults(func=cmd_model_info)


def _print_wan_plan(args: argparse.Namespace) -> int:
    from flows.outcomes import BAD_WEIGHTS, EXIT_CODES
    from models.dualforce import get_config, model_info
    from models.dualforce.wan_transfer import parse_layers, plan_from_path
    from models.weights import WeightsError

    kind, _, path = args.init_from.partition(":")
    if kind != "wan" or not path:
        print(f"--init-from takes wan:PATH, got {args.init_from!r}", file=sys.stderr)
        return 2
    try:
        layers = parse_layers(args.layers)
        plan = plan_from_path(get_config(args.config), path, layers)
    except ValueError as exc:
        print(f"model-info: {exc}", file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"Wan weights: {exc}", file=sys.stderr)
        return EXIT_CODES[BAD_WEIGHTS]
    print(model_info(args.config))
    print()
    print(plan.markdown())
    if plan.problems:
        print(f"Wan weights: {len(plan.problems)} problems: " + "; ".join(plan.problems), file=sys.stderr)
        return EXIT_CODES[BAD_WEIGHTS]
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flows.outcomes import EXIT_CODES, UNUSABLE_INPUT
    from models.dualforce.serialization import ForeignFolderError
    from training.export import ExportError, UnusableRun, export_run

    try:
        result = export_run(args.run_dir, args.out, tag=args.tag, weights=args.weights)
    except (ExportError, ForeignFolderError, FileNotFoundError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return EXIT_CODES[UNUSABLE_INPUT] if isinstance(exc, UnusableRun) else 2
    print(f"exported step {result.step} ({result.weights} weights from {result.source}, {result.parameters:,} "
          f"parameters) to {result.out_dir}; load it with DualForce.from_pretrained({str(result.out_dir)!r})")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="a training run's checkpoint -> config.json + model.safetensors "
                                      "(DualForce.from_pretrained)")
    p.add_argument("run_dir", help="a training run folder (holds train_config.json and checkpoints/)")
    p.add_argument("-o", "--out", required=True, help="the exported model folder: new, empty, or an "
                   "earlier export (replaced); any other folder is refused")
    p.add_argument("--tag", help="checkpoint tag (default: the latest)")
    p.add_argument("--weights", choices=("auto", "ema", "module"), default="auto",
                   help="auto: the EMA when the run kept one, else the module")
    p.set_defaults(func=cmd_export)


def cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from flows.outcomes import BAD_WEIGHTS, EXIT_CODES, UNUSABLE_INPUT
    from models.weights import WeightsError
    from tasks.errors import ClipRejected
    from training.generate import GenerateError, GenerateOptions, generate_video

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = GenerateOptions(
        seconds=args.seconds, steps=args.steps, audio_guidance=args.cfg, reference_guidance=args.reference_cfg,
        seed=args.seed, chunk_frames=args.chunk_frames, cache_window=args.cache_window, sink_frames=args.sink_frames,
        attention=args.attention, device=args.device, hubert=args.hubert,
        hubert_layers=tuple(args.hubert_layers) if args.hubert_layers else None, wan_vae=args.wan_vae,
        wan_vae_subfolder=args.wan_vae_subfolder, progress=not args.no_progress)
    try:
        result = generate_video(args.model, args.image, args.audio, args.out, options)
    except ClipRejected as exc:
        print(f"cannot generate from this input ({exc.reason}): {exc.detail}", file=sys.stderr)
        return EXIT_CODES[UNUSABLE_INPUT]
    except WeightsError as exc:
        print(f"generate: model or extractor weights: {exc}", file=sys.stderr)
        return EXIT_CODES[BAD_WEIGHTS]
    except (GenerateError, FileNotFoundError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    note = " -- DRY-RUN model and extractors: the video is noise, the plumbing is real" if result.dryrun else ""
    print(f"wrote {result.path} ({result.frames} frames, {result.frames / 25:.2f} s, speech muxed) in "
          f"{result.seconds:.1f} s: {result.latent_frames_per_s:.2f} latent frames/s, decode "
          f"{result.decode_s / max(result.sampling_s + result.decode_s, 1e-9):.0%} of it; record {result.record}{note}")
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="an exported model + a face image + speech -> an mp4 (the speech muxed in)")
    p.add_argument("--model", required=True, help="an exported model folder (./run export)")
    p.add_argument("--image", required=True, help="the face (any image OpenCV reads); cropped as the crop step crops")
    p.add_argument("--audio", required=True, help="the speech (any file ffmpeg reads; any rate and channels)")
    p.add_argument("-o", "--out", required=True, help="the mp4 to write (and <out>.json beside it)")
    p.add_argument("--seconds", type=positive_float, help="use the first this-many seconds of the speech")
    p.add_argument("--reference-cfg", type=float, default=1.0, help="classifier-free guidance on the face (1: none)")
    p.add_argument("--chunk-frames", type=at_least(1), default=1, help="latent frames denoised together")
    p.add_argument("--hubert", help="override the HuBERT the model's training data was made with")
    p.add_argument("--hubert-layers", type=int, nargs="+")
    _add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.evaluate import evaluate_flow
    from flows.outcomes import BAD_WEIGHTS, EXIT_CODES, UNUSABLE_INPUT
    from models.weights import WeightsError
    from training.evaluate import REPORT_FILE, summary_lines
    from training.generate import GenerateError
    from training.heldout import NoHeldOutClips, check_shard_set

    options = dict(split=args.split, clips=args.clips, sampler_steps=args.steps, audio_guidance=args.cfg,
                   seed=args.seed, long_seconds=args.long_seconds, conditioning_windows=args.conditioning_windows,
                   liveportrait=args.liveportrait_root,
                   syncnet=args.syncnet, i3d=args.i3d, fid_inception=args.fid_inception, wan_vae=args.wan_vae,
                   wan_vae_subfolder=args.wan_vae_subfolder, device=args.device, progress=not args.no_progress,
                   cache_window=args.cache_window, sink_frames=args.sink_frames, attention=args.attention)
    try:
        check_shard_set(args.shards, args.split)  # before the flow: a flow's failure logs a traceback
        result = evaluate_flow(args.model, args.shards, args.out, options)
    except WeightsError as exc:
        print(f"evaluation weights: {exc}", file=sys.stderr)
        return EXIT_CODES[BAD_WEIGHTS]
    except NoHeldOutClips as exc:
        print(f"evaluate: unusable shard set: {exc}", file=sys.stderr)
        return EXIT_CODES[UNUSABLE_INPUT]
    except (GenerateError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    data = json.loads((Path(result["out_dir"]) / REPORT_FILE).read_text())
    first, files = summary_lines(data, result["out_dir"])
    print(first)
    print(result["table"])
    print(f"\n{files} ({result['seconds']:.1f} s)")
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="an exported model on a shard set's held-out clips: identity, LMD, pose / "
                                        "expression error, LSE-C/D, FID, FVD, long-sequence drift")
    p.add_argument("--model", required=True, help="an exported model folder (./run export)")
    p.add_argument("--shards", required=True, help="a shard set folder (ROOT/DATASET/shards)")
    p.add_argument("-o", "--out", required=True, help="folder for evaluation.json / .md, plots and clips")
    p.add_argument("--split", default="test", help="the held-out split (default: test)")
    p.add_argument("--clips", type=at_least(1), default=16)
    p.add_argument("--long-seconds", type=non_negative_float, default=60.0, help="the long generation (0: none)")
    p.add_argument("--conditioning-windows", type=at_least(0), default=8,
                   help="windows for the conditioning-use ratios: speech / reference / bridge use, drift (0: none)")
    p.add_argument("--liveportrait-root", help="LivePortrait weights: pose / expression error and pose drift")
    p.add_argument("--syncnet", help="SyncNet weights (syncnet_v2.model or safetensors): LSE-C / LSE-D")
    p.add_argument("--i3d", help="I3D Kinetics-400 weights: FVD")
    p.add_argument("--fid-inception", help="pytorch-fid Inception weights: FID")
    _add_sampling_arguments(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_ablate(args: argparse.Namespace) -> int:
    _prefect_env()
    from flows.ablate import ablation_flow
    from training.ablation import load_matrix

    if (code := _check_input_file("ablation matrix", load_matrix, args.matrix)) is not None:
        return code
    state = ablation_flow(args.matrix, return_state=True)
    if not state.is_completed():
        print(f"ablation matrix failed: {state.message}", file=sys.stderr)
        return _failed_exit_code(state)
    result = state.result()
    print(result["table"])
    print(f"\nwritten to {result['out_dir']} (ablation.json, ablation.md, ablation.png; per variant: train/, model/, "
          f"evaluation/)")
    return 0


def add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="the review's ablation matrix: train each variant, evaluate it, one comparison "
                                      "table and plot")
    p.add_argument("matrix", help="a matrix file (configs/ablations/review.yaml; training/ablation.py documents it)")
    p.set_defaults(func=cmd_ablate)


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """What generate and evaluate share: the sampler, the seed, the VAE override, the device."""
    p.add_argument("--steps", type=at_least(1), default=20, help="Euler steps per latent frame")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance on the speech (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-window", type=at_least(0),
                   help="latent frames the KV cache keeps besides the sinks (default: as many as the model's training "
                        "window allows, so memory stays flat; 0: all)")
    p.add_argument("--sink-frames", type=at_least(0), default=1,
                   help="first latent frames a bounded cache keeps for good (the reference always stays)")
    p.add_argument("--attention", choices=("sdpa", "flex"), help="masked attention path (default: the model's)")
    p.add_argument("--wan-vae", help="override the Wan VAE the model's training data was made with")
    p.add_argument("--wan-vae-subfolder")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")


def _add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="output root (a folder or an fsspec URL)")


def _add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    """The preprocess flow's parameters (shared by `preprocess` and `backfill`), grouped as the flow groups them."""
    _add_dataset_arguments(p)
    p.add_argument("--profile", choices=["talking_head", "general"], default="talking_head",
                    help="talking_head: face crop and every feature; general: centre crop + VAE, video-only shards "
                         "for the pretrain stage (Panda-70M, VoxCeleb2)")
    p.add_argument("--steps", nargs="*")
    p.add_argument("--limit", type=at_least(1))
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--workers", type=at_least(1), default=2)
    p.add_argument("--window-frames", type=window_frames_arg,
                   help="video frames per window, 4n+1 (default: the shard writer's, 33)")
    p.add_argument("--window-stride", type=at_least(1), help="frames between window starts (default: the window)")
    p.add_argument("--models", choices=["real", "dryrun"], default="real")
    p.add_argument("--liveportrait-root", help="folder holding LivePortrait's pretrained_weights/")
    p.add_argument("--hubert", help="HuBERT save_pretrained folder or a repo id in the HF cache")
    p.add_argument("--wan-vae", help="Wan VAE folder (or pipeline folder with --wan-vae-subfolder vae) or cached repo id")
    p.add_argument("--wan-vae-subfolder")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--flame-dir", help="per-clip FLAME parameter files <clip_id>.npz for the pose cross-check")
    p.add_argument("--runner", choices=["local", "processes", "ray"], default="local",
                    help="local: threads of this process; processes: --workers worker processes on this machine; "
                         "ray: one Ray task per batch")
    p.add_argument("--ray-address", help="'auto', a cluster address, or none for a local Ray instance")
    p.add_argument("--ray-num-cpus", type=at_least(1), help="CPUs of a local Ray instance")
    p.add_argument("--cpus-per-batch", type=positive_float, default=1.0)
    p.add_argument("--gpus-per-batch", type=non_negative_float, default=1.0,
                   help="for the GPU steps, when the cluster has GPUs")
    p.add_argument("--shard-groups", type=at_least(1), default=16, help="independent shard writers, merged at the end")
    p.add_argument("--work-root", help="folder or fsspec URL for step outputs (default: under --out)")
    p.add_argument("--scratch-root", help="local folder where workers stage step files when the step outputs are "
                                           "remote (default: a per-user folder in the system temp dir)")
    p.add_argument("--retry-rejected", action="store_true",
                    help="run clips whose cached result is a rejection again (after fixing what rejected them)")
    p.add_argument("--audit-fraction", type=fraction, default=0.02,
                    help="share of the new shard set's samples re-derived and compared member by member (0: none)")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """Every command registers its own parser (add_<command> beside cmd_<command>; server and plan in their modules)."""
    from flows.plan import add_plan_parser
    from flows.server import add_server_parser

    p = argparse.ArgumentParser(prog="dualforce", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_dry_run, add_preprocess, add_backfill, add_audit, add_manifest, add_train, add_program, add_pipeline,
                add_server_parser, add_plan_parser, add_model_info, add_export, add_generate, add_evaluate, add_ablate):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputRejected as exc:  # checked before any work: one line, no traceback
        print(f"{args.command}: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
