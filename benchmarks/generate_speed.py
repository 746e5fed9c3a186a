"""Generation speed: `dualforce generate`'s streaming path (sampler + VAE decode + H.264 with the speech) against the
sampler alone, with the tiny model and the dry-run extractors on this machine.

    python -m benchmarks.generate_speed [--seconds 2 --steps 4 --crop 512]

Prints JSON: latent frames/s end to end, the sampler-alone rate in the same run (baseline: the same model, the same
speech features and seed, no decode or encode), the decode share of the streamed time and the seconds spent before
the first latent frame (models loaded, face cropped and encoded, HuBERT).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--crop", type=int, default=512)
    args = p.parse_args()

    from models.dualforce import DualForce
    from models.dualforce.config import get_config
    from models.dualforce.sampler import SamplerConfig, stream
    from models.hubert_features import load_hubert
    from tasks.feature_models import dryrun_models
    from tasks.media import read_frames
    from training.generate import GenerateOptions, generate_video, speech_features, speech_for_frames

    models = dryrun_models()
    work = Path(tempfile.mkdtemp(prefix="generate-speed-"))
    torch.manual_seed(0)
    model = DualForce(get_config("tiny", audio_dim=32))
    model.save_pretrained(work / "model", {"training_data": [{"profile": "talking_head", "crop_size": args.crop,
                                                              "extractors": {"hubert": models.hubert,
                                                                             "wan_vae": models.wan_vae}}]})
    cv2.imwrite(str(work / "face.png"), cv2.cvtColor(read_frames(SAMPLES / "sun.mp4")[0], cv2.COLOR_RGB2BGR))
    result = generate_video(work / "model", work / "face.png", SAMPLES / "sun.mp4", work / "out.mp4",
                            GenerateOptions(seconds=args.seconds, steps=args.steps, progress=False))

    audio, frames = speech_for_frames(SAMPLES / "sun.mp4", args.seconds)
    features = torch.from_numpy(speech_features(audio, frames, load_hubert(models.hubert), (-1,)).astype(np.float32))
    hw = args.crop // 8
    start = time.perf_counter()
    latent_frames = sum(c.video_latents.shape[2] for c in stream(
        model, torch.zeros(1, 16, 1, hw, hw), features[None], SamplerConfig(steps=args.steps), torch.Generator()))
    sampler_s = time.perf_counter() - start
    streamed = result.sampling_s + result.decode_s
    print(json.dumps({
        "frames": result.frames, "latent_frames": result.latent_frames, "crop": args.crop, "steps": args.steps,
        "latent_frames_per_s": round(result.latent_frames_per_s, 3),
        "sampler_alone_latent_frames_per_s": round(latent_frames / sampler_s, 3),
        "ratio_to_sampler_alone": round((latent_frames / sampler_s) / max(result.latent_frames_per_s, 1e-9), 2),
        "decode_share": round(result.decode_s / streamed, 3), "prepare_s": round(result.prepare_s, 2),
        "total_s": round(result.seconds, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
