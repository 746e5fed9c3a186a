"""What classifier-free guidance costs the streaming sampler: latent frames per second without guidance, with audio
guidance (one null branch with its own KV cache) and with audio + reference guidance (two), same model and noise.

    python -m benchmarks.guidance_cost [--variant tiny --frames 11 --latent 16 --steps 8 --repeats 3]

Baseline: the same sampler with every scale at 1 (no extra branch runs). Expected: ~2x and ~3x the time, since
each guided condition adds one model pass per denoising step and one cache write per chunk.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--frames", type=int, default=11, help="latent frames to generate")
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from models.dualforce import SamplerConfig, build_model, generate

    torch.manual_seed(0)
    model = build_model(args.variant).eval()
    c = model.config
    T = 4 * (args.frames - 1) + 1
    ref = torch.randn(1, c.latent_channels, 1, args.latent, args.latent)
    audio = torch.randn(1, T, c.audio_dim)
    runs = {"no guidance": SamplerConfig(steps=args.steps),
            "audio": SamplerConfig(steps=args.steps, audio_guidance=2.0),
            "audio + reference": SamplerConfig(steps=args.steps, audio_guidance=2.0, reference_guidance=1.5)}
    generate(model, ref, audio, SamplerConfig(steps=1), torch.Generator().manual_seed(0))  # warm-up
    base = None
    print(f"{args.variant}: {args.frames} latent frames at {args.latent}x{args.latent}, {args.steps} steps")
    for name, cfg in runs.items():
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            generate(model, ref, audio, cfg, torch.Generator().manual_seed(1))
            best = min(best, time.perf_counter() - t0)
        base = base or best
        print(f"{name:>18}: {args.frames / best:7.2f} latent frames/s  ({best / base:.2f}x the time)")


if __name__ == "__main__":
    main()
