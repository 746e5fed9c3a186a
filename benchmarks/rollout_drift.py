"""Rollout drift: does training on the situation the sampler streams in slow the error growth of a rollout?

    python -m benchmarks.rollout_drift [--shards PATTERN] [--steps 300] [--latent-crop 16] [--sampler-steps 8]

Two `tiny` models from the same initial weights, trained the same number of steps on the same shard batches with
the same noise seeds: one with independent per-frame sigma (classic Diffusion Forcing,
`DiffusionForcingConfig.independent()`), one with the default schedule (non-decreasing sigma + the clean-prefix
mix, diffusion_forcing.py). Then, on the same samples with the same sampler noise, frame by frame:

- rollout: the sampler from the reference alone; every frame's context is the model's own earlier frames;
- teacher-forced: frame t made with the ground-truth frames < t as its context, written into the cache exactly as
  generated context is (same context-noise level, not marked given), so the two differ only in whose history it is.

Printed per latent frame: the mean squared error to the ground-truth latent of the rollout and of the
teacher-forced frame, and their ratio (rollout / teacher-forced): how much worse a frame gets because its history
was generated. The data are the dry-run's shards (`./run dry-run` writes them; real sample clips, untrained
extractors); latents are centre-cropped to --latent-crop (a crop of the video, for CPU speed).
"""
from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import torch

DEFAULT_SHARDS = ("dryrun-output/**/shards/train/shard-*.tar", "/tmp/dr/**/shards/train/shard-*.tar")


def _find_shards(pattern: str | None) -> str:
    for candidate in ([pattern] if pattern else DEFAULT_SHARDS):
        if glob.glob(candidate, recursive=True):
            return candidate
    raise SystemExit("no shards: run `./run dry-run` first, or pass --shards 'ROOT/shards/train/shard-*.tar'")


def _batches(pattern: str, crop: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from training.loader import LoaderConfig, ShardLoader
    from training.shard_sets import shard_set_info

    files = sorted(glob.glob(pattern, recursive=True))
    info = shard_set_info(Path(files[0]).parent.parent)
    loader = ShardLoader(LoaderConfig(files, info.window, info.crop_size, audio_dim=info.audio_dim,
                                      batch_size=batch_size, shuffle_buffer=0, partial_batches=True,
                                      struct_dim=info.struct_dim, rank=0, world_size=1))
    out = []
    for batch in loader.epoch_iter():
        h, w = batch["video_latents"].shape[-2:]
        y, x = (h - crop) // 2, (w - crop) // 2
        out.append({k: (v[..., y:y + crop, x:x + crop] if k in ("video_latents", "reference_latent") else v)
                    for k, v in batch.items() if torch.is_tensor(v)})
    if not out:
        raise SystemExit(f"{pattern}: the loader yielded no batch")
    return out


def _train(batches, loss_cfg, steps: int, audio_dim: int, struct_dim: int, lr: float):
    from models.dualforce import build_model, diffusion_forcing_loss

    torch.manual_seed(0)
    model = build_model("tiny", audio_dim=audio_dim, struct_dim=struct_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        out = diffusion_forcing_loss(model, batches[step % len(batches)], loss_cfg,
                                     torch.Generator().manual_seed(1000 + step))
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out["loss"].item())
    return model.eval(), losses


def _drift(model, samples, sampler_cfg) -> dict[str, list[float]]:
    """Per latent frame: rollout and teacher-forced MSE to the ground truth, averaged over the samples."""
    from models.dualforce import generate, stream
    from models.dualforce.frames import group_rows

    rollout_err, forced_err = None, None
    for i, s in enumerate(samples):
        gt = s["video_latents"][None].float()  # [1, 16, L, h, w]
        gt_struct = group_rows(s["struct"][None].float())
        ref, audio = s["reference_latent"][None].float(), s["audio_features"][None].float()
        L = gt.shape[2]
        rollout, _ = generate(model, ref, audio, sampler_cfg, torch.Generator().manual_seed(i))
        forced = [rollout[:, :, :1]]  # frame 0 has no history
        for t in range(1, L):
            chunk = next(stream(model, ref, audio, sampler_cfg, torch.Generator().manual_seed(i),
                                context_video=gt[:, :, :t], context_struct=gt_struct[:, :t], context_given=False))
            forced.append(chunk.video_latents)
        forced = torch.cat(forced, 2)
        r = (rollout - gt).pow(2).mean(dim=(0, 1, 3, 4))
        f = (forced - gt).pow(2).mean(dim=(0, 1, 3, 4))
        rollout_err = r if rollout_err is None else rollout_err + r
        forced_err = f if forced_err is None else forced_err + f
    n = len(samples)
    return {"rollout_mse": (rollout_err / n).tolist(), "teacher_forced_mse": (forced_err / n).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard glob (default: the dry-run's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--latent-crop", type=int, default=16)
    p.add_argument("--sampler-steps", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=6)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from models.dualforce import DiffusionForcingConfig, SamplerConfig

    pattern = _find_shards(args.shards)
    batches = _batches(pattern, args.latent_crop, args.batch)
    audio_dim, struct_dim = batches[0]["audio_features"].shape[-1], batches[0]["struct"].shape[-1]
    samples = [{k: v[j] for k, v in b.items()} for b in batches for j in range(b["video_latents"].shape[0])]
    samples = samples[: args.eval_samples]
    sampler_cfg = SamplerConfig(steps=args.sampler_steps)
    schedules = {"independent": DiffusionForcingConfig.independent(), "default": DiffusionForcingConfig()}
    report = {"shards": pattern, "steps": args.steps, "latent_crop": args.latent_crop,
              "latent_frames": int(batches[0]["video_latents"].shape[2]), "samples": len(samples), "schedules": {}}
    for name, loss_cfg in schedules.items():
        t0 = time.perf_counter()
        model, losses = _train(batches, loss_cfg, args.steps, audio_dim, struct_dim, args.lr)
        figures = _drift(model, samples, sampler_cfg)
        figures.update(final_loss=sum(losses[-20:]) / len(losses[-20:]), seconds=round(time.perf_counter() - t0, 1))
        report["schedules"][name] = figures
        print(f"\n{name}: {args.steps} steps, final loss {figures['final_loss']:.4f} ({figures['seconds']} s)")
        print(f"{'frame':>5} {'rollout MSE':>12} {'forced MSE':>11} {'ratio':>7}")
        for t, (r, f) in enumerate(zip(figures["rollout_mse"], figures["teacher_forced_mse"])):
            print(f"{t:>5} {r:>12.4f} {f:>11.4f} {r / max(f, 1e-12):>7.3f}")
    for name, fig in report["schedules"].items():
        ratios = [r / max(f, 1e-12) for r, f in zip(fig["rollout_mse"][1:], fig["teacher_forced_mse"][1:])]
        fig["mean_ratio_after_frame_0"] = sum(ratios) / len(ratios)
        growth = fig["rollout_mse"][-1] / max(fig["rollout_mse"][0], 1e-12)
        fig["rollout_growth_last_over_first"] = growth
        print(f"{name:>12}: rollout/forced {fig['mean_ratio_after_frame_0']:.3f} (mean over frames >= 1); "
              f"rollout MSE last/first frame {growth:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
