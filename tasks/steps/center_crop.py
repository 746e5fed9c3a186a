"""Step 2 of the general profile, centre crop: source clip -> 512x512, 25 fps video of the frame's centre.

General video (Panda-70M, VoxCeleb2) trains the video DiT alone in the pretrain stage; it has no face to follow
and no speech to align, so this crop keeps the largest centred square of the frame, scaled to 512 (the same
picture as scaling the shorter side to 512 and cutting the centre out), resampled to 25 fps (output frame i
is the source frame nearest time i/25), in one ffmpeg run: no frame passes through Python. Sideways phone
clips come out upright: ffmpeg's decoder applies the display matrix and `probe` reports the displayed size,
as for the face crop.

It writes the face crop's file names (crop.mp4, crop.json with `frames` and `segments`), so the VAE step
and the shard writer read either crop unchanged. No wav, no landmarks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from datasets_manifest.schema import ClipRow
from tasks.contract import CROP_SIZE, FPS
from tasks.errors import ClipRejected
from tasks.media import MediaError, encode_filtered, square_scale
from tasks.step_store import fingerprint
from tasks.steps.crop import CROP_VIDEO, probe_video, unreadable, write_crop_info
from tasks.steps.download import DownloadStep, downloaded_video

PROFILE = "general"  # crop.json's `profile`: which preprocess profile made this crop
MODE = "center"  # crop.json's `mode` (the face crop's are "static" and "follow")


@dataclass(frozen=True)
class CenterCropConfig:
    dsize: int = CROP_SIZE
    min_frames: int = 33  # shortest clip kept: one 4n+1 window of the default n=8, as the face crop's
    crf: int = 18


@dataclass
class CenterCropResult:
    clip_dir: Path
    frames: int
    source_size: tuple[int, int]  # displayed width, height
    box: tuple[int, int, int]  # x, y, side of the square cut from the displayed source frame
    seconds: float

    @property
    def video(self) -> Path:
        return self.clip_dir / CROP_VIDEO


def center_box(width: int, height: int) -> tuple[int, int, int]:
    """The largest centred square of a width x height frame as (x, y, side). x and y are rounded down to even
    numbers: ffmpeg's crop does that on yuv420p's half-size chroma grid, so the box recorded is the one used."""
    side = min(width, height)
    return (width - side) // 4 * 2, (height - side) // 4 * 2, side


def center_crop_clip(source: str | Path, out_dir: str | Path,
                     cfg: CenterCropConfig = CenterCropConfig()) -> CenterCropResult:
    """Centre-crop one clip into `out_dir` (created): crop.mp4 + crop.json. Raises ClipRejected: `corrupt`
    (unreadable), `corrupt_stream` (damaged data concealed by the decoder; the detail says where),
    `no_video`, `too_short` (fewer than `cfg.min_frames` frames at 25 fps)."""
    t0 = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    info = probe_video(source)
    x, y, side = center_box(info.width, info.height)
    graph = f"[0:v]fps={FPS},crop={side}:{side}:{x}:{y},{square_scale(side, cfg.dsize)},setsar=1,format=yuv420p[out]"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        frames = encode_filtered(source, out_dir / CROP_VIDEO, graph, FPS, cfg.crf, "centre crop")
    except MediaError as exc:
        raise unreadable(exc) from exc
    if frames < cfg.min_frames:
        (out_dir / CROP_VIDEO).unlink(missing_ok=True)
        raise ClipRejected("too_short", f"{frames} frames at {FPS} fps, need {cfg.min_frames}")
    write_crop_info(out_dir, {
        "profile": PROFILE,
        "mode": MODE,
        "frames": frames,
        "segments": [[0, frames]],  # no shot-cut or face rules: windows may start anywhere
        "crop_size": cfg.dsize,
        "fps": FPS,
        "source_size": [info.width, info.height],
        "source_rotation": info.rotation,
        "box": [x, y, side],
    })
    return CenterCropResult(out_dir, frames, (info.width, info.height), (x, y, side), time.perf_counter() - t0)


@dataclass
class CenterCropStep:
    """Step 2 of the general profile: the frame's centre, no face, no audio. Same file names as CropStep's output,
    so the VAE step (crop_step="center_crop") and the shard writer read it."""

    config: CenterCropConfig = field(default_factory=CenterCropConfig)
    name: ClassVar[str] = "center_crop"
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = (DownloadStep.name,)

    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        r = center_crop_clip(downloaded_video(inputs), out_dir, self.config)
        return {"frames": r.frames, "source_size": list(r.source_size), "box": list(r.box)}
