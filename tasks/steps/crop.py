"""Step 2, crop: source clip -> 512x512 25 fps face video + 16 kHz mono wav of the same length.

One streaming decode (yuv420p, read ahead on a thread by tasks.media.iter_frames), so memory does not grow
with clip length. Each frame is
1. tracked on its luma, downscaled to detection size: 68-point landmarks on every frame, the face box
   following the previous frame's landmarks (LivePortrait tracks driving videos the same way); a face
   detection every `detect_every` frames near the tracked face re-anchors the box and counts face presence,
   and a whole-frame detection every `full_detect_every` frames counts other faces and re-acquires a lost one;
2. held until its temporally smoothed crop is known (the Gaussian's radius, 8 frames), then warped in its
   yuv420p planes (no RGB round trip, half the bytes; chroma with the same map on its half-size grid) and
   piped to the encoder, which runs in its own process.
The decision to keep or reject the clip comes after the last frame; a rejected clip's video is discarded.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import ClassVar, Literal, Optional

import cv2
import numpy as np

from datasets_manifest.schema import ClipRow
from tasks.contract import AUDIO_SAMPLES_PER_FRAME, CROP_SIZE, FPS, SAMPLE_RATE
from tasks.crop_geometry import CropParams, StreamingRectSmoother, crop_matrix, rect_from_landmarks, transform_points
from tasks.crop_segments import Segment, SegmentConfig, cut_score, kept_spans, plan_segments
from tasks.errors import ClipRejected
from tasks.face_landmarks import FaceBox, get_landmarker
from tasks.media import (
    CorruptStream,
    MediaError,
    MediaInfo,
    VideoWriter,
    encode_filtered,
    iter_frames,
    probe,
    read_audio,
    square_scale,
    write_wav,
    yuv420_planes,
)
from tasks.step_store import fingerprint, save_npy
from tasks.steps.download import DownloadStep, downloaded_video

CROP_VIDEO = "crop.mp4"
CROP_AUDIO = "audio.wav"
CROP_LANDMARKS = "landmarks.npy"
CROP_INFO = "crop.json"
PENDING_BYTES = 256 * 2**20  # decoded frames held before the first face is found (then: a second decode)
CROP_RECTS = "rects.npy"  # [T, 4] smoothed crop squares in source pixels: cx, cy, size, angle (rad)


@dataclass(frozen=True)
class CropConfig:
    params: CropParams = field(default_factory=CropParams)
    landmarker: str = "dlib"
    detect_every: int = 10  # frames (at 25 fps) between face detections
    drift_redetect: float = 0.15  # landmark extent this far (ratio) from the last detection's: detect next frame
    full_detect_every: int = 50  # frames between whole-frame detections; the others search near the tracked face
    track_margin: float = 1.0  # the near-face search region extends this many face sizes on each side
    near_face_px: float = 110.0  # the near-face search runs at a scale where the tracked face is this wide
    detect_max_side: int = 640  # detection and landmarks run on frames downscaled to this
    smooth_sigma: float = 2.0  # frames; Gaussian smoothing of crop boxes over time
    min_face_px: float = 64.0  # median detected face size in source pixels
    small_face_px: float = 40.0  # before the first face: a second, finer search finds faces down to this size
    small_face_probes: int = 3  # ... on at most this many detection frames (its cost grows with the source area)
    min_face_ratio: float = 0.8  # detection frames that must contain a face
    second_face_ratio: float = 0.6  # a second face this large relative to the main one counts as dominant ...
    multi_face_frames: float = 0.3  # ... and in this share of detection frames the clip is rejected
    min_frames: int = 33  # shortest clip kept (one 4n+1 window of the default n=8)
    require_audio: bool = True
    silence_rms: float = 1e-4  # ~ -80 dBFS, as the HuBERT step's: silent clips go before any model runs
    av_tolerance_s: float = 0.2  # audio/video length difference accepted silently
    av_mismatch: Literal["trim", "reject"] = "trim"  # beyond tolerance: cut both to the shorter, or reject
    crf: int = 18
    mode: Literal["static", "follow"] = "static"  # one box per stable segment, or a box per frame
    segments: SegmentConfig = field(default_factory=SegmentConfig)  # the static mode's box and segment rules


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
    mode: str = "static"
    segments: list = field(default_factory=list)  # [start, end) spans training windows may use
    dropped_segments: list = field(default_factory=list)  # segments too short for a window, with why

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


def _detect_near(lm, frame: np.ndarray, box: FaceBox, margin: float, face_px: float) -> list[FaceBox]:
    """Faces inside a region around `box`, searched at a scale where the tracked face is about `face_px`
    wide: HOG's cost grows with the searched area, and its 80 px window finds any face at least that big."""
    pad = margin * box.size
    h, w = frame.shape[:2]
    x0, y0 = int(max(0, box.x0 - pad)), int(max(0, box.y0 - pad))
    x1, y1 = int(min(w, box.x1 + pad)), int(min(h, box.y1 + pad))
    region = frame[y0:y1, x0:x1]
    s = min(_MAX_NEAR_UPSCALE, face_px / max(box.size, 1.0))  # > 1: a small face is enlarged to HOG's window
    if s != 1.0:
        size = (max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s)))
        region = _downscale(region, size)
        sx, sy = region.shape[1] / (x1 - x0), region.shape[0] / (y1 - y0)
    else:
        sx = sy = 1.0
    found = lm.detect(np.ascontiguousarray(region))
    return [FaceBox(b.x0 / sx + x0, b.y0 / sy + y0, b.x1 / sx + x0, b.y1 / sy + y0, b.score) for b in found]


