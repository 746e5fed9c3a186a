"""Step 5: HuBERT features aligned to video frames, exactly T rows, row i = video frame i.

Alignment. Video frame i owns audio samples [640 i, 640 (i + 1)) (16 kHz / 25 fps). The audio is first fitted
to T * 640 samples: longer audio is trimmed at the end; shorter audio is zero-padded at the end, the padded
length is reported and the rows whose 640 samples are not all real audio are False in `valid_rows` (status
"padded", or "av_length_mismatch" when more than `max_pad_frames` frames are padded). Then 40 samples of
zeros go on each side: with HuBERT's 400-sample field and 320-sample hop that gives exactly 2T features,
features 2i and 2i+1 centred at 640 i + 160 and 640 i + 480 (mean 640 i + 320, the centre of frame i).
Pairs are averaged (2:1 pooling) to T rows.

No audio (None / empty) gives status "no_audio" and no features; audio whose RMS is below
`silence_rms` gives status "silent" (features are still computed, the flag says they are of silence).
`require_usable` turns those statuses into ClipRejected for the flow's ledger.

Long audio. The transformer attends over the whole input, so cost grows with length squared. Audio longer
than `chunk_seconds` is processed in chunks of whole 320-sample hops, each with `context_seconds` of real
audio on both sides that is run through the model and then discarded. The conv front end is local except
for HuBERT base's GroupNorm over time, whose statistics are computed over the whole utterance first (in
bounded blocks) and frozen while the chunks run, so chunk conv features equal the unchunked ones exactly;
the transformer output differs from full-context output only through the missing far context (tests
measure it). Chunks start on feature boundaries, so the
result does not depend on where the clip starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

from datasets_manifest.schema import ClipRow
from models.hubert_features import HOP, RECEPTIVE_FIELD, HubertFeatureModel, HubertLayers, num_features
from models.precision import extractor_precision
from tasks import feature_models
from tasks.contract import AUDIO_SAMPLES_PER_FRAME, SAMPLE_RATE
from tasks.errors import ClipRejected
from tasks.feature_models import FeatureModels
from tasks.step_store import fingerprint, save_npy
from tasks.steps.crop import CROP_AUDIO, CropStep, crop_frames

CHUNK_BATCH = 4  # long clips' equal-length chunks per HuBERT forward (a GPU's batch; memory ~ 4 x 34 s of audio)
EDGE_PAD = (RECEPTIVE_FIELD - HOP) // 2 + (AUDIO_SAMPLES_PER_FRAME // 2 - HOP) // 2  # 40 + 0 = 40 samples a side
assert num_features(AUDIO_SAMPLES_PER_FRAME + 2 * EDGE_PAD) == 2


@dataclass(frozen=True)
class AudioFeatureConfig:
    layers: HubertLayers = HubertLayers()
    chunk_seconds: float = 30.0  # process longer audio in chunks of this length
    context_seconds: float = 2.0  # extra audio each side of a chunk, discarded after the model
    silence_rms: float = 1e-4  # ~ -80 dBFS
    max_pad_frames: int = 2  # more padding than this is an A/V length mismatch, not an edge effect
    reject_silent: bool = True  # require_usable rejects silent clips


@dataclass
class AudioFeatures:
    features: Optional[np.ndarray]  # [T, D] float16, or None when there is no audio
    num_frames: int
    status: str  # "ok" | "padded" | "av_length_mismatch" | "silent" | "no_audio"
    valid_rows: np.ndarray  # [T] bool, row i's 640 samples are all real audio
    pad_samples: int = 0
    trim_samples: int = 0
    rms: float = 0.0
    meta: dict = field(default_factory=dict)


def fit_audio(audio: np.ndarray, num_frames: int) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Trim or zero-pad at the end to num_frames * 640 samples; returns (audio, pad, trim, valid_rows)."""
    target = num_frames * AUDIO_SAMPLES_PER_FRAME
    n = len(audio)
    if n >= target:
        fitted, pad, trim = audio[:target], 0, n - target
    else:
        fitted, pad, trim = np.concatenate([audio, np.zeros(target - n, np.float32)]), target - n, 0
    ends = (np.arange(num_frames) + 1) * AUDIO_SAMPLES_PER_FRAME
    return fitted.astype(np.float32, copy=False), pad, trim, ends <= n


def _normalise(audio: np.ndarray, real: int) -> np.ndarray:
    """Zero-mean unit-variance over the real samples; padding stays 0 (as Wav2Vec2FeatureExtractor does)."""
    out = np.zeros_like(audio)
    seg = audio[:real]
    out[:real] = (seg - seg.mean()) / np.sqrt(seg.var() + 1e-7)
    return out


def hubert_50hz(audio_padded: np.ndarray, model: HubertFeatureModel, cfg: AudioFeatureConfig,
                device: torch.device, bf16: bool = True) -> np.ndarray:
    """[L] samples -> [num_features(L), D] float32, chunked along whole hops when long; consecutive chunks of
    equal length (all but the first and last) go through HuBERT as one batch of up to CHUNK_BATCH."""
    total = num_features(len(audio_padded))
    chunk = max(1, int(round(cfg.chunk_seconds * SAMPLE_RATE / HOP)))
    ctx = int(round(cfg.context_seconds * SAMPLE_RATE / HOP))
    if total <= chunk:
        return model.hidden_states(audio_padded, cfg.layers, device, bf16)
    pieces = []  # (segment samples, rows of its features to keep)
    for a in range(0, total, chunk):
        b = min(a + chunk, total)
        a0, b0 = max(0, a - ctx), min(total, b + ctx)
        seg = audio_padded[a0 * HOP: (b0 - 1) * HOP + RECEPTIVE_FIELD]  # exactly b0 - a0 features
        pieces.append((seg, slice(a - a0, b - a0)))
    parts = []
    with model.utterance_front_end_norm(audio_padded, device):
        i = 0
        while i < len(pieces):
            j = i + 1
            while j < len(pieces) and j - i < CHUNK_BATCH and len(pieces[j][0]) == len(pieces[i][0]):
                j += 1
            feats = model.hidden_states(np.stack([seg for seg, _ in pieces[i:j]]), cfg.layers, device, bf16)
            parts.extend(f[keep] for f, (_, keep) in zip(feats, pieces[i:j]))
            i = j
    return np.concatenate(parts)


