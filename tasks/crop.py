"""Step 2, crop: source clip -> 512x512 25 fps face video + 16 kHz mono wav of the same length.

Two streaming passes over the source, so memory does not grow with clip length:
1. luma only, at detection resolution: 68-point landmarks on every frame, each frame's face box following
   the previous frame's landmarks (LivePortrait tracks driving videos the same way); face detection every
   `detect_every` frames near the tracked face re-anchors the box and counts face presence, and a
   whole-frame detection every `full_detect_every` frames counts other faces and re-acquires a lost one;
2. at source resolution, in the decoder's yuv420p planes (no RGB round trip, half the bytes of RGB): warp
   every frame with the smoothed LivePortrait crop (chroma planes with the same map at half scale) and pipe
   it to the encoder.
Both decoders run ahead of the Python work on reader threads (tasks.media.iter_frames).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import cv2
import numpy as np

from tasks.contract import AUDIO_SAMPLES_PER_FRAME, CROP_SIZE, FPS, SAMPLE_RATE
from tasks.crop_geometry import CropParams, StreamingRectSmoother, crop_matrix, rect_from_landmarks, transform_points
from tasks.errors import ClipRejected
from tasks.face_landmarks import FaceBox, get_landmarker
from tasks.media import MediaError, VideoWriter, iter_frames, probe, read_audio, write_wav, yuv420_planes

CROP_VIDEO = "crop.mp4"
CROP_AUDIO = "audio.wav"
CROP_LANDMARKS = "landmarks.npy"
CROP_INFO = "crop.json"
CROP_RECTS = "rects.npy"  # [T, 4] smoothed crop squares in source pixels: cx, cy, size, angle (rad)


@dataclass(frozen=True)
class CropConfig:
    params: CropParams = field(default_factory=CropParams)
    landmarker: str = "dlib"
    detect_every: int = 10  # frames (at 25 fps) between face detections
    full_detect_every: int = 50  # frames between whole-frame detections; the others search near the tracked face
    track_margin: float = 1.0  # the near-face search region extends this many face sizes on each side
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
    full_det_frames: int = 0  # whole-frame detections: the ones that can see a second face
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


def _detect_near(lm, frame: np.ndarray, box: FaceBox, margin: float) -> list[FaceBox]:
    """Faces inside a region around `box` (HOG cost grows with area: ~1/3 of a 480x640 frame's)."""
    pad = margin * box.size
    h, w = frame.shape[:2]
    x0, y0 = int(max(0, box.x0 - pad)), int(max(0, box.y0 - pad))
    x1, y1 = int(min(w, box.x1 + pad)), int(min(h, box.y1 + pad))
    found = lm.detect(np.ascontiguousarray(frame[y0:y1, x0:x1]))
    return [FaceBox(b.x0 + x0, b.y0 + y0, b.x1 + x0, b.y1 + y0, b.score) for b in found]


def _box_anchor(box: FaceBox, pts: np.ndarray) -> np.ndarray:
    """The detector box relative to the landmarks' extent: centre offset and size, in landmark-extent units."""
    lo, hi = pts.min(0), pts.max(0)
    extent = float(np.sqrt(max(hi[0] - lo[0], 1.0) * max(hi[1] - lo[1], 1.0)))
    return np.array([*(box.center - (lo + hi) / 2) / extent, box.size / extent])


def _box_from_landmarks(pts: np.ndarray, anchor: np.ndarray) -> FaceBox:
    lo, hi = pts.min(0), pts.max(0)
    extent = float(np.sqrt(max(hi[0] - lo[0], 1.0) * max(hi[1] - lo[1], 1.0)))
    cx, cy = (lo + hi) / 2 + anchor[:2] * extent
    half = anchor[2] * extent / 2
    return FaceBox(cx - half, cy - half, cx + half, cy + half)


def _track_faces(source: Path, cfg: CropConfig, max_frames: int, face_box: Optional[list[float]] = None,
                 on_frame: Optional[Callable[[np.ndarray], bool]] = None) -> _Track:
    """Pass 1. `on_frame` gets each frame's landmarks (source pixels, NaN before the first face) as soon as
    they exist; returning False stops the pass."""
    info = probe(source)
    s = min(1.0, cfg.detect_max_side / max(info.width, info.height))
    size = (max(2, int(round(info.width * s / 2)) * 2), max(2, int(round(info.height * s / 2)) * 2))
    sx, sy = size[0] / info.width, size[1] / info.height
    lm = get_landmarker(cfg.landmarker)
    hint = FaceBox(*face_box).scaled(s) if face_box else None
    track = _Track(landmarks=[])
    box: Optional[FaceBox] = None  # the face being followed, in detection-frame pixels
    anchor: Optional[np.ndarray] = None  # the last detection's box relative to its landmarks
    pts: Optional[np.ndarray] = None  # the previous frame's landmarks
    i = 0
    for chunk in iter_frames(source, fps=FPS, scale_to=size, pix_fmt="gray"):
        for frame in chunk:  # [H, W] luma
            if i >= max_frames:
                return track
            detected = False
            if box is not None and pts is not None and anchor is not None:
                box = _box_from_landmarks(pts, anchor)
            if i % cfg.detect_every == 0:
                near = box is not None and i % cfg.full_detect_every != 0
                boxes = _detect_near(lm, frame, box, cfg.track_margin) if near else []
                if not boxes:  # whole frame: scheduled, not tracking yet, or the face left the region
                    near = False
                    boxes = lm.detect(frame)
                    track.full_det_frames += 1
                track.det_frames += 1
                picked = _pick(boxes, box, hint) if boxes else None
                if picked is not None:
                    box, detected = picked, True
                    track.det_hits += 1
                    track.face_sizes.append(box.size / s)
                    others = [b for b in boxes if b is not box]
                    if not near and others and max(b.size for b in others) >= cfg.second_face_ratio * box.size:
                        track.multi_hits += 1
            if box is None:
                track.landmarks.append(np.full((68, 2), np.nan, np.float32))
            else:
                pts = lm.landmarks(frame, box)
                if detected:
                    anchor = _box_anchor(box, pts)
                track.landmarks.append(pts / np.array([sx, sy], np.float32))
            i += 1
            if on_frame is not None and not on_frame(track.landmarks[-1]):
                return track
    return track


def warp_yuv420(frame: np.ndarray, width: int, height: int, m: np.ndarray, d: int) -> np.ndarray:
    """One flat yuv420p source frame -> the flat yuv420p d x d crop under the 2x3 luma map `m`.

    Chroma samples sit at the centre of their 2x2 luma block: chroma pixel c is luma position 2c + 0.5, so
    the chroma map is m with its translation moved into that grid. Outside the frame is video black
    (Y 16, U = V 128), what RGB black becomes in the encoder.
    """
    y, u, v = yuv420_planes(frame, width, height)
    a, t = m[:, :2], m[:, 2]
    mc = np.concatenate([a, ((a @ np.array([0.5, 0.5]) + t - 0.5) / 2)[:, None]], axis=1)
    h = d // 2
    warp = lambda plane, mat, size, fill: cv2.warpAffine(plane, mat, (size, size), flags=cv2.INTER_LINEAR,
                                                         borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    return np.concatenate([warp(y, m, d, 16).ravel(), warp(u, mc, h, 128).ravel(), warp(v, mc, h, 128).ravel()])


class _CropFeed:
    """Hands pass 1's per-frame crop rects to the warp thread as soon as the smoothing look-ahead allows,
    so decoding, tracking, warping and encoding overlap instead of running as two passes in a row."""

    def __init__(self, cfg: CropConfig, limit: int):
        self.params = cfg.params
        self.smoother = StreamingRectSmoother(cfg.smooth_sigma)
        self.limit = limit  # frames the output may have (video estimate, or the audio's length)
        self._cond = threading.Condition()
        self._done = False
        self._cancelled = False

    def push(self, landmarks: np.ndarray) -> bool:
        rect = None if np.isnan(landmarks).any() else rect_from_landmarks(landmarks, self.params)
        with self._cond:
            self.smoother.push(rect)
            self._cond.notify_all()
            return not self._cancelled

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def rect(self, i: int) -> Optional[np.ndarray]:
        """Smoothed rect of frame i; None once frame i will not be in the output (or the run was cancelled)."""
        with self._cond:
            while True:
                if self._cancelled:
                    return None
                end = min(len(self.smoother.raw), self.limit) if self._done else self.limit
                if i >= end:
                    return None
                if self.smoother.ready(i, end):
                    return self.smoother.smoothed(i, end)
                if self._done:  # tracking ended without a face: nothing to warp
                    return None
                self._cond.wait()


class _NothingToWarp(Exception):
    pass


def _warp_and_encode(source: Path, info, feed: _CropFeed, video: Path, d: int, crf: int) -> int:
    """Pass 2 (on its own thread): warp each source frame as its rect becomes known; frames written.

    Writes no file when no frame is warped (no face, or tracking failed and cancelled the feed)."""
    i = 0
    try:
        with VideoWriter(video, d, d, fps=FPS, crf=crf, input_pix_fmt="yuv420p") as writer:
            for chunk in iter_frames(source, fps=FPS, chunk=8, pix_fmt="yuv420p"):
                warped = []
                for frame in chunk:
                    rect = feed.rect(i)
                    if rect is None:
                        break
                    warped.append(warp_yuv420(frame, info.width, info.height, crop_matrix(rect, d), d))
                    i += 1
                if warped:
                    writer.write(np.stack(warped))
                if len(warped) < len(chunk):
                    break
            if feed.cancelled or i == 0:
                raise _NothingToWarp
            if feed.rect(i) is not None:
                raise MediaError(f"the warp pass decoded {i} frames, fewer than tracked")
    except _NothingToWarp:
        return 0
    except BaseException:
        feed.cancel()  # stop the tracking pass early: this clip fails anyway
        raise
    return i


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
    # Frames the output can have at most: trimmed to the audio (when av_mismatch allows it; checked below).
    limit = min(source_frames_est, len(audio) // AUDIO_SAMPLES_PER_FRAME) if info.has_audio else source_frames_est
    out_dir.mkdir(parents=True, exist_ok=True)
    feed = _CropFeed(cfg, limit)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crop-warp") as pool:
        encoded = pool.submit(_warp_and_encode, source, info, feed, out_dir / CROP_VIDEO, cfg.params.dsize, cfg.crf)
        try:
            track = _track_faces(source, cfg, max_frames=source_frames_est, face_box=face_box, on_frame=feed.push)
        except BaseException as exc:
            feed.cancel()
            if isinstance(exc, MediaError):
                raise ClipRejected("corrupt", str(exc)) from exc
            raise
        finally:
            feed.finish()
        try:
            written = encoded.result()
        except MediaError as exc:
            raise ClipRejected("corrupt", str(exc)) from exc
    try:
        n_video = len(track.landmarks)
        audio_s = len(audio) / SAMPLE_RATE
        if n_video < cfg.min_frames:
            raise ClipRejected("too_short", f"{n_video} frames at {FPS} fps, need {cfg.min_frames}")
        if track.det_frames == 0 or track.det_hits / track.det_frames < cfg.min_face_ratio:
            raise ClipRejected("no_face", f"face found in {track.det_hits}/{track.det_frames} detection frames")
        if face_box is None and track.multi_hits / max(1, track.full_det_frames) >= cfg.multi_face_frames:
            raise ClipRejected("multiple_faces", f"a second dominant face in {track.multi_hits}/{track.full_det_frames} "
                                                 "whole-frame detections")
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
        if written != frames:
            raise ClipRejected("corrupt", f"second decode gave {written} frames, first gave {n_video}")
    except ClipRejected:
        (out_dir / CROP_VIDEO).unlink(missing_ok=True)  # warped while tracking: only a kept clip keeps it
        raise

    landmarks = _fill_missing(np.stack(track.landmarks[:frames]))
    rects = np.stack([feed.smoother.smoothed(i, frames) for i in range(frames)])  # the rects the warp used
    mats = [crop_matrix(r, cfg.params.dsize) for r in rects]
    crop_landmarks = np.stack([transform_points(p, m) for p, m in zip(landmarks, mats)]).astype(np.float32)

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
