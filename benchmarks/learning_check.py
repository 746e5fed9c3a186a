"""Does the model learn, and does it use what it is given? The tiny model trained on the CPU, then measured on
windows it never saw.

    python -m benchmarks.learning_check [--minutes 5] [--window-frames 81] [--stride 4] [--size 64] [--out DIR]

Data: the sample clips with speech (../shared/samples: sun, yongen, lp_d3, lp_d12, lp_d19, lp_s18) through the
real step functions with the dry-run extractors: the crop step (512 px, a clip it rejects is reported and left
out), LivePortrait-layout motion -> struct rows on the crop, HuBERT-layout features on the crop's audio, and the
Wan-layout VAE on the crop frames downscaled to --size (64 px -> 8x8 latents: a latent size two cores can train).
The extractors are random networks, but deterministic functions of the frames and the audio, so the learning
problem is real: the speech does carry information about the struct rows of a talking mouth (through the motion
extractor) and about the frames' latents (through the VAE), as much as a random projection of them keeps.

Windows of --window-frames frames (81 = 21 latent frames) every --stride frames; the last --held-out-frames of each clip
(at least one window) are held out, and no training window reaches into them. Struct rows are standardised with the
training windows' per-column mean / std (the shards' motion rows are unit-scale too).

Two tiny models from the same initial weights, trained for --minutes each on the same batches and noise: the
default Diffusion Forcing schedule and independent per-frame sigma. For each: the held-out loss at fixed noise
before, during and after training, then training/conditioning_use on the held-out windows (audio use, reference
use, bridge effect, with their spread) and the rollout drift per latent frame. Written to OUT/learning_check.json
and printed as a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)
SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"
SPEAKING_CLIPS = ("sun.mp4", "yongen.mp4", "more/lp_d3.mp4", "more/lp_d12.mp4", "more/lp_d19.mp4",
                  "more/lp_s18.mp4")


@dataclass
class CheckConfig:
    clips: tuple[str, ...] = SPEAKING_CLIPS
    samples: Path = SAMPLES
    window_frames: int = 81  # video frames (4n + 1): 21 latent frames
    stride: int = 4
    held_out_frames: int = 100  # the tail of every clip the model never trains on (at least one window)
    size: int = 64  # crop frames downscaled to this before the VAE (a multiple of 16)
    minutes: float = 5.0  # training time per schedule
    max_steps: Optional[int] = None  # stop at this many steps if it comes first
    batch_size: int = 4
    lr: float = 1e-3
    eval_every: int = 50  # steps between held-out losses
    use_windows: int = 16
    drift_windows: int = 2
    drift_sampler_steps: int = 4
    schedules: tuple[str, ...] = ("default", "independent")
    seed: int = 0


@dataclass
class ClipWindows:
    name: str
    train: list = field(default_factory=list)  # HeldOutWindow per training window
    held_out: list = field(default_factory=list)
    frames: int = 0
    rejected: str = ""


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def clip_windows(path: Path, work: Path, cfg: CheckConfig, models) -> ClipWindows:
    """One sample clip through crop, motion, HuBERT and the VAE -> its training and held-out windows."""
    from models.struct_layout import to_struct
    from tasks.errors import ClipRejected
    from tasks.feature_models import hubert, motion_extractor, wan_vae
    from tasks.media import read_frames
    from tasks.steps.audio_features import audio_features_for_clip, require_usable
    from tasks.steps.crop import crop_clip
    from tasks.steps.motion import extract_motion
    from tasks.steps.vae_latents import encode_reference, encode_windows
    from training.conditioning_use import HeldOutWindow

    out = ClipWindows(path.stem)
    try:
        crop = crop_clip(path, work / path.stem)
        frames = read_frames(crop.clip_dir / "crop.mp4")
        features = require_usable(audio_features_for_clip(crop.clip_dir / "audio.wav", len(frames), hubert(models)))
    except ClipRejected as exc:
        out.rejected = str(exc)
        return out
    out.frames = len(frames)
    struct = to_struct(extract_motion(frames, motion_extractor(models)))  # [T, 133]
    small = _resize(frames, cfg.size)
    wan = wan_vae(models)
    reference = encode_reference(wan, small[0])  # [16, 1, h, w]: the clip's first frame, as the shards'
    cut = max(len(frames) - max(cfg.held_out_frames, cfg.window_frames), 0)
    starts = {"train": list(range(0, cut - cfg.window_frames + 1, cfg.stride)),
              "held_out": list(range(cut, len(frames) - cfg.window_frames + 1, cfg.stride))}
    for part, part_starts in starts.items():
        for first in range(0, len(part_starts), 8):
            batch = part_starts[first:first + 8]
            latents = encode_windows(wan, [small[s:s + cfg.window_frames] for s in batch]).float().cpu()
            for s, lat in zip(batch, latents):
                tensors = {"video_latents": lat, "reference_latent": torch.from_numpy(np.asarray(reference, np.float32)),
                           "struct": torch.from_numpy(struct[s:s + cfg.window_frames].copy()),
                           "audio_features": torch.from_numpy(features[s:s + cfg.window_frames].astype(np.float32)),
                           "keep_mask": torch.ones(cfg.window_frames, dtype=torch.bool)}
                getattr(out, part).append(HeldOutWindow(f"{path.stem}_w{s:06d}", path.stem, tensors))
    return out


def standardise_struct(train: list, held_out: list) -> None:
    """Struct rows to unit scale per column with the training windows' statistics (in place)."""
    rows = torch.cat([w.tensors["struct"] for w in train])
    mean, std = rows.mean(0), rows.std(0).clamp_min(1e-6)
    for w in train + held_out:
        w.tensors["struct"] = (w.tensors["struct"] - mean) / std


