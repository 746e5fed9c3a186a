"""Streaming generation: the sampler with and without its KV cache, and real-time video out of it.

    python -m benchmarks.gpu_streaming [--size real|tiny --steps 4 --seconds 10 --json OUT]

1. The sampler alone over 6 latent frames (a training window), latent frames/s with the KV cache and without it
   (every pass recomputes the reference and the whole context: the baseline the cache is for).
2. Streaming generation as `dualforce generate` runs it (training/generate.stream_frames: the cached sampler with
   the bounded cache the training window allows, each latent frame decoded by the Wan VAE as it arrives) over
   `--seconds` of video: video frames/s and the latency of the first frame, the cache's bytes at the end against
   after its window filled (flat: equal). Goals on one H200 at `lite`: >= 25 frames/s, first frame <= 0.5 s
   (Self-Forcing reports ~17 fps for 1.3B on one H100).
`real`: the `lite` model (bf16) and the Wan 2.1 VAE's architecture with random weights at 512²; `tiny`: the tiny
model and the dry-run VAE on a 128² crop, to check the path on a CPU. Inputs are random latents and features
(speed does not depend on their values).
"""
from __future__ import annotations

import time

import torch

from benchmarks.gpu_common import finish, parser, peak_gib, reset_peak, settle, sync, timed
from models.dualforce import SamplerConfig, build_model, stream
from models.dualforce.sampler import default_cache_window
from models.wan_vae import WanVae

TRAINED_LATENT_FRAMES = 6  # 21 video frames


def _vae(size: str, device) -> WanVae:
    from diffusers import AutoencoderKLWan

    from models.dryrun_models import tiny_wan_vae_kwargs

    torch.manual_seed(0)
    vae = (AutoencoderKLWan() if size == "real" else AutoencoderKLWan(**tiny_wan_vae_kwargs())).to(device).eval()
    return WanVae(vae, torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std), "random")


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seconds", type=float, default=None, help="video to stream (default: 10 real, 2 tiny)")
    args = p.parse_args(argv)
    device, size = settle(args)
    from training.generate import StreamStats, stream_frames

    name, latent = ("lite", 64) if size == "real" else ("tiny", 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(name).to(device=device, dtype=dtype).eval()
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)
    reference = torch.randn(1, c.latent_channels, 1, latent, latent, generator=g, device=device)

    def features(latent_frames: int) -> torch.Tensor:
        return torch.randn(1, 4 * (latent_frames - 1) + 1, c.audio_dim, generator=g, device=device)

    # 1. the sampler over one training window, cached and recomputed
    window_audio = features(TRAINED_LATENT_FRAMES)
    rates = {}
    for use_cache in (True, False):
        cfg = SamplerConfig(steps=args.steps, use_cache=use_cache)
        seconds = timed(lambda: list(stream(model, reference, window_audio, cfg, torch.Generator(device=device))),
                        device, args.repeats, warmup=1)
        rates["cached" if use_cache else "recomputed"] = TRAINED_LATENT_FRAMES / seconds
    out = {"model": name, "steps": args.steps, "latent": [latent, latent],
           "sampler_latent_frames_per_s": rates, "cache_speedup": rates["cached"] / rates["recomputed"]}

    # 2. streaming video, bounded cache, decoded as it goes
    seconds = args.seconds or (10.0 if size == "real" else 2.0)
    latent_frames = int(seconds * 25) // 4 + 1
    window = default_cache_window(TRAINED_LATENT_FRAMES)
    cfg = SamplerConfig(steps=args.steps, cache_window=window, sink_frames=1)
    wan = _vae(size, device)
    audio = features(latent_frames)
    list(stream_frames(model, wan, reference, features(3), cfg, torch.Generator(device=device)))  # warm-up
    reset_peak(device)
    sync(device)
    stats = StreamStats()
    start = time.perf_counter()
    first = None
    frames = 0
    for chunk in stream_frames(model, wan, reference, audio, cfg, torch.Generator(device=device), stats):
        if first is None:
            first = time.perf_counter() - start
        frames += len(chunk)
    total = time.perf_counter() - start
    cache_bytes = [ch.cache_bytes for ch in stream(model, reference, features(2 * window + 4),
                                                   SamplerConfig(steps=1, cache_window=window, sink_frames=1),
                                                   torch.Generator(device=device))]
    out["streaming"] = {
        "video_frames": frames, "latent_frames": stats.latent_frames, "cache_window": window,
        "video_frames_per_s": frames / total, "first_frame_s": first,
        "sampling_share": stats.sampling_s / total, "decode_share": stats.decode_s / total,
        "peak_gib": peak_gib(device), "cache_bytes_full_window": cache_bytes[window],
        "cache_bytes_at_end": cache_bytes[-1], "real_time": frames / total >= 25,
    }
    return finish("gpu_streaming", args, device, size, out)


if __name__ == "__main__":
    main()
