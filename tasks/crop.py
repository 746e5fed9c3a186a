"""Step 2, crop: source clip -> 512x512 25 fps face video + 16 kHz mono wav of the same length.

Two streaming passes over the source, so memory does not grow with clip length:
1. at detection resolution: detect faces every `detect_every` frames, 68-point landmarks on every frame;
2. at source resolution: warp every frame with the smoothed LivePortrait crop and pipe it to the encoder.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import cv2
import numpy as np

from tasks.contract import AUDIO_SAMPLES_PER_FRAME, CROP_SIZE, FPS, SAMPLE_RATE
from tasks.crop_geometry import CropParams, crop_matrix, rect_from_landmarks, smooth_rects, transform_points
from tasks.errors import ClipRejected
from tasks.face_landmarks import FaceBox, get_landmarker
from tasks.media import MediaError, VideoWriter, iter_frames, probe, read_audio, write_wav

CROP_VIDEO = "crop.mp4"
CROP_AUDIO = "audio.wav"
CROP_LANDMARKS = "landmarks.npy"
CROP_INFO = "crop.json"
CROP_RECTS = "rects.npy"  # [T, 4] smoothed crop squares in source pixels: cx, cy, size, angle (rad)


@dataclass(frozen=True)
class CropConfig:
    params: CropParams = field(default_factory=CropParams)
    landmarker: str = "dlib"
    detect_every: int = 5  # frames (at 25 fps) between face detections
    detect_max_side: int = 640  # detection and landmarks run on frames downscaled to this
    smooth_sigma: float = 2.0  # frames; Gaussian smoothing of crop boxes over time
    min_face_px: float = 64.0  # median detected face size in source pixels
    min_face_ratio: float = 0.8  # detection frames that must contain a face
    second_face_ratio: float = 0.6  # a second face this large relative to the main one counts as dominant ...
    multi_face_frames: float = 0.3  # ... and in this share of detection frames the clip is rejected
    min_frames: int = 33  # shortest clip kept (one 4n+1 window of the default n=8)
    require_audio: bool = True
    av_tolerance_s: float = 0.2  # audio/video length difference accepted silently
    av_mismatch: Literal["trim", "reject"] = "trim"  # beyond tolerance: cut both to the shorter, or reject
    crf: int = 18


@dataclass
class CropResult:
    clip_dir: Path
    frames: int
    audio_samples: int
    source_frames: int
    source_audio_s: float
    trimmed_s: float  # seconds cut away to make audio and video agree
    median_face_px: float
    landmarker: str
    seconds: float

    @property
    def video(self) -> Path:
        return self.clip_dir / CROP_VIDEO

    @property
    def audio(self) -> Path:
        return self.clip_dir / CROP_AUDIO

    @property
    def landmarks(self) -> Path:
        return self.clip_dir / CROP_LANDMARKS


@dataclass
class _Track:
    landmarks: list[np.ndarray]
    det_frames: int = 0
    det_hits: int = 0
    multi_hits: int = 0
    face_sizes: list[float] = field(default_factory=list)


def _inside(face: FaceBox, region: FaceBox) -> float:
    """Share of `face` that lies inside `region` (manifest boxes are often whole crop regions, not faces)."""
    ix = max(0.0, min(face.x1, region.x1) - max(face.x0, region.x0))
    iy = max(0.0, min(face.y1, region.y1) - max(face.y0, region.y0))
    area = (face.x1 - face.x0) * (face.y1 - face.y0)
    return ix * iy / area if area > 0 else 0.0


def _pick(boxes: list[FaceBox], last: Optional[FaceBox], hint: Optional[FaceBox] = None) -> Optional[FaceBox]:
    """Follow the face we already track; else the one the manifest points at; else the largest."""
    if last is not None:
        return min(boxes, key=lambda b: float(np.linalg.norm(b.center - last.center)))
    if hint is not None:
        best = max(boxes, key=lambda b: (_inside(b, hint), b.size))
        return best if _inside(best, hint) > 0.5 else None
    return boxes[0]


def _track_faces(source: Path, cfg: CropConfig, max_frames: int, face_box: Optional[list[float]] = None) -> _Track:
    info = probe(source)
    s = min(1.0, cfg.detect_max_side / max(info.width, info.height))
    size = (max(2, int(round(info.width * s / 2)) * 2), max(2, int(round(info.height * s / 2)) * 2))
    sx, sy = size[0] / info.width, size[1] / info.height
    lm = get_landmarker(cfg.landmarker)
    hint = FaceBox(*face_box).scaled(s) if face_box else None
    track = _Track(landmarks=[])
    box: Optional[FaceBox] = None
    i = 0
    for chunk in iter_frames(source, fps=FPS, scale_to=size):
        for frame in chunk:
            if i >= max_frames:
                return track
            if i % cfg.detect_every == 0:
                boxes = lm.detect(frame)
                track.det_frames += 1
                picked = _pick(boxes, box, hint) if boxes else None
                if picked is not None:
                    box = picked
                    track.det_hits += 1
                    track.face_sizes.append(box.size / s)
                    others = [b for b in boxes if b is not box]
                    if others and max(b.size for b in others) >= cfg.second_face_ratio * box.size:
                        track.multi_hits += 1
            if box is None:
                track.landmarks.append(np.full((68, 2), np.nan, np.float32))
            else:
                pts = lm.landmarks(frame, box)
                track.landmarks.append(pts / np.array([sx, sy], np.float32))
            i += 1
    return track


def _fill_missing(landmarks: np.ndarray) -> np.ndarray:
    """Frames before the first detection take the first tracked landmarks."""
    ok = ~np.isnan(landmarks).any(axis=(1, 2))
    first = int(np.argmax(ok))
    out = landmarks.copy()
    out[:first] = landmarks[first]
    return out


def crop_clip(source: str | Path, out_dir: str | Path, cfg: CropConfig = CropConfig(),
              face_box: Optional[list[float]] = None) -> CropResult:
    """Crop one clip into `out_dir` (created); raises ClipRejected with a reason code.

    `face_box` (x0, y0, x1, y1 in source pixels, from the manifest) says which face to follow when several
    are visible; the clip is then not rejected for a second dominant face.
    """
    t0 = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    try:
        info = probe(source)
    except MediaError as exc:
        raise ClipRejected("corrupt", str(exc)) from exc
    if not info.has_video:
        raise ClipRejected("no_video", f"{source.name} has no video stream")
    if not info.has_audio and cfg.require_audio:
        raise ClipRejected("no_audio", f"{source.name} has no audio stream")

    try:
        audio = read_audio(source, SAMPLE_RATE) if info.has_audio else np.zeros(0, np.float32)
    except MediaError as exc:
        raise ClipRejected("corrupt", str(exc)) from exc
    source_frames_est = int(round(info.duration_s * FPS)) + FPS
    try:
        track = _track_faces(source, cfg, max_frames=source_frames_est, face_box=face_box)
    except MediaError as exc:
        raise ClipRejected("corrupt", str(exc)) from exc
    n_video = len(track.landmarks)
    audio_s = len(audio) / SAMPLE_RATE

    if n_video < cfg.min_frames:
        raise ClipRejected("too_short", f"{n_video} frames at {FPS} fps, need {cfg.min_frames}")
    if track.det_frames == 0 or track.det_hits / track.det_frames < cfg.min_face_ratio:
        raise ClipRejected("no_face", f"face found in {track.det_hits}/{track.det_frames} detection frames")
    if face_box is None and track.multi_hits / track.det_frames >= cfg.multi_face_frames:
        raise ClipRejected("multiple_faces", f"a second dominant face in {track.multi_hits}/{track.det_frames} detection frames")
    median_face = float(np.median(track.face_sizes))
    if median_face < cfg.min_face_px:
        raise ClipRejected("face_too_small", f"median face {median_face:.0f}px < {cfg.min_face_px:.0f}px")

    frames = n_video
    if info.has_audio:
        gap = abs(audio_s - n_video / FPS)
        if gap > cfg.av_tolerance_s and cfg.av_mismatch == "reject":
            raise ClipRejected("av_length_mismatch", f"audio {audio_s:.2f}s vs video {n_video / FPS:.2f}s")
        frames = min(n_video, len(audio) // AUDIO_SAMPLES_PER_FRAME)
        if frames < cfg.min_frames:
            raise ClipRejected("too_short", f"only {frames} frames have audio (audio {audio_s:.2f}s)")

    landmarks = _fill_missing(np.stack(track.landmarks[:frames]))
    rects = smooth_rects(np.stack([rect_from_landmarks(p, cfg.params) for p in landmarks]), cfg.smooth_sigma)
    mats = [crop_matrix(r, cfg.params.dsize) for r in rects]
    crop_landmarks = np.stack([transform_points(p, m) for p, m in zip(landmarks, mats)]).astype(np.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    d = cfg.params.dsize
    i = 0
    with VideoWriter(out_dir / CROP_VIDEO, d, d, fps=FPS, crf=cfg.crf) as writer:
        for chunk in iter_frames(source, fps=FPS):
            warped = []
            for frame in chunk:
                if i >= frames:
                    break
                warped.append(cv2.warpAffine(frame, mats[i], (d, d), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT))
                i += 1
            if warped:
                writer.write(np.stack(warped))
            if i >= frames:
                break
    if i != frames:
        (out_dir / CROP_VIDEO).unlink(missing_ok=True)
        raise ClipRejected("corrupt", f"second decode gave {i} frames, first gave {n_video}")

    n_audio = frames * AUDIO_SAMPLES_PER_FRAME
    if info.has_audio:
        write_wav(out_dir / CROP_AUDIO, audio[:n_audio])
    for name, array in ((CROP_LANDMARKS, crop_landmarks), (CROP_RECTS, rects.astype(np.float32))):
        tmp = out_dir / (name + ".tmp.npy")
        np.save(tmp, array, allow_pickle=False)
        tmp.replace(out_dir / name)
    result = CropResult(
        clip_dir=out_dir,
        frames=frames,
        audio_samples=n_audio if info.has_audio else 0,
        source_frames=n_video,
        source_audio_s=audio_s,
        trimmed_s=max(0.0, n_video / FPS - frames / FPS),
        median_face_px=median_face,
        landmarker=get_landmarker(cfg.landmarker).name,
        seconds=time.perf_counter() - t0,
    )
    # Only facts that depend on the input: no paths, no timings (the dir's checksum keys downstream steps).
    meta = {k: v for k, v in asdict(result).items() if k not in ("clip_dir", "seconds")}
    meta["params"] = asdict(cfg.params)
    meta["crop_size"] = CROP_SIZE
    tmpj = out_dir / (CROP_INFO + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=1))
    tmpj.replace(out_dir / CROP_INFO)
    return result