_MAX_NEAR_UPSCALE = 4.0
_HOG_WINDOW_PX = 80.0  # dlib's frontal detector finds faces at least this wide


def _landmark_extent(pts: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre of the landmarks' bounding box and its size (geometric mean of the sides, at least 1 px)."""
    lo, hi = pts.min(0), pts.max(0)
    return (lo + hi) / 2, float(np.sqrt(max(hi[0] - lo[0], 1.0) * max(hi[1] - lo[1], 1.0)))


def _box_anchor(box: FaceBox, pts: np.ndarray) -> np.ndarray:
    """The detector box relative to the landmarks' extent: centre offset and size, in landmark-extent units."""
    centre, extent = _landmark_extent(pts)
    return np.array([*(box.center - centre) / extent, box.size / extent])


def _box_from_landmarks(pts: np.ndarray, anchor: np.ndarray) -> FaceBox:
    centre, extent = _landmark_extent(pts)
    cx, cy = centre + anchor[:2] * extent
    half = anchor[2] * extent / 2
    return FaceBox(cx - half, cy - half, cx + half, cy + half)


class _FaceTracker:
    """Per-frame face tracking on luma at detection size: landmarks every frame, each frame's box following
    the previous frame's landmarks; detections re-anchor the box and keep the statistics the rejections use."""

    def __init__(self, cfg: CropConfig, scale: float, sx: float, sy: float, face_box: Optional[list[float]]):
        self.cfg, self.scale = cfg, scale
        self.to_source = np.array([sx, sy], np.float32)
        self.lm = get_landmarker(cfg.landmarker)
        self.hint = FaceBox(*face_box).scaled(scale) if face_box else None
        self.track = _Track(landmarks=[])
        self.box: Optional[FaceBox] = None  # the face being followed, in detection-frame pixels
        self.anchor: Optional[np.ndarray] = None  # the last detection's box relative to its landmarks
        self.pts: Optional[np.ndarray] = None  # the previous frame's landmarks
        self.small_probes = 0  # small-face searches spent
        self.extent: Optional[float] = None  # the landmarks' extent at the last detection
        self.drifted = False  # the landmarks grew or shrank since then: detect on the next frame

    @property
    def frames(self) -> int:
        return len(self.track.landmarks)

    def _detect_small(self, source_luma: np.ndarray) -> list[FaceBox]:
        """Whole-frame search at the scale where a `small_face_px` source face fills HOG's window (a tall
        1080x1920 source puts a 135 px face at 45 px of detection size, below what HOG can see)."""
        self.small_probes += 1
        t = _HOG_WINDOW_PX / self.cfg.small_face_px
        h, w = source_luma.shape
        big = cv2.resize(source_luma, (round(w * t), round(h * t)), interpolation=cv2.INTER_LINEAR)
        found = self.lm.detect(cv2.LUT(big, _FULL_RANGE_LUT))
        return [b.scaled(self.scale / t) for b in found]

    def step(self, frame: np.ndarray, source_luma=None) -> np.ndarray:
        """[68, 2] landmarks of this frame in source pixels (NaN until the first face is found).

        `source_luma`: a callable giving the frame's full-size luma, for the small-face search."""
        cfg, track, i = self.cfg, self.track, self.frames
        detected = False
        if self.box is not None and self.pts is not None and self.anchor is not None:
            self.box = _box_from_landmarks(self.pts, self.anchor)
        if i % cfg.detect_every == 0 or self.drifted:
            self.drifted = False
            near = self.box is not None and i % cfg.full_detect_every != 0
            boxes = _detect_near(self.lm, frame, self.box, cfg.track_margin, cfg.near_face_px) if near else []
            if not boxes:  # whole frame: scheduled, not tracking yet, or the face left the region
                near = False
                boxes = self.lm.detect(frame)
                track.full_det_frames += 1
                if not boxes and self.box is not None:  # a tracked face too small for HOG at this size
                    near, boxes = True, _detect_near(self.lm, frame, self.box, cfg.track_margin, cfg.near_face_px)
                if not boxes and self.box is None and source_luma is not None \
                        and self.small_probes < cfg.small_face_probes:
                    boxes = self._detect_small(source_luma())
            track.det_frames += 1
            picked = _pick(boxes, self.box, self.hint) if boxes else None
            if picked is not None:
                self.box, detected = picked, True
                track.det_hits += 1
                track.face_sizes.append(picked.size / self.scale)
                others = [b for b in boxes if b is not picked]
                if not near and others and max(b.size for b in others) >= cfg.second_face_ratio * picked.size:
                    track.multi_hits += 1
        if self.box is None:
            track.landmarks.append(np.full((68, 2), np.nan, np.float32))
        else:
            self.pts = self.lm.landmarks(frame, self.box)
            extent = _landmark_extent(self.pts)[1]
            if detected:
                self.anchor, self.extent = _box_anchor(self.box, self.pts), extent
            elif self.extent is not None and abs(np.log(extent / self.extent)) > np.log1p(cfg.drift_redetect):
                # boxes that follow the previous frame's landmarks compound the shape model's errors on a fast
                # head (lp_d12.mp4: extents of 0.3x-1.4x the face's within 10 frames): re-anchor at once
                self.drifted = True
            track.landmarks.append(self.pts / self.to_source)
        return track.landmarks[-1]


# dlib's models expect full-range intensity; decoded luma is video range (16-235).
_FULL_RANGE_LUT = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)


