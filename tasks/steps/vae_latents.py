"""Step 6: Wan VAE latents of the 512x512 crop, in 4n+1-frame windows, plus a reference-image latent.

Windows. With `window_frames = 4n+1`, windows start every `stride` frames (default: back to back) and each
is encoded on its own, from its first frame, so window k's latent [16, n+1, H/8, W/8] is what the VAE gives
for that window as a video (first latent frame = its first video frame alone), the form a training sample
needs. Frames after the last whole window are dropped and counted. With `window_frames=None` the whole clip
is one stream, trimmed to the largest 4n+1 <= T.

Memory stays bounded: frames arrive as an iterator of chunks, decoded on a CPU thread (tasks/prefetch.py) while
the VAE encodes; `batch_windows` windows are encoded as one batch (one group of 4 frames of each at a time,
models/wan_vae.py), so at most about 3 x batch_windows windows of frames are held (in flight, being batched, being
encoded). A window's latent does not depend on its batch (tested). The reference latent is frame 0 encoded as a
1-frame video. Everything is stored float16.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch

from datasets_manifest.schema import ClipRow
from models.wan_vae import TIME_STRIDE, CausalStreamEncoder, WanVae
from tasks import contract, feature_models, windows
from tasks.errors import ClipRejected
from tasks.feature_models import FeatureModels
from tasks.media import iter_frames
from tasks.prefetch import prefetched
from tasks.step_store import fingerprint
from tasks.steps.crop import CROP_VIDEO, CropStep, crop_segments
from tasks.steps.shard import ShardConfig


@dataclass(frozen=True)
class VaeLatentConfig:
    window_frames: Optional[int] = contract.WINDOW_FRAMES  # 4n+1 video frames per window; None = whole clip as one stream
    stride: Optional[int] = None  # frames between window starts; None = window_frames (no overlap)
    batch_windows: int = 4  # windows encoded together (a GPU's batch); 1: one at a time

    def __post_init__(self):
        w = self.window_frames
        if w is not None and (w < 1 or (w - 1) % TIME_STRIDE):
            raise ValueError(f"window_frames must be 4n+1, got {w}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.batch_windows < 1:
            raise ValueError(f"batch_windows must be >= 1, got {self.batch_windows}")


@dataclass
class VaeLatents:
    latents: np.ndarray  # [W, 16, n+1, h, w] float16, normalised
    window_starts: np.ndarray  # [W] int64 first video frame of each window
    window_frames: int  # 4n+1
    reference_latent: np.ndarray  # [16, 1, h, w] float16, frame 0 as a 1-frame video
    num_frames: int  # T frames seen
    dropped_tail_frames: int  # frames after the last whole window
    meta: dict = field(default_factory=dict)


def _iter_chunks(frames: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
        yield frames
    else:
        yield from frames


def encode_windows(wan: WanVae, clips: Sequence[np.ndarray]) -> torch.Tensor:
    """Equal-length clips, each [t, H, W, 3] uint8 and encoded as a video of its own, in one batch ->
    [B, C, n+1, h, w]."""
    enc = CausalStreamEncoder(wan)
    parts = enc.push(np.stack(clips))
    enc.close()
    return torch.cat(parts, dim=2)


def encode_reference(wan: WanVae, frame: np.ndarray) -> np.ndarray:
    """One frame [H, W, 3] uint8 -> [16, 1, h, w] float16."""
    return encode_windows(wan, [frame[None]])[0].cpu().numpy().astype(np.float16)


def encode_clip(
    frames: np.ndarray | Iterable[np.ndarray],
    wan: WanVae,
    cfg: VaeLatentConfig = VaeLatentConfig(),
    segments: Optional[Sequence[tuple[int, int]]] = None,
) -> VaeLatents:
    """uint8 RGB frames [T, H, W, 3] (or an iterator of chunks) -> windowed latents + reference latent.

    Windows start where `tasks.windows` puts them (inside each `[start, end)` of `segments`, when given), the
    same starts the shard step cuts its video from."""
    meta = {"untrained_dryrun": wan.untrained_dryrun, "vae": wan.source, "window_frames": cfg.window_frames,
            "normalised": "(mean - latents_mean) / latents_std", "posterior": "mean"}
    first: Optional[np.ndarray] = None  # frame 0, encoded after the streams close (they share the VAE cache)
    total = 0
    windows_out: list[np.ndarray] = []  # float16 as soon as encoded: a long clip holds one compact copy
    starts: list[int] = []
    if cfg.window_frames is None:  # whole clip, one causal stream
        enc = CausalStreamEncoder(wan)
        parts: list[torch.Tensor] = []
        for chunk in _iter_chunks(frames):
            if first is None and len(chunk):
                first = chunk[0].copy()
            total += len(chunk)
            parts.extend(enc.push(chunk))
        dropped = enc.close()
        if not parts:
            raise ClipRejected("too_short", "no frames to encode")
        windows_out.append(torch.cat(parts, dim=2)[0].cpu().numpy().astype(np.float16))
        starts.append(0)
        window_frames = total - dropped
    else:
        window_frames = cfg.window_frames

        def counted(chunks):  # frame 0 and the frame count come from the stream the windows are cut from
            nonlocal first, total
            for chunk in _iter_chunks(chunks):
                if first is None and len(chunk):
                    first = chunk[0].copy()
                total += len(chunk)
                yield chunk

        chunks = counted(frames)
        wanted = windows.iter_window_starts(window_frames, cfg.stride, segments=segments)
        batch: list[np.ndarray] = []

        def encode_batch() -> None:
            windows_out.extend(encode_windows(wan, batch).cpu().numpy().astype(np.float16))
            batch.clear()

        cut = prefetched(windows.iter_windows(chunks, wanted, window_frames), depth=cfg.batch_windows)
        with contextlib.closing(cut):
            for start, clip in cut:
                batch.append(clip)
                starts.append(start)
                if len(batch) == cfg.batch_windows:
                    encode_batch()
        if batch:
            encode_batch()
        for _ in chunks:  # drain: the count of frames after the last window
            pass
        if not windows_out:
            raise ClipRejected("too_short", f"{total} frames, fewer than one {window_frames}-frame window")
        dropped = total - (starts[-1] + window_frames)
    reference = encode_reference(wan, first)
    latents = np.stack(windows_out)  # [W, C, n+1, h, w] float16
    return VaeLatents(latents, np.asarray(starts, np.int64), window_frames, reference, total, dropped, meta)


def save_vae_latents(path: str | Path, result: VaeLatents) -> Path:
    """npz (no pickle; meta as a JSON string), temp file + rename."""
    import json
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, latents=result.latents, window_starts=result.window_starts,
             reference_latent=result.reference_latent,
             info_json=np.array(json.dumps({"window_frames": result.window_frames, "num_frames": result.num_frames,
                                            "dropped_tail_frames": result.dropped_tail_frames,
                                            "meta": result.meta}, sort_keys=True)))
    os.replace(tmp, path)
    return path


def load_vae_latents(path: str | Path) -> VaeLatents:
    import json

    with np.load(path, allow_pickle=False) as z:
        info = json.loads(str(z["info_json"]))
        return VaeLatents(z["latents"], z["window_starts"], info["window_frames"], z["reference_latent"],
                          info["num_frames"], info["dropped_tail_frames"], info["meta"])


VAE_FILE = "vae_latents.npz"


@dataclass
class VaeLatentsStep:
    """Step 6: Wan VAE latents of every training window (4n+1 -> n+1 frames) and a reference latent."""

    models: FeatureModels
    windows: ShardConfig = field(default_factory=ShardConfig)
    crop_step: str = CropStep.name  # whose crop.mp4 it encodes: the face crop, or "center_crop" (general profile)
    weights: ClassVar[str] = "wan_vae"  # the ModelWeights field naming the model it loads
    name: ClassVar[str] = "vae_latents"
    version: ClassVar[str] = "2"  # 2: windows inside the crop's stable segments

    @property
    def requires(self) -> tuple[str, ...]:
        # The upstream step's name is part of the cache key (step_runner.step_key), so the fingerprint need not
        # name it: a talking-head run's key is what it was before crop_step existed.
        return (self.crop_step,)

    def fingerprint(self) -> str:
        return fingerprint(self.models.wan_vae, self.models.wan_vae_subfolder, self.windows.window_frames, self.windows.step)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        crop = inputs[self.crop_step]
        cfg = VaeLatentConfig(window_frames=self.windows.window_frames, stride=self.windows.step)
        latents = encode_clip(iter_frames(crop / CROP_VIDEO, chunk=self.windows.window_frames),
                              feature_models.wan_vae(self.models), cfg, segments=crop_segments(crop))
        save_vae_latents(out_dir / VAE_FILE, latents)
        info = {"windows": int(len(latents.window_starts)), "untrained_dryrun": bool(latents.meta.get("untrained_dryrun")),
                "vae": latents.meta.get("vae")}
        if self.models.wan_vae_subfolder:  # generation loads the same VAE (shard_inputs.extractor_record)
            info["vae_subfolder"] = self.models.wan_vae_subfolder
        return info
