"""The static crop's plan: a clip cut into stable segments, one fixed square box each (no rotation).

LivePortrait crops a driving video with one box: the average of its per-frame landmark boxes (scale 2.2,
vy_ratio -0.1, no rotation), so the head moves and turns inside a still frame. A clip of our datasets may
hold shot cuts or a face that walks out of such a box, so we cut it into segments and give each its own box:
a segment ends at a shot cut, or where the face (its landmarks' extent) would leave the segment's average box
minus a safe margin, or where the face grows or shrinks by more than `max_zoom`. The greedy scan is O(T): the
running mean box and the running extremes of the face extents decide each frame. Segments shorter than a
window are kept in the crop video (each frame still has a box) but listed as dropped: no training window
may start in them or cross into them.

Shot cuts: the mean absolute luma difference of consecutive frames at a small size (PySceneDetect's content
score with luma weight only). PySceneDetect itself does not install beside our stack: 0.7 requires the GUI
build opencv-python, which clashes with opencv-python-headless (both provide `cv2`), and 0.6 pins click < 8.3
while huggingface-hub 2.x needs click >= 8.4.2; the score is one line of numpy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy.ndimage import median_filter

from tasks.crop_geometry import CropParams, rect_from_landmarks

# LivePortrait's crop of a driving video (crop_driving_video): scale 2.2, vy_ratio -0.1, no rotation.
DRIVING_PARAMS = CropParams(scale=2.2, vx_ratio=0.0, vy_ratio=-0.1, rotate=False)


@dataclass(frozen=True)
class SegmentConfig:
    params: CropParams = DRIVING_PARAMS
    safe_margin: float = 0.05  # of the box size: the face's landmark extent stays this far inside the box
    max_zoom: float = 0.3  # largest face size ratio (max/min of the per-frame box sizes) - 1 within a segment
    cut_threshold: float = 30.0  # mean |luma difference| of consecutive frames (0-255) that marks a shot cut
    min_frames: int = 33  # shorter segments are dropped (one 4n+1 window of the default n=8)
    despike_frames: int = 9  # temporal median over this many frames first: a landmark glitch of up to 4 frames
    #                          (a hand, a blink, a lost track; 3 frames of yongen.mp4) must not split a segment


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    box: tuple[int, int, int]  # x0, y0, side in source pixels (even: crops of yuv420p stay on the chroma grid)
    ends_by: str  # "cut" | "face_moved" | "zoom" | "clip_end"
    dropped: Optional[str] = None  # why no window may use it

    @property
    def frames(self) -> int:
        return self.end - self.start

    def rect(self) -> np.ndarray:
        """[cx, cy, size, angle] in the form tasks.crop_geometry.crop_matrix takes."""
        x0, y0, side = self.box
        return np.array([x0 + side / 2, y0 + side / 2, side, 0.0])

    def as_json(self) -> dict:
        return asdict(self)


def cut_score(previous: Optional[np.ndarray], luma: np.ndarray) -> float:
    """Content change between two small luma frames (0 for the first frame)."""
    if previous is None:
        return 0.0
    return float(np.mean(np.abs(luma.astype(np.int16) - previous.astype(np.int16))))


def _even(v: float) -> int:
    return int(2 * round(v / 2))


def plan_segments(landmarks: np.ndarray, cut_scores: np.ndarray, cfg: SegmentConfig = SegmentConfig()) -> list[Segment]:
    """landmarks [T, 68, 2] (source pixels, every frame filled), cut_scores [T] -> segments covering [0, T)."""
    rects = np.stack([rect_from_landmarks(p, cfg.params)[:3] for p in landmarks])  # [T, 3] cx, cy, size
    lo_all, hi_all = landmarks.min(axis=1), landmarks.max(axis=1)  # [T, 2] face extents
    if cfg.despike_frames > 1:
        rects, lo_all, hi_all = (median_filter(a, size=(cfg.despike_frames, 1), mode="nearest")
                                 for a in (rects, lo_all, hi_all))
    out: list[Segment] = []

    def close(start: int, end: int, total: np.ndarray, ends_by: str) -> None:
        cx, cy, size = total / (end - start)
        side = max(2, _even(size))
        out.append(Segment(start, end, (_even(cx - side / 2), _even(cy - side / 2), side), ends_by))

    start, total = 0, rects[0].copy()
    lo, hi, smin, smax = lo_all[0].copy(), hi_all[0].copy(), rects[0, 2], rects[0, 2]
    for i in range(1, len(rects)):
        cand = total + rects[i]
        cx, cy, size = cand / (i - start + 1)
        c_lo, c_hi = np.minimum(lo, lo_all[i]), np.maximum(hi, hi_all[i])
        m = cfg.safe_margin * size
        inside = (c_lo[0] >= cx - size / 2 + m and c_lo[1] >= cy - size / 2 + m
                  and c_hi[0] <= cx + size / 2 - m and c_hi[1] <= cy + size / 2 - m)
        zoom_ok = max(smax, rects[i, 2]) / max(1e-6, min(smin, rects[i, 2])) <= 1 + cfg.max_zoom
        reason = "cut" if cut_scores[i] > cfg.cut_threshold else ("face_moved" if not inside else
                                                                   ("zoom" if not zoom_ok else None))
        if reason:
            close(start, i, total, reason)
            start, total = i, rects[i].copy()
            lo, hi, smin, smax = lo_all[i].copy(), hi_all[i].copy(), rects[i, 2], rects[i, 2]
        else:
            total, lo, hi = cand, c_lo, c_hi
            smin, smax = min(smin, rects[i, 2]), max(smax, rects[i, 2])
    close(start, len(rects), total, "clip_end")
    for seg in out:
        if seg.frames < cfg.min_frames:
            seg.dropped = f"{seg.frames} frames, shorter than one {cfg.min_frames}-frame window"
    return out


def kept_spans(segments: list[Segment]) -> list[tuple[int, int]]:
    """[start, end) of the segments windows may use."""
    return [(s.start, s.end) for s in segments if s.dropped is None]