def _downscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at `size` (w, h): exact 2x area halvings while above twice the size, then one bilinear step
    (cv2's INTER_AREA at a fractional factor costs ~20x a bilinear resize at these sizes)."""
    small = image
    while small.shape[1] >= 2 * size[0] and small.shape[0] >= 2 * size[1]:
        small = cv2.resize(small, (small.shape[1] // 2, small.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if (small.shape[1], small.shape[0]) != size:
        small = cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)
    return small


def _detection_luma(y: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Full-range luma at detection size."""
    return cv2.LUT(_downscale(y, size), _FULL_RANGE_LUT)


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

    def warp(plane, mat, size, fill):
        return cv2.warpAffine(plane, mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=fill)

    return np.concatenate([warp(y, m, d, 16).ravel(), warp(u, mc, h, 128).ravel(), warp(v, mc, h, 128).ravel()])


def _warped(frames: list[np.ndarray], start: int, smoother: StreamingRectSmoother, end: int,
            width: int, height: int, d: int) -> np.ndarray:
    """Frames start.. warped by their smoothed crop, as flat yuv420p rows for the encoder."""
    return np.stack([warp_yuv420(f, width, height, crop_matrix(smoother.smoothed(start + k, end), d), d)
                     for k, f in enumerate(frames)])


def _fill_missing(landmarks: np.ndarray) -> np.ndarray:
    """Frames before the first detection take the first tracked landmarks."""
    ok = ~np.isnan(landmarks).any(axis=(1, 2))
    first = int(np.argmax(ok))
    out = landmarks.copy()
    out[:first] = landmarks[first]
    return out


def unreadable(exc: MediaError) -> ClipRejected:
    """The rejection for a source that cannot be read: `corrupt_stream` (it decodes, but damaged data was
    concealed; the message says where) or `corrupt`. Every crop step rejects unreadable media this way."""
    return ClipRejected("corrupt_stream" if isinstance(exc, CorruptStream) else "corrupt", str(exc),
                        info={"position_s": exc.position_s} if isinstance(exc, CorruptStream) else None)


@dataclass
class _Source:
    path: Path
    info: MediaInfo
    audio: np.ndarray  # float32 mono at SAMPLE_RATE; empty without an audio stream
    frames_est: int  # decoded frames at FPS, at most
    limit: int  # frames the output can have at most (trimmed to the audio when av_mismatch allows it)
    det_size: tuple[int, int]  # detection frame (w, h)
    det_scale: float


def probe_video(source: Path) -> MediaInfo:
    """Probe a source every crop needs frames of: unreadable -> `corrupt`, no video stream -> `no_video`."""
    try:
        info = probe(source)
    except MediaError as exc:
        raise unreadable(exc) from exc
    if not info.has_video:
        raise ClipRejected("no_video", f"{source.name} has no video stream")
    return info


def _open_source(source: Path, cfg: CropConfig) -> _Source:
    """Probe and read the audio; the rejections that need no frame (no video, no audio, silence, damage)."""
    info = probe_video(source)
    if not info.has_audio and cfg.require_audio:
        raise ClipRejected("no_audio", f"{source.name} has no audio stream")
    try:
        audio = read_audio(source, SAMPLE_RATE, info=info) if info.has_audio else np.zeros(0, np.float32)
    except MediaError as exc:
        raise unreadable(exc) from exc
    if info.has_audio and len(audio):
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
        if rms < cfg.silence_rms:
            raise ClipRejected("silent_audio", f"audio RMS {rms:.2e} below {cfg.silence_rms:.0e}")
    frames_est = int(round(info.duration_s * FPS)) + FPS
    limit = min(frames_est, len(audio) // AUDIO_SAMPLES_PER_FRAME) if info.has_audio else frames_est
    s = min(1.0, cfg.detect_max_side / max(info.width, info.height))
    size = (max(2, int(round(info.width * s / 2)) * 2), max(2, int(round(info.height * s / 2)) * 2))
    return _Source(source, info, audio, frames_est, limit, size, s)


def _judge(track: _Track, n_video: int, src: _Source, cfg: CropConfig,
           face_box: Optional[list[float]]) -> tuple[int, float]:
    """After tracking: reject the clip or return (frames kept, median face size in source pixels)."""
    audio_s = len(src.audio) / SAMPLE_RATE
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
    if src.info.has_audio:
        gap = abs(audio_s - n_video / FPS)
        if gap > cfg.av_tolerance_s and cfg.av_mismatch == "reject":
            raise ClipRejected("av_length_mismatch", f"audio {audio_s:.2f}s vs video {n_video / FPS:.2f}s")
        frames = min(n_video, len(src.audio) // AUDIO_SAMPLES_PER_FRAME)
        if frames < cfg.min_frames:
            raise ClipRejected("too_short", f"only {frames} frames have audio (audio {audio_s:.2f}s)")
    return frames, median_face


def _tracker(src: _Source, cfg: CropConfig, face_box: Optional[list[float]]) -> _FaceTracker:
    w, h = src.det_size
    return _FaceTracker(cfg, src.det_scale, w / src.info.width, h / src.info.height, face_box)


def _track_static(src: _Source, cfg: CropConfig,
                  face_box: Optional[list[float]]) -> tuple[_Track, int, np.ndarray]:
    """Landmarks and shot-cut scores of every frame the output can hold, from a luma-only decode, and the
    source's frame count (frames past the audio are counted, not tracked)."""
    tracker = _tracker(src, cfg, face_box)
    scores: list[float] = []
    previous = None
    cut_size = (max(1, src.det_size[0] // 4), max(1, src.det_size[1] // 4))
    n_video = 0
    try:
        decoded = (f for chunk in iter_frames(src.path, fps=FPS, chunk=8, pix_fmt="gray", info=src.info) for f in chunk)
        for luma in islice(decoded, src.frames_est):
            n_video += 1
            if n_video > src.limit:
                continue
            det = _detection_luma(luma, src.det_size)
            tracker.step(det, source_luma=lambda: luma)
            small = cv2.resize(det, cut_size, interpolation=cv2.INTER_AREA)
            scores.append(cut_score(previous, small))
            previous = small
    except MediaError as exc:
        raise unreadable(exc) from exc
    return tracker.track, n_video, np.asarray(scores)


def encode_static_crop(source: Path, out: Path, segments: list[Segment], frames: int, info: MediaInfo,
                       dsize: int, crf: int) -> None:
    """The static crop in one ffmpeg run: per segment a fixed crop + scale of the 25 fps source, concatenated;
    black outside the frame (a pad), as LivePortrait's warp fills it. No frame passes through Python."""
    pad = max([0] + [max(-x, -y, x + s - info.width, y + s - info.height) for x, y, s in (g.box for g in segments)])
    pad = _even_up(pad)
    head = f"fps={FPS}" + (f",pad=iw+{2 * pad}:ih+{2 * pad}:{pad}:{pad}:color=black" if pad else "")
    k = len(segments)
    graph = [f"[0:v]{head},split={k}" + "".join(f"[in{i}]" for i in range(k))]
    for i, g in enumerate(segments):
        x, y, side = g.box
        graph.append(f"[in{i}]trim=start_frame={g.start}:end_frame={g.end},setpts=PTS-STARTPTS,"
                     f"crop={side}:{side}:{x + pad}:{y + pad},{square_scale(side, dsize)},setsar=1[seg{i}]")
    graph.append("".join(f"[seg{i}]" for i in range(k)) + f"concat=n={k}:v=1:a=0,format=yuv420p[out]")
    encode_filtered(source, out, ";".join(graph), FPS, crf, "static crop", frames=frames)


def _even_up(v: float) -> int:
    return int(2 * np.ceil(max(0.0, v) / 2))


def _crop_static(src: _Source, out_dir: Path, cfg: CropConfig, face_box: Optional[list[float]]):
    track, n_video, scores = _track_static(src, cfg, face_box)
    frames, median_face = _judge(track, n_video, src, cfg, face_box)
    landmarks = _fill_missing(np.stack(track.landmarks[:frames]))
    segments = plan_segments(landmarks, scores[:frames], cfg.segments)
    if not kept_spans(segments):
        longest = max(g.frames for g in segments)
        raise ClipRejected("no_stable_segment", f"{len(segments)} segments, the longest {longest} frames: the face "
                                                f"never stays {cfg.segments.min_frames} frames in one box")
    try:
        encode_static_crop(src.path, out_dir / CROP_VIDEO, segments, frames, src.info, cfg.params.dsize, cfg.crf)
    except MediaError as exc:
        raise unreadable(exc) from exc
    rects = np.stack([g.rect() for g in segments for _ in range(g.frames)])
    return n_video, frames, median_face, landmarks, rects, segments


def _crop_follow(src: _Source, out_dir: Path, cfg: CropConfig, face_box: Optional[list[float]]):
    """The per-frame tracked crop (rotation with roll, Gaussian-smoothed boxes), warped while tracking."""
    tracker = _tracker(src, cfg, face_box)
    smoother = StreamingRectSmoother(cfg.smooth_sigma)
    d, w, h, limit = cfg.params.dsize, src.info.width, src.info.height, src.limit
    # One decode feeds both jobs: each frame is tracked, then waits in `pending` until its smoothed crop is
    # known (radius frames later) and goes to the encoder. Before the first face nothing can be warped; if
    # that lead outgrows PENDING_BYTES the warp is left to a second decode after tracking.
    writer: Optional[VideoWriter] = VideoWriter(out_dir / CROP_VIDEO, d, d, fps=FPS, crf=cfg.crf, input_pix_fmt="yuv420p")
    pending: deque[np.ndarray] = deque()
    written = 0
    try:
        try:
            decoded = (f for chunk in iter_frames(src.path, fps=FPS, chunk=8, pix_fmt="yuv420p", info=src.info)
                       for f in chunk)
            for frame in islice(decoded, src.frames_est):
                luma = yuv420_planes(frame, w, h)[0]
                pts = tracker.step(_detection_luma(luma, src.det_size), source_luma=lambda: luma)
                smoother.push(None if np.isnan(pts).any() else rect_from_landmarks(pts, cfg.params))
                if writer is None or tracker.frames > limit:
                    continue
                pending.append(frame)
                ready = 0
                while ready < len(pending) and smoother.ready(written + ready, limit):
                    ready += 1
                if ready:
                    writer.write(_warped([pending.popleft() for _ in range(ready)], written, smoother, limit, w, h, d))
                    written += ready
                elif smoother.first is None and len(pending) * frame.nbytes > PENDING_BYTES:
                    writer.abort()
                    writer, written = None, 0
                    pending.clear()
        except MediaError as exc:
            raise unreadable(exc) from exc
        track = tracker.track
        end = min(tracker.frames, limit)
        if writer is not None and pending and smoother.ready(written, end):
            writer.write(_warped(list(pending), written, smoother, end, w, h, d))
            written += len(pending)
            pending.clear()
        frames, median_face = _judge(track, len(track.landmarks), src, cfg, face_box)
        if writer is None:  # the lead before the first face outgrew the buffer: warp in a second decode
            writer = VideoWriter(out_dir / CROP_VIDEO, d, d, fps=FPS, crf=cfg.crf, input_pix_fmt="yuv420p")
            try:
                for chunk in iter_frames(src.path, fps=FPS, chunk=8, pix_fmt="yuv420p", info=src.info):
                    take = list(chunk[: max(0, frames - written)])
                    if take:
                        writer.write(_warped(take, written, smoother, frames, w, h, d))
                        written += len(take)
                    if written >= frames:
                        break
            except MediaError as exc:
                raise unreadable(exc) from exc
        if written != frames:
            raise ClipRejected("corrupt", f"warped {written} frames, tracked {len(track.landmarks)} ({frames} kept)")
        writer.close()
        writer = None
    finally:
        if writer is not None:  # rejected or failed: the encoder's temporary file goes, no crop.mp4 appears
            writer.abort()
    landmarks = _fill_missing(np.stack(track.landmarks[:frames]))
    rects = np.stack([smoother.smoothed(i, frames) for i in range(frames)])  # the rects the warp used
    return len(track.landmarks), frames, median_face, landmarks, rects, None


def crop_clip(source: str | Path, out_dir: str | Path, cfg: CropConfig = CropConfig(),
              face_box: Optional[list[float]] = None) -> CropResult:
    """Crop one clip into `out_dir` (created); raises ClipRejected with a reason code.

    `face_box` (x0, y0, x1, y1 in source pixels, from the manifest) says which face to follow when several
    are visible; the clip is then not rejected for a second dominant face. `cfg.mode`: "static" (one box per
    stable segment, tasks/crop_segments.py) or "follow" (a box per frame).
    """
    t0 = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    src = _open_source(source, cfg)  # probe, audio, detection scale; rejects what cannot be read
    out_dir.mkdir(parents=True, exist_ok=True)
    crop = _crop_static if cfg.mode == "static" else _crop_follow  # track, judge, encode crop.mp4
    n_video, frames, median_face, landmarks, rects, segments = crop(src, out_dir, cfg, face_box)
    n_audio = _write_alongside(src, out_dir, cfg, frames, landmarks, rects)
    result = CropResult(
        clip_dir=out_dir,
        frames=frames,
        audio_samples=n_audio if src.info.has_audio else 0,
        source_frames=n_video,
        source_audio_s=len(src.audio) / SAMPLE_RATE,
        trimmed_s=max(0.0, n_video / FPS - frames / FPS),
        median_face_px=median_face,
        landmarker=get_landmarker(cfg.landmarker).name,
        seconds=time.perf_counter() - t0,
        mode=cfg.mode,
        segments=kept_spans(segments) if segments else [(0, frames)],
        dropped_segments=[g.as_json() for g in segments if g.dropped] if segments else [],
    )
    # Only facts that depend on the input: no paths, no timings (the dir's checksum keys downstream steps).
    meta = {k: v for k, v in asdict(result).items() if k not in ("clip_dir", "seconds")}
    meta["params"] = asdict(cfg.segments.params if cfg.mode == "static" else cfg.params)
    meta["crop_size"] = CROP_SIZE
    if segments:
        meta["segment_boxes"] = [g.as_json() for g in segments]
    write_crop_info(out_dir, meta)
    return result


def _write_alongside(src: _Source, out_dir: Path, cfg: CropConfig, frames: int, landmarks: np.ndarray,
                     rects: np.ndarray) -> int:
    """What goes beside crop.mp4: the audio cut to the kept frames, the landmarks in crop coordinates and the
    source rects; returns the audio samples written (0 without audio)."""
    mats = [crop_matrix(r, cfg.params.dsize) for r in rects]
    crop_landmarks = np.stack([transform_points(p, m) for p, m in zip(landmarks, mats)]).astype(np.float32)
    n_audio = frames * AUDIO_SAMPLES_PER_FRAME
    if src.info.has_audio:
        write_wav(out_dir / CROP_AUDIO, src.audio[:n_audio])
    save_npy(out_dir / CROP_LANDMARKS, crop_landmarks)
    save_npy(out_dir / CROP_RECTS, rects.astype(np.float32))
    return n_audio


def write_crop_info(out_dir: Path, info: dict) -> None:
    """crop.json (temp file + rename): what the VAE and shard steps read of any crop (`frames`, `segments`).
    Only facts that depend on the input: the directory's checksum keys the steps downstream."""
    tmp = out_dir / (CROP_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out_dir / CROP_INFO)


def crop_info(crop_dir: Path) -> dict:
    """crop.json of any crop (face or centre): `frames`, `segments` and what made it."""
    return json.loads((crop_dir / CROP_INFO).read_text())


def crop_frames(crop_dir: Path) -> int:
    return int(crop_info(crop_dir)["frames"])


def crop_segments(crop_dir: Path) -> list[tuple[int, int]]:
    """The [start, end) spans of a crop that training windows may use (the crop step's stable segments)."""
    info = crop_info(crop_dir)
    return [(int(a), int(b)) for a, b in info.get("segments", [(0, info["frames"])])]


@dataclass
class CropStep:
    """Step 2 of the talking-head profile: the face crop (512x512, 25 fps), its audio, landmarks and segments."""

    config: CropConfig = field(default_factory=CropConfig)
    name: ClassVar[str] = "crop"
    version: ClassVar[str] = "6"  # 2: manifest face box; 3: luma landmarks, landmark-tracked boxes; 4: scaled
    # near-face search; 5: static segment boxes (default), display rotation, corrupt_stream, silent_audio, small-face
    # search; 6: a drifting landmark track re-detects on the next frame
    requires: ClassVar[tuple[str, ...]] = (DownloadStep.name,)

    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def row_fields(self, row: ClipRow) -> dict:
        return {"face_box": row.face_box}  # the crop follows the manifest face box

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        r = crop_clip(downloaded_video(inputs), out_dir, self.config, face_box=row.face_box)
        return {"frames": r.frames, "audio_samples": r.audio_samples, "trimmed_s": round(r.trimmed_s, 3),
                "median_face_px": round(r.median_face_px, 1), "landmarker": r.landmarker, "mode": r.mode,
                "segments": len(r.segments), "dropped_segments": len(r.dropped_segments)}
