"""Lip-sync scores LSE-D and LSE-C (Prajwal et al. 2020, Wav2Lip): SyncNet distances between audio and video
windows, searched over audio offsets, exactly as syncnet_python's SyncNetInstance.evaluate (and Wav2Lip's
evaluation/scores_LSE copy of it) computes them with vshift=15:

  one embedding per 5-frame video window and per 0.2 s MFCC window, for windows 0 .. T-6;
  dist[i, k] = || v_i - a_(i + k - 15) ||, k = 0..30, audio embeddings zero-padded beyond the clip;
  m[k] = mean_i dist[i, k];  LSE-D = min_k m[k];  LSE-C = median_k m[k] - min_k m[k];  offset = 15 - argmin m.

Frames are resized whole to 224x224 (syncnet_python's input size) and fed BGR, 0..255, as it reads them with
cv2. Its pipeline crops faces with its own S3FD detector first; we take the dataset's LivePortrait crops as
they are, which frame the face somewhat more loosely, so absolute numbers compare between our models but only
roughly with published ones.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.syncnet import MFCC_PER_VIDEO_FRAME, MFCC_STEPS, VIDEO_SIZE, WINDOW_FRAMES, SyncNet
from training.eval_metrics.mfcc import syncnet_mfcc
from training.eval_metrics.results import MetricResult, stopwatch

VSHIFT = 15  # offsets -15..15 video frames (Wav2Lip's evaluation setting)
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps


def window_count(num_frames: int, num_samples: int) -> int:
    """syncnet_python's windows: min(frames, samples // 640) - 5."""
    return min(num_frames, num_samples // SAMPLES_PER_FRAME) - WINDOW_FRAMES


def mfcc_windows(audio: np.ndarray, count: int) -> torch.Tensor:
    """[count, 1, 13, 20]: the 0.2 s of MFCCs starting at each of the first `count` video frames."""
    mfcc = torch.from_numpy(syncnet_mfcc(audio)).float()  # [13, M], M = 4 * frames of audio - 1
    if count < 1 or mfcc.shape[1] < (count - 1) * MFCC_PER_VIDEO_FRAME + MFCC_STEPS:
        raise ValueError(f"{len(audio)} audio samples hold no {count} SyncNet windows")
    starts = range(0, count * MFCC_PER_VIDEO_FRAME, MFCC_PER_VIDEO_FRAME)
    return torch.stack([mfcc[:, s: s + MFCC_STEPS] for s in starts])[:, None]


@torch.inference_mode()
def audio_embeddings(syncnet: SyncNet, audio: np.ndarray, count: int, batch_size: int = 64) -> torch.Tensor:
    """[count, D] embeddings of the audio windows at video frames 0 .. count-1."""
    device = next(syncnet.parameters()).device
    windows = mfcc_windows(audio, count)
    return torch.cat([syncnet.forward_audio(windows[b: b + batch_size].to(device)).float().cpu()
                      for b in range(0, count, batch_size)])


@torch.inference_mode()
def sync_embeddings(syncnet: SyncNet, frames: np.ndarray, audio: np.ndarray, batch_size: int = 20
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB frames [T, H, W, 3] at 25 fps + 16 kHz mono audio -> video and audio embeddings [N, D] each."""
    n = window_count(len(frames), len(audio))
    if n < 1:
        raise ValueError(f"lip sync needs at least {WINDOW_FRAMES + 1} frames with audio, got {len(frames)} frames "
                         f"and {len(audio) / SAMPLES_PER_FRAME:.1f} frames of audio")
    device = next(syncnet.parameters()).device
    bgr = np.stack([cv2.resize(f, (VIDEO_SIZE, VIDEO_SIZE), interpolation=cv2.INTER_LINEAR)[..., ::-1]
                    for f in frames[: n + WINDOW_FRAMES - 1]])  # [n + 4, 224, 224, 3]
    video = torch.from_numpy(np.ascontiguousarray(bgr)).permute(3, 0, 1, 2)  # [3, n + 4, 224, 224] uint8
    video_emb = []
    for start in range(0, n, batch_size):
        clips = torch.stack([video[:, i: i + WINDOW_FRAMES] for i in range(start, min(n, start + batch_size))])
        video_emb.append(syncnet.forward_video(clips.to(device).float()).float().cpu())  # [B, 3, 5, 224, 224] 0..255
    return torch.cat(video_emb), audio_embeddings(syncnet, audio, n)


def offset_distances(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int = VSHIFT) -> torch.Tensor:
    """[N, 2 * vshift + 1]: distance of video window i to audio window i + k - vshift (zeros beyond the clip)."""
    padded = F.pad(audio_emb, (0, 0, vshift, vshift))  # [N + 2 vshift, D]
    windows = padded.unfold(0, 2 * vshift + 1, 1)  # [N, D, 2 vshift + 1]
    return torch.linalg.vector_norm(video_emb[:, :, None] - windows + 1e-6, dim=1)  # pairwise_distance's eps


def sync_scores(dists: torch.Tensor, vshift: int = VSHIFT) -> dict[str, float]:
    """LSE-D, LSE-C and the offset (video frames; positive: audio leads) from offset_distances."""
    mean = dists.mean(0)  # [2 vshift + 1]
    min_dist, best = torch.min(mean, 0)
    return {"lse_d": float(min_dist), "lse_c": float(torch.median(mean) - min_dist), "offset": float(vshift - int(best)),
            "best_index": int(best)}


def lip_sync(frames: np.ndarray, audio: np.ndarray, syncnet: Optional[SyncNet], vshift: int = VSHIFT
             ) -> list[MetricResult]:
    """[lse_d, lse_c] of a clip with its driving audio (lower LSE-D and higher LSE-C = better sync).
    Series: per window, the distance at the chosen offset and syncnet_python's framewise confidence."""
    names = ("lse_d", "lse_c")
    if syncnet is None:
        return [MetricResult.skipped(n, "no SyncNet weights given (pass --syncnet syncnet_v2.model)") for n in names]
    if window_count(len(frames), len(audio)) < 1:
        reason = f"too short for SyncNet's 5-frame windows: {len(frames)} frames, {len(audio)} audio samples"
        return [MetricResult.skipped(n, reason) for n in names]
    with stopwatch() as watch:
        dists = offset_distances(*sync_embeddings(syncnet, frames, audio), vshift=vshift)
        scores = sync_scores(dists, vshift)
    at_best = dists[:, scores["best_index"]]
    median = float(torch.median(dists.mean(0)))
    details = {"offset_frames": scores["offset"], "windows": float(len(dists))}
    return [
        MetricResult(names[0], scores["lse_d"], series=at_best.tolist(), seconds=watch.seconds, details=details),
        MetricResult(names[1], scores["lse_c"], series=(median - at_best).tolist(), seconds=watch.seconds, details=details),
    ]