def _batch(windows: list, picks: list[int]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([windows[i].tensors[k] for i in picks]) for k in windows[0].tensors}


def train_and_measure(train: list, held_out: list, schedule: str, cfg: CheckConfig) -> dict[str, Any]:
    """One schedule: train the tiny model for cfg.minutes on `train`, held-out losses on the way, then the
    conditioning-use figures and the drift on `held_out`."""
    from models.dualforce import DiffusionForcingConfig, build_model, diffusion_forcing_loss
    from training.conditioning_use import ConditioningUseConfig, held_out_losses, measure_conditioning_use

    loss_cfg = DiffusionForcingConfig() if schedule == "default" else DiffusionForcingConfig.independent()
    use_cfg = ConditioningUseConfig(windows=len(held_out), seed=cfg.seed, drift_sampler_steps=cfg.drift_sampler_steps,
                                    drift_windows=cfg.drift_windows)
    torch.manual_seed(cfg.seed)
    audio_dim = train[0].tensors["audio_features"].shape[-1]
    model = build_model("tiny", audio_dim=audio_dim, struct_dim=train[0].tensors["struct"].shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    order = np.random.default_rng(cfg.seed)
    curve = [{"step": 0, **held_out_losses(model, held_out, use_cfg)}]
    train_losses, step, started = [], 0, time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(desc=f"learning check: train ({schedule})", unit="step") as bar:
        while time.perf_counter() - started < 60 * cfg.minutes and (cfg.max_steps is None or step < cfg.max_steps):
            picks = order.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False).tolist()
            out = diffusion_forcing_loss(model, _batch(train, picks), loss_cfg,
                                         torch.Generator().manual_seed(cfg.seed * 7919 + step))
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            train_losses.append(out["loss"].item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(train_losses[-20:]):.4f}")
            if step % cfg.eval_every == 0:
                curve.append({"step": step, **held_out_losses(model, held_out, use_cfg)})
    train_s = time.perf_counter() - started
    if curve[-1]["step"] != step:
        curve.append({"step": step, **held_out_losses(model, held_out, use_cfg)})
    t0 = time.perf_counter()
    use = measure_conditioning_use(model, held_out, use_cfg, split="held-out tail")
    return {"schedule": schedule, "steps": step, "train_s": round(train_s, 1), "s_per_step": round(train_s / step, 3),
            "train_loss_first_20": float(np.mean(train_losses[:20])), "train_loss_last_20": float(np.mean(train_losses[-20:])),
            "held_out_curve": curve, "conditioning": use.to_json(), "rows": use.rows(),
            "measure_s": round(time.perf_counter() - t0, 1)}


