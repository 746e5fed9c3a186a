"""Capacity plan: hours and disk to preprocess a dataset's manifest on K CPU workers and G GPUs.

    dualforce plan DATASET --cpus K --gpus G [--manifest M] [--ledger DIR] [--rate STEP=S ...]

Costs come from a finished run's ledger (DIR = a dataset output folder `<output_root>/<dataset>`, holding
`ledger/` and `steps/`): for each step, the compute seconds it recorded divided by the seconds of clip it
ran on. Assumptions (printed with every plan):
- cost is linear in clip seconds (every step streams frames; shard cost is recorded per clip as an even
  share of the shard writer's time);
- only entries that ran and ended ok or rejected count (cached skips cost nothing; failures are retried);
- a clip's seconds are its downloaded duration (the download step's probe), else the crop's frames / 25;
- `reach` is the share of the measured input clip-seconds each step ran on: rejections upstream (no face,
  no audio, pose disagreement) shrink the work and the disk of every later step in the same proportion;
- CPU steps (download, crop, pose_check, shard) spread evenly over K workers and GPU steps (motion,
  audio_features, vae_latents) over G GPUs, each worker/GPU as fast as the one that made the ledger;
- steps overlap across batches, so the run lasts at least max(CPU hours / K, GPU hours / G) and at most
  their sum (every step waiting for the one before);
- disk per step is datasets_manifest/summary.py's bytes per clip second x manifest seconds x reach.
A ledger from a CPU dry-run measures the GPU steps on CPU with small random models: pass
`--rate motion=... --rate audio_features=... --rate vae_latents=...` (seconds per clip second) for real ones.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional

from datasets_manifest.schema import ClipRow
from datasets_manifest.summary import VIDEO_FPS, format_bytes, storage_bytes_per_second
from tasks.steps.audio_features import AudioFeaturesStep
from tasks.steps.crop import CropStep
from tasks.steps.download import DownloadStep
from tasks.steps.motion import MotionStep
from tasks.steps.pipeline import TALKING_HEAD
from tasks.steps.pose_check import PoseCheckStep
from tasks.steps.shard import ShardStep
from tasks.steps.vae_latents import VaeLatentsStep

PIPELINE_STEPS = TALKING_HEAD.steps
GPU_STEPS = tuple(cls.name for cls in TALKING_HEAD.step_classes if getattr(cls, "weights", None))  # they load a model
CPU_STEPS = tuple(s for s in PIPELINE_STEPS if s not in GPU_STEPS)
# pipeline step -> its key in summary.storage_bytes_per_second()
STORAGE_KEY = {DownloadStep.name: "download", CropStep.name: "crop", MotionStep.name: "motion",
               PoseCheckStep.name: "flame", AudioFeaturesStep.name: "hubert", VaeLatentsStep.name: "vae",
               ShardStep.name: "shards"}
COUNTED_STATUS = ("ok", "rejected")


@dataclass(frozen=True)
class StepCost:
    step: str
    seconds_per_clip_s: float  # compute seconds per second of clip the step ran on
    reach: float  # share of the measured input clip-seconds the step ran on (0..1)
    clips: int  # ledger entries the rate is measured over
    clip_seconds: float
    source: str = "ledger"  # ledger | override


@dataclass(frozen=True)
class StepPlan:
    step: str
    kind: str  # cpu | gpu
    workers: int
    seconds_per_clip_s: Optional[float]  # None: not measured and not given
    reach: float
    compute_hours: Optional[float]  # on one worker / one GPU
    wall_hours: Optional[float]  # compute_hours / workers
    storage_bytes: float


@dataclass(frozen=True)
class CapacityPlan:
    dataset: str
    clips: int
    clip_hours: float
    unknown_duration_clips: int
    cpus: int
    gpus: int
    steps: list[StepPlan]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def _wall(self, kind: str) -> float:
        return sum(s.wall_hours or 0.0 for s in self.steps if s.kind == kind)

    @property
    def cpu_wall_hours(self) -> float:
        return self._wall("cpu")

    @property
    def gpu_wall_hours(self) -> float:
        return self._wall("gpu")

    @property
    def wall_hours_overlapped(self) -> float:
        """Lower bound: CPU and GPU pools busy at once, batches flowing through."""
        return max(self.cpu_wall_hours, self.gpu_wall_hours)

    @property
    def wall_hours_sequential(self) -> float:
        """Upper bound: every step waits for the one before."""
        return self.cpu_wall_hours + self.gpu_wall_hours

    @property
    def storage_bytes(self) -> float:
        return sum(s.storage_bytes for s in self.steps)

    @property
    def unmeasured(self) -> list[str]:
        return [s.step for s in self.steps if s.seconds_per_clip_s is None]


def costs_from_ledger(entries: Iterable[Mapping], durations: Mapping[str, float]) -> dict[str, StepCost]:
    """Per-step cost from ledger rows (dicts with clip_id, step, status, action, seconds) and clip seconds."""
    spent: dict[str, float] = defaultdict(float)
    covered: dict[str, float] = defaultdict(float)
    counted: dict[str, int] = defaultdict(int)
    reached: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        step, clip = e["step"], e["clip_id"]
        if step not in PIPELINE_STEPS or e["status"] not in COUNTED_STATUS or clip not in durations:
            continue
        reached[step].add(clip)
        if e["action"] == "ran":
            spent[step] += float(e["seconds"])
            covered[step] += durations[clip]
            counted[step] += 1
    # the run's input: the clips that got through download (or, for a run without it, any step)
    inputs = reached.get(DownloadStep.name) or set().union(*reached.values())
    total_in = sum(durations[c] for c in inputs)
    costs = {}
    for step in PIPELINE_STEPS:
        if counted[step] == 0 or covered[step] <= 0:
            continue
        reach = sum(durations[c] for c in reached[step] & inputs) / total_in if total_in else 0.0
        costs[step] = StepCost(step, spent[step] / covered[step], min(1.0, reach), counted[step], covered[step])
    return costs


def clip_durations(dataset_dir: str | Path) -> dict[str, float]:
    """clip_id -> seconds, from the download step's probe (else the crop's frame count) in `steps/`."""
    steps = Path(dataset_dir) / "steps"
    out: dict[str, float] = {}
    for step, read in ((DownloadStep.name, lambda info: info.get("duration_s")),
                       (CropStep.name, lambda info: info["frames"] / VIDEO_FPS if "frames" in info else None)):
        for status in sorted((steps / step).glob("*/_status.json")):
            clip = status.parent.name
            if clip in out:
                continue
            try:
                seconds = read(json.loads(status.read_text()).get("info") or {})
            except (ValueError, OSError):
                continue
            if seconds:
                out[clip] = float(seconds)
    return out


def dryrun_steps(dataset_dir: str | Path) -> list[str]:
    """Steps whose recorded outputs say they came from untrained dry-run models."""
    found = []
    for step in GPU_STEPS:
        for status in (Path(dataset_dir) / "steps" / step).glob("*/_status.json"):
            try:
                if (json.loads(status.read_text()).get("info") or {}).get("untrained_dryrun"):
                    found.append(step)
                    break
            except (ValueError, OSError):
                continue
    return found


def load_costs(dataset_dir: str | Path) -> dict[str, StepCost]:
    """Measured costs of a finished run under `dataset_dir` (or its `ledger/` folder)."""
    from tasks.ledger import LEDGER_DIR, read_ledger

    d = Path(dataset_dir)
    if d.name == LEDGER_DIR:
        d = d.parent
    if not (d / LEDGER_DIR).is_dir():
        raise FileNotFoundError(f"no ledger under {d} (expected {d / LEDGER_DIR}/*.parquet from a finished run)")
    durations = clip_durations(d)
    if not durations:
        raise ValueError(f"{d / 'steps'} has no download or crop results to take clip durations from")
    return costs_from_ledger(read_ledger(d).to_pylist(), durations)


def parse_rates(items: Iterable[str]) -> dict[str, float]:
    """['motion=0.05', ...] -> {'motion': 0.05}; seconds of compute per second of clip."""
    rates = {}
    for item in items:
        step, sep, value = item.partition("=")
        if not sep or step not in PIPELINE_STEPS:
            raise ValueError(f"--rate wants STEP=SECONDS_PER_CLIP_SECOND with STEP one of {PIPELINE_STEPS}, got {item!r}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--rate {item!r}: {value!r} is not a number") from None
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"--rate {item!r}: the rate must be a finite number >= 0")
        rates[step] = rate
    return rates


def plan_capacity(rows: Iterable[ClipRow], costs: Mapping[str, StepCost], cpus: int, gpus: int, *, dataset: str = "",
                  rates: Optional[Mapping[str, float]] = None, window_frames: Optional[int] = None,
                  hubert_dim: Optional[int] = None) -> CapacityPlan:
    """Project compute hours, wall hours and disk per step for the manifest `rows`."""
    if cpus < 1 or gpus < 1:
        raise ValueError(f"need at least one CPU worker and one GPU, got --cpus {cpus} --gpus {gpus}")
    rows = list(rows)
    known = [r.duration_s for r in rows if r.duration_s is not None]
    total_s = float(sum(known))
    sizes = {k: v for k, v in (("window_frames", window_frames), ("hubert_dim", hubert_dim)) if v is not None}
    bytes_per_s = storage_bytes_per_second(**sizes)
    rates = dict(rates or {})
    steps = []
    for name in PIPELINE_STEPS:
        kind, workers = ("gpu", gpus) if name in GPU_STEPS else ("cpu", cpus)
        cost = costs.get(name)
        reach = cost.reach if cost is not None else 1.0
        rate = rates.get(name, cost.seconds_per_clip_s if cost is not None else None)
        compute_h = None if rate is None else total_s * reach * rate / 3600.0
        steps.append(StepPlan(name, kind, workers, rate, reach, compute_h,
                              None if compute_h is None else compute_h / workers,
                              bytes_per_s[STORAGE_KEY[name]] * total_s * reach))
    notes = []
    if len(known) < len(rows):
        notes.append(f"{len(rows) - len(known)} clips have no end time (whole local files): not counted")
    missing = [s.step for s in steps if s.seconds_per_clip_s is None]
    if missing:
        notes.append(f"no measured cost for {', '.join(missing)}: left out of the hours (give --rate STEP=S)")
    return CapacityPlan(dataset or ",".join(sorted({r.dataset for r in rows})), len(rows), total_s / 3600.0,
                        len(rows) - len(known), cpus, gpus, steps, tuple(notes))


def _hours(h: Optional[float]) -> str:
    return "n/a" if h is None else f"{h:,.2f}"


def format_plan(plan: CapacityPlan) -> str:
    lines = [
        f"capacity plan: {plan.dataset}  clips {plan.clips:,}  clip hours {plan.clip_hours:,.2f}  "
        f"on {plan.cpus} CPU workers + {plan.gpus} GPUs",
        "",
        f"{'step':<16}{'on':>4}{'s/clip-s':>10}{'reach':>7}{'compute h':>12}{'wall h':>10}{'disk':>14}",
    ]
    for s in plan.steps:
        rate = "n/a" if s.seconds_per_clip_s is None else f"{s.seconds_per_clip_s:.4f}"
        lines.append(f"{s.step:<16}{s.kind:>4}{rate:>10}{s.reach:>7.2f}{_hours(s.compute_hours):>12}"
                     f"{_hours(s.wall_hours):>10}{format_bytes(s.storage_bytes):>14}")
    lines += [
        "",
        f"CPU steps: {plan.cpu_wall_hours:,.2f} h on {plan.cpus} workers; GPU steps: {plan.gpu_wall_hours:,.2f} h on "
        f"{plan.gpus} GPUs",
        f"wall time: {plan.wall_hours_overlapped:,.2f} h (steps overlapped) to {plan.wall_hours_sequential:,.2f} h "
        f"(steps in sequence)",
        f"disk: {format_bytes(plan.storage_bytes)} if every step's output is kept",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


DEFAULT_LEDGER = Path("dryrun-output") / "samples"


USAGE, UNUSABLE_INPUT = 2, 6  # the exit codes of flows/outcomes.py (this package sits below flows/)


def _refused(code: int, message: str) -> int:
    print(f"plan: {message}", file=sys.stderr)
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    from datasets_manifest.schema import read_manifest

    if args.cpus < 1 or args.gpus < 0:
        return _refused(USAGE, f"--cpus must be at least 1 and --gpus at least 0, got {args.cpus} and {args.gpus}")
    manifest = Path(args.manifest or Path("data") / "manifests" / f"{args.dataset}.parquet")
    if not manifest.is_file():
        return _refused(USAGE, f"manifest {manifest} not found (build it with `./run manifest {args.dataset} SRC "
                               f"-o {manifest}` or pass --manifest)")
    try:
        rows, bad = read_manifest(manifest)
    except Exception as exc:  # not parquet, another schema
        return _refused(UNUSABLE_INPUT, f"manifest {manifest} cannot be read ({type(exc).__name__}: {exc})")
    if args.ledger and not Path(args.ledger).exists():
        return _refused(USAGE, f"--ledger {args.ledger} does not exist")
    ledger = Path(args.ledger or DEFAULT_LEDGER)
    try:
        rates = parse_rates(args.rate or [])
    except ValueError as exc:
        return _refused(USAGE, f"--rate: {exc}")
    try:
        costs = load_costs(ledger)
    except (FileNotFoundError, ValueError) as exc:
        hint = "" if args.ledger else " (run `./run dry-run` first, or pass --ledger DIR of a finished run)"
        return _refused(USAGE if isinstance(exc, FileNotFoundError) else UNUSABLE_INPUT, f"{exc}{hint}")
    plan = plan_capacity(rows, costs, args.cpus, args.gpus, dataset=args.dataset, rates=rates)
    extra = [f"{len(bad)} malformed manifest rows skipped"] if bad else []
    dry = [s for s in dryrun_steps(ledger if ledger.name != "ledger" else ledger.parent) if s not in rates]
    if dry:
        extra.append(f"rates for {', '.join(dry)} come from untrained dry-run models (likely on CPU): pass --rate")
    measured = ", ".join(f"{c.step} {c.clips}" for c in costs.values())
    extra.append(f"costs measured in {ledger} over clips per step: {measured or 'none'}")
    print(format_plan(replace(plan, notes=plan.notes + tuple(extra))))
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """`dualforce plan DATASET --cpus K --gpus G [--manifest M] [--ledger DIR] [--rate STEP=S ...]`."""
    p = subparsers.add_parser("plan", help="projected hours and disk per step for a dataset on K CPUs and G GPUs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("--cpus", type=int, required=True, help="CPU workers (download, crop, pose_check, shard)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (motion, audio_features, vae_latents)")
    p.add_argument("--manifest", help="manifest parquet (default: data/manifests/DATASET.parquet)")
    p.add_argument("--ledger", help=f"dataset output folder of a finished run, holding ledger/ and steps/ "
                                    f"(default: {DEFAULT_LEDGER})")
    p.add_argument("--rate", action="append", metavar="STEP=S",
                   help="override a step's cost in compute seconds per clip second (repeatable)")
    p.set_defaults(func=cmd_plan)
    return p