def extract_audio_features(
    audio: Optional[np.ndarray],
    num_frames: int,
    model: HubertFeatureModel,
    cfg: AudioFeatureConfig = AudioFeatureConfig(),
    device: str | torch.device | None = None,
    bf16: bool = True,
) -> AudioFeatures:
    """16 kHz mono float audio + T video frames -> exactly T rows of HuBERT features (see module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    dev = torch.device(device) if device is not None else next(model.model.parameters()).device
    meta = {"untrained_dryrun": model.untrained_dryrun, "hubert": model.source,
            "layers": list(model.resolve(cfg.layers)), "audio_dim": model.hidden_size,
            "precision": extractor_precision(dev, bf16)}
    if audio is None or len(audio) == 0:
        return AudioFeatures(None, num_frames, "no_audio", np.zeros(num_frames, bool), meta=meta)
    audio = np.asarray(audio, np.float32).reshape(-1)
    if not np.isfinite(audio).all():
        raise ValueError("audio holds NaN or inf")
    real_len = min(len(audio), num_frames * AUDIO_SAMPLES_PER_FRAME)
    fitted, pad, trim, valid = fit_audio(audio, num_frames)
    rms = float(np.sqrt(np.mean(np.square(fitted[:real_len], dtype=np.float64))))
    if model.do_normalize:
        fitted = _normalise(fitted, real_len)
    padded = np.pad(fitted, (EDGE_PAD, EDGE_PAD))
    f50 = hubert_50hz(padded, model, cfg, dev, bf16)  # [2T, D]
    assert f50.shape[0] == 2 * num_frames, (f50.shape, num_frames)
    f25 = f50.reshape(num_frames, 2, -1).mean(1)  # [T, D]
    if rms < cfg.silence_rms:
        status = "silent"
    elif pad > cfg.max_pad_frames * AUDIO_SAMPLES_PER_FRAME:
        status = "av_length_mismatch"
    elif pad:
        status = "padded"
    else:
        status = "ok"
    return AudioFeatures(f25.astype(np.float16), num_frames, status, valid, pad, trim, rms, meta)


def require_usable(result: AudioFeatures, cfg: AudioFeatureConfig = AudioFeatureConfig()) -> np.ndarray:
    """The [T, D] float16 features, or ClipRejected with a ledger reason code."""
    if result.status == "no_audio" or result.features is None:
        raise ClipRejected("no_audio", "clip has no audio; HuBERT conditioning needs speech")
    if result.status == "silent" and cfg.reject_silent:
        raise ClipRejected("silent_audio", f"audio RMS {result.rms:.2e} below {cfg.silence_rms:.0e}")
    if result.status == "av_length_mismatch":
        raise ClipRejected("av_length_mismatch",
                           f"audio {result.pad_samples} samples ({result.pad_samples / AUDIO_SAMPLES_PER_FRAME:.1f} "
                           f"frames) shorter than the video's {result.num_frames} frames")
    return result.features


def audio_features_for_clip(
    wav_path: Optional[str | Path],
    num_frames: int,
    model: HubertFeatureModel,
    cfg: AudioFeatureConfig = AudioFeatureConfig(),
    device: str | torch.device | None = None,
    bf16: bool = True,
) -> AudioFeatures:
    """Read the crop step's audio.wav (None or a missing file means no audio) and extract aligned features."""
    from tasks.media import read_audio

    audio = None
    if wav_path is not None and Path(wav_path).is_file():
        audio = read_audio(wav_path, SAMPLE_RATE)
    return extract_audio_features(audio, num_frames, model, cfg, device, bf16)


AUDIO_FEATURES_FILE = "audio_features.npy"


@dataclass
class AudioFeaturesStep:
    """Step 5: HuBERT features pooled to 25 fps, exactly one row per video frame."""

    models: FeatureModels
    config: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    weights: ClassVar[str] = "hubert"  # the ModelWeights field naming the model it loads
    name: ClassVar[str] = "audio_features"
    version: ClassVar[str] = "2"  # 2: the last layer is the model's normalised output (HuBERT-large's final LayerNorm)
    requires: ClassVar[tuple[str, ...]] = (CropStep.name,)

    def fingerprint(self) -> str:
        return fingerprint(self.models.hubert, self.models.hubert_layers, self.config,
                           *feature_models.precision_tag(self.models))

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        import json

        crop = inputs[CropStep.name]
        result = audio_features_for_clip(crop / CROP_AUDIO, crop_frames(crop), feature_models.hubert(self.models),
                                         self.config, feature_models._device(self.models), bf16=self.models.bf16)
        features = require_usable(result, self.config)
        save_npy(out_dir / AUDIO_FEATURES_FILE, features)
        info = {"status": result.status, "audio_dim": int(features.shape[1]), "rms": round(result.rms, 6),
                "pad_samples": result.pad_samples, "untrained_dryrun": bool(result.meta.get("untrained_dryrun")),
                "hubert": result.meta.get("hubert"), "layers": result.meta.get("layers")}
        (out_dir / "audio_features.json").write_text(json.dumps(info, sort_keys=True))
        return info