def run_check(cfg: CheckConfig, work: Path) -> dict[str, Any]:
    from tasks.feature_models import dryrun_models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = dryrun_models()
    started = time.perf_counter()
    clips = [clip_windows(cfg.samples / name, work / "crops", cfg, models) for name in cfg.clips]
    train = [w for c in clips for w in c.train]
    held_out = [w for c in clips for w in c.held_out]
    if len(train) < cfg.batch_size or len({w.clip_id for w in held_out}) < 2:
        raise SystemExit(f"learning check: {len(train)} training windows, held-out windows from "
                         f"{len({w.clip_id for w in held_out})} clips; it needs {cfg.batch_size}+ and 2+")
    standardise_struct(train, held_out)
    if len(held_out) > cfg.use_windows:  # evenly over the clips' tails, so every identity stays in
        held_out = [held_out[int(i)] for i in np.linspace(0, len(held_out) - 1, cfg.use_windows).round()]
    report = {"config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                         for k, v in asdict(cfg).items()},
              "clips": [{"name": c.name, "frames": c.frames, "train_windows": len(c.train),
                         "held_out_windows": len(c.held_out), "rejected": c.rejected} for c in clips],
              "train_windows": len(train), "held_out_windows": len(held_out),
              "latent_shape": list(train[0].tensors["video_latents"].shape),
              "data_s": round(time.perf_counter() - started, 1), "schedules": {}}
    for schedule in cfg.schedules:
        report["schedules"][schedule] = train_and_measure(train, held_out, schedule, cfg)
    return report


def summary_table(report: dict[str, Any]) -> str:
    """The figures the issue asks for, one row each, one column per schedule."""
    names = list(report["schedules"])
    lines = [f"| figure | {' | '.join(names)} |", "|---|" + "---|" * len(names)]

    def row(label, cell):
        lines.append(f"| {label} | {' | '.join(cell(report['schedules'][n]) for n in names)} |")

    row("steps (s/step)", lambda s: f"{s['steps']} ({s['s_per_step']} s)")
    row("held-out video loss: start -> end", lambda s: f"{s['held_out_curve'][0]['video']:.4f} -> "
                                                       f"{s['held_out_curve'][-1]['video']:.4f}")
    row("held-out struct loss: start -> end", lambda s: f"{s['held_out_curve'][0]['struct']:.4f} -> "
                                                        f"{s['held_out_curve'][-1]['struct']:.4f}")
    figures = [f["name"] for f in next(iter(report["schedules"].values()))["conditioning"]["figures"]]
    for name in figures:
        def cell(s, name=name):
            f = next(f for f in s["conditioning"]["figures"] if f["name"] == name)
            return f"{f['ratio_median']:.4f} ({f['ratio_q25']:.4f}-{f['ratio_q75']:.4f})"
        row(name, cell)
    row("drift ratio per latent frame", lambda s: " ".join(f"{r:.2f}" for r in (s["conditioning"]["drift"] or
                                                                                 {"ratio": []})["ratio"]))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=CheckConfig.minutes, help="training time per schedule")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--window-frames", type=int, default=CheckConfig.window_frames)
    p.add_argument("--stride", type=int, default=CheckConfig.stride)
    p.add_argument("--held-out-frames", type=int, default=CheckConfig.held_out_frames)
    p.add_argument("--size", type=int, default=CheckConfig.size)
    p.add_argument("--clips", nargs="+", default=list(SPEAKING_CLIPS), help="paths under --samples")
    p.add_argument("--samples", type=Path, default=SAMPLES)
    p.add_argument("--use-windows", type=int, default=CheckConfig.use_windows)
    p.add_argument("--schedules", nargs="+", default=list(CheckConfig.schedules), choices=["default", "independent"])
    p.add_argument("--out", type=Path, default=Path("learning-check"))
    args = p.parse_args(argv)
    if args.window_frames % 4 != 1 or args.size % 16 or args.stride < 1:
        p.error("--window-frames must be 4n+1, --size a multiple of 16, --stride >= 1")
    cfg = CheckConfig(clips=tuple(args.clips), samples=args.samples, window_frames=args.window_frames, stride=args.stride,
                      held_out_frames=args.held_out_frames, size=args.size, minutes=args.minutes,
                      max_steps=args.max_steps, use_windows=args.use_windows, schedules=tuple(args.schedules))
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_check(cfg, args.out)
    tmp = args.out / ".learning_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(args.out / "learning_check.json")
    print(f"\n{report['train_windows']} training / {report['held_out_windows']} held-out windows of "
          f"{cfg.window_frames} frames, latents {report['latent_shape']}; data {report['data_s']} s")
    for c in report["clips"]:
        print(f"  {c['name']}: {c['frames']} frames, {c['train_windows']} train / {c['held_out_windows']} held out"
              + (f" (rejected: {c['rejected']})" if c["rejected"] else ""))
    print("\n" + summary_table(report))
    return report


if __name__ == "__main__":
    main()
