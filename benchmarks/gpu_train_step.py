"""The `lite` training step as the trainer runs it: DeepSpeed ZeRO-2 on one device, bf16, batch 1, 21 video frames
(6 latent frames) at a 512² crop, Diffusion Forcing loss over both streams.

    python -m benchmarks.gpu_train_step [--size real|tiny --attention sdpa flex --json OUT]

Reports per attention path: step seconds (median), peak GPU memory, the step's FLOPs (model-info's count: dense,
and block-sparse as FlexAttention computes it) and MFU = FLOPs / step time / peak. Two peaks: the device's dense
bf16 spec (H200/H100 989 TFLOP/s; the goal is MFU >= 45% of it) and a bf16 matmul measured in the same run (the
baseline this machine really reaches). `tiny`: the tiny model at a 32² latent in fp32 on the CPU, through the same
DeepSpeed engine (gloo), to check the path; its MFU is against the measured fp32 matmul.
"""
from __future__ import annotations

import os

import torch

from benchmarks.gpu_common import (
    finish,
    measured_matmul_peak,
    parser,
    peak_gib,
    reset_peak,
    settle,
    spec_peak,
    timed,
)
from models.dualforce import DiffusionForcingConfig, build_model, diffusion_forcing_loss, measure
from models.dualforce.frames import num_latent_frames

VIDEO_FRAMES = 21


def _batch(cfg, latent: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    L = num_latent_frames(VIDEO_FRAMES)
    return {
        "video_latents": torch.randn(1, cfg.latent_channels, L, latent, latent, generator=g, device=device),
        "reference_latent": torch.randn(1, cfg.latent_channels, 1, latent, latent, generator=g, device=device),
        "struct": torch.randn(1, VIDEO_FRAMES, cfg.struct_dim, generator=g, device=device),
        "audio_features": torch.randn(1, VIDEO_FRAMES, cfg.audio_dim, generator=g, device=device),
        "keep_mask": torch.ones(1, VIDEO_FRAMES, dtype=torch.bool, device=device),
    }


def _engine(model, device):
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    from training.train_config import load_ds_config

    ds = load_ds_config("zero2")
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=1,
              gradient_clipping=1.0, bf16={"enabled": device.type == "cuda"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=ds)
    return engine


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--attention", nargs="+", default=None, help="default: flex and sdpa on CUDA, sdpa on CPU")
    args = p.parse_args(argv)
    device, size = settle(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name, latent = ("lite", 64) if size == "real" else ("tiny", 32)
    backends = args.attention or (["flex", "sdpa"] if device.type == "cuda" else ["sdpa"])
    loss_cfg = DiffusionForcingConfig()
    torch.manual_seed(0)
    model = build_model(name, grad_checkpointing=False)
    engine = _engine(model, device)
    batch = _batch(model.config, latent, device)
    gen = torch.Generator(device=device).manual_seed(1)
    info = measure(name, video_frames=VIDEO_FRAMES, latent_size=(latent, latent))
    measured = measured_matmul_peak(device, 8192 if device.type == "cuda" else 1024)
    spec = spec_peak(device)

    def step():
        loss = diffusion_forcing_loss(engine, batch, loss_cfg, gen)["loss"]
        engine.backward(loss)
        engine.step()

    paths = {}
    for backend in backends:
        engine.module.set_attention_backend(backend)
        reset_peak(device)
        seconds = timed(step, device, args.repeats, warmup=2)
        flops = info.block_sparse_flops if backend == "flex" else info.train_step_flops
        paths[backend] = {
            "step_s": seconds, "peak_gib": peak_gib(device), "flops": flops,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu_vs_spec": None if spec is None else flops / seconds / spec,
            "mfu_vs_measured_matmul": flops / seconds / measured,
        }
    if "flex" in paths and "sdpa" in paths:
        paths["flex_step_over_sdpa"] = paths["flex"]["step_s"] / paths["sdpa"]["step_s"]
    return finish("gpu_train_step", args, device, size, {
        "model": name, "params": info.total_params, "video_frames": VIDEO_FRAMES, "latent": [latent, latent],
        "zero_stage": engine.zero_optimization_stage(), "bf16": device.type == "cuda",
        "spec_bf16_peak_tflops": None if spec is None else spec / 1e12,
        "measured_matmul_tflops": measured / 1e12, "dense_flops": info.train_step_flops,
        "block_sparse_flops": info.block_sparse_flops, "paths": paths,
    })


if __name__ == "__main__":
    main()
