"""Each extractor inside its preprocess step against the bare model forward, on the same device at the same batch.

    python -m benchmarks.gpu_extractors [--size real|tiny --seconds 13 --json OUT]

The input is a real 512² sample clip (samples/more/lp_d12.mp4, looped to `--seconds`), written as the crop step
writes crop.mp4 + audio.wav. Per extractor: items/s through the step's own function (decode on a CPU thread,
batching, bf16 autocast on CUDA for HuBERT and the motion extractor, fp32 for the Wan VAE) and through the bare
model on inputs already on the device, in the same precision; the goal is step / bare >= 0.9 on a GPU.
- motion: `extract_motion_from_video` (batch 64) vs the extractor's forward on a [64, 3, 256, 256] batch;
- HuBERT: `audio_features_for_clip` vs the model's forward over the same 16 kHz audio (seconds of audio / s);
- Wan VAE: `encode_clip` (81-frame windows, 4 a batch) vs `encode_windows` on 4 windows already decoded
  (video frames / s); this is also the VAE encode rate.
`real`: the real architectures (LivePortrait's motion extractor, HuBERT large, the Wan 2.1 VAE) with random
weights (speed does not depend on the values); `tiny`: the dry-run's small models, to check the path on a CPU.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_common import SAMPLES, finish, parser, settle, timed
from models.precision import extractor_autocast


def _clip(work: Path, seconds: float) -> tuple[Path, Path]:
    from tasks.media import run_ffmpeg

    mp4, wav = work / "crop.mp4", work / "audio.wav"
    run_ffmpeg(["-y", "-stream_loop", "-1", "-i", str(SAMPLES / "more" / "lp_d12.mp4"), "-t", str(seconds),
                "-r", "25", "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", "-an", str(mp4)], "clip")
    run_ffmpeg(["-y", "-stream_loop", "-1", "-i", str(SAMPLES / "sun.mp4"), "-t", str(seconds), "-vn", "-ac", "1",
                "-ar", "16000", str(wav)], "audio")
    return mp4, wav


def _models(size: str, device: torch.device):
    """(motion extractor, HuBERT wrapper, Wan VAE wrapper) on the device."""
    from models.hubert_features import HubertFeatureModel
    from models.motion_extractor import MotionExtractor, MotionExtractorConfig
    from models.wan_vae import WanVae

    if size == "tiny":
        from tasks import feature_models as fm

        models = fm.dryrun_models()
        models = type(models)(**{**models.__dict__, "device": str(device)})
        return fm.motion_extractor(models), fm.hubert(models), fm.wan_vae(models)
    from diffusers import AutoencoderKLWan
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    motion = MotionExtractor(MotionExtractorConfig()).to(device).eval()
    large = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    hubert = HubertFeatureModel(HubertModel(large).to(device).eval(), do_normalize=True, source="random-large")
    vae = AutoencoderKLWan().to(device).eval()  # the Wan 2.1 VAE's default config
    wan = WanVae(vae, torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std), "random-wan2.1")
    return motion, hubert, wan


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=None, help="clip length (default: 13 real, 4 tiny)")
    args = p.parse_args(argv)
    device, size = settle(args)
    from models.hubert_features import HubertLayers
    from tasks.media import iter_frames, read_audio, read_frames
    from tasks.steps.audio_features import AudioFeatureConfig, audio_features_for_clip
    from tasks.steps.motion import extract_motion_from_video, prepare_frames
    from tasks.steps.vae_latents import VaeLatentConfig, encode_clip, encode_windows

    seconds = args.seconds or (13.0 if size == "real" else 4.0)
    window, batch_windows = (81, 4) if size == "real" else (9, 4)
    reps = max(1, args.repeats // 2)
    work = Path(tempfile.mkdtemp(prefix="gpu-extractors-"))
    mp4, wav = _clip(work, seconds)
    frames = read_frames(mp4)
    T = len(frames)
    motion, hubert, wan = _models(size, device)
    out = {"frames": T, "seconds": seconds}

    # motion extractor
    step = timed(lambda: extract_motion_from_video(mp4, motion, batch_size=64, device=device), device, reps)
    x = prepare_frames(frames[:64]).to(device)

    def bare_motion():
        with torch.inference_mode(), extractor_autocast(device):
            motion(x)
    bare = timed(bare_motion, device, reps)
    out["motion"] = {"step_frames_per_s": T / step, "bare_frames_per_s": len(x) / bare,
                     "step_over_bare": (T / step) / (len(x) / bare)}

    # HuBERT
    cfg = AudioFeatureConfig(layers=HubertLayers((-1,)))
    step = timed(lambda: audio_features_for_clip(wav, T, hubert, cfg, device), device, reps)
    audio = torch.from_numpy(read_audio(wav).astype(np.float32))[None].to(device)

    def bare_hubert():
        with torch.inference_mode(), extractor_autocast(device):
            hubert.model(audio)
    bare = timed(bare_hubert, device, reps)
    audio_s = audio.shape[1] / 16000
    out["hubert"] = {"step_audio_s_per_s": audio_s / step, "bare_audio_s_per_s": audio_s / bare,
                     "step_over_bare": bare / step}

    # Wan VAE
    windows = [frames[i * window:(i + 1) * window] for i in range(min(batch_windows, T // window))]
    vcfg = VaeLatentConfig(window_frames=window, batch_windows=batch_windows)
    step = timed(lambda: encode_clip(iter_frames(mp4, chunk=window), wan, vcfg), device, reps)
    encoded = (T // window) * window
    bare = timed(lambda: encode_windows(wan, windows), device, reps)
    out["wan_vae"] = {"window_frames": window, "batch_windows": batch_windows,
                      "step_frames_per_s": encoded / step, "bare_frames_per_s": len(windows) * window / bare,
                      "step_over_bare": (encoded / step) / (len(windows) * window / bare)}
    return finish("gpu_extractors", args, device, size, out)


if __name__ == "__main__":
    main()
