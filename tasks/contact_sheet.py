"""A contact sheet of one preprocess run: what the crops look like, and what was turned away and why.

One row per accepted clip: a few crop frames spread over the clip, the 68 landmarks drawn when the crop has
them (so a drifting track or a crop that cuts the chin shows at a glance; a centre crop has none), the
segment count. Then the rejected clips: their first
frame (of the downloaded clip, else the local source) with the reason. A PNG, written atomically; a run of
30K clips shows the first `max_clips` of each kind (by clip id), which is what a person can look at anyway.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from tasks.media import MediaError, iter_frames, probe
from tasks.steps.crop import CROP_INFO, CROP_LANDMARKS, CROP_VIDEO

TILE = 160
LABEL = 22  # px of caption under each row
_REJECT_TINT = np.array([60, 0, 0], np.int16)


@dataclass
class AcceptedClip:
    clip_id: str
    crop_dir: Path


@dataclass
class RejectedClip:
    clip_id: str
    step: str
    reason: str
    frame_source: Optional[Path]  # a video to take the first frame from, when one is on disk


def _frames_at(video: Path, picks: list[int], size: tuple[int, int]) -> list[np.ndarray]:
    """Frames `picks` (ascending) of `video`, decoded at `size` (w, h); stops decoding after the last."""
    want, out, i = set(picks), [], 0
    for chunk in iter_frames(video, scale_to=size, chunk=16):
        for frame in chunk:
            if i in want:
                out.append(frame.copy())
            i += 1
        if i > picks[-1]:
            break
    return out


HEADER_COLOURS = ((255, 255, 255), (255, 255, 160))  # the run line, the legend
LEGEND = "yellow number: frame index in the crop   green dots: the 68 landmarks   red tiles: rejected, with the reason"


def caption_bar(width: int, text: str, colour=(230, 230, 230), height: int = LABEL) -> np.ndarray:
    """`text` on a dark bar, vertically centred; the font shrinks (to 0.3) before the text is cut to fit."""
    bar = np.full((height, width, 3), 30, np.uint8)
    scale = 0.45
    while scale > 0.3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 8:
        scale -= 0.05
    while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 8:
        text = text[:-1]
    y = (height + cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][1]) // 2
    cv2.putText(bar, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return bar


def sheet_header(run_id: str, accepted: int, rejected: int, shown: int) -> list[str]:
    """The two lines above the tiles: which run, how many clips of each kind (and how many are shown), the legend."""
    return [f"{run_id}: {accepted} accepted, {rejected} rejected clip(s); the first {shown} of each kind shown",
            LEGEND]


def accepted_row(clip: AcceptedClip, per_clip: int) -> np.ndarray:
    info = json.loads((clip.crop_dir / CROP_INFO).read_text())
    frames = int(info["frames"])
    picks = sorted({round(k * (frames - 1) / max(1, per_clip - 1)) for k in range(per_clip)})
    marks = clip.crop_dir / CROP_LANDMARKS
    landmarks = np.load(marks, allow_pickle=False) if marks.is_file() else None  # [T, 68, 2] in crop pixels
    scale = TILE / float(info.get("crop_size", 512))
    tiles = []
    for k, frame in zip(picks, _frames_at(clip.crop_dir / CROP_VIDEO, picks, (TILE, TILE))):
        tile = np.ascontiguousarray(frame)
        for x, y in (landmarks[k] * scale if landmarks is not None else ()):
            cv2.circle(tile, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1, cv2.LINE_AA)
        cv2.putText(tile, str(k), (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    row = np.concatenate(tiles, axis=1)
    segs = len(info.get("segments", [[0, frames]]))
    text = f"{clip.clip_id}  {frames} frames  {info.get('mode', 'follow')}, {segs} segment(s)"
    return np.concatenate([row, caption_bar(row.shape[1], text)], axis=0)


def rejected_tile(clip: RejectedClip) -> np.ndarray:
    tile = np.full((TILE, TILE, 3), 60, np.uint8)
    if clip.frame_source is not None and clip.frame_source.is_file():
        try:
            info = probe(clip.frame_source)
            s = TILE / max(info.width, info.height, 1)
            w, h = max(2, int(info.width * s) // 2 * 2), max(2, int(info.height * s) // 2 * 2)
            first = next(iter(iter_frames(clip.frame_source, scale_to=(w, h), chunk=1)), None)
            if first is not None:
                y0, x0 = (TILE - h) // 2, (TILE - w) // 2
                tile[y0: y0 + h, x0: x0 + w] = first[0]
        except MediaError:
            pass  # unreadable sources are among the rejected: the grey tile and the reason say it
    tile = np.clip(tile.astype(np.int16) + _REJECT_TINT, 0, 255).astype(np.uint8)
    return np.concatenate([tile, caption_bar(TILE, f"{clip.reason}", (255, 140, 140)),
                           caption_bar(TILE, clip.clip_id, (200, 200, 200))], axis=0)


def contact_sheet(accepted: list[AcceptedClip], rejected: list[RejectedClip], out_png: Path,
                  per_clip: int = 6, max_clips: int = 24, run_id: str = "") -> Optional[Path]:
    """Write the sheet to `out_png` (temp name + rename), headed by `sheet_header`; None when there is nothing
    to show."""
    rows = [accepted_row(c, per_clip) for c in sorted(accepted, key=lambda c: c.clip_id)[:max_clips]]
    width = max([r.shape[1] for r in rows] + [TILE * per_clip])
    rej = [rejected_tile(c) for c in sorted(rejected, key=lambda c: c.clip_id)[:max_clips]]
    for i in range(0, len(rej), per_clip):
        rows.append(np.concatenate(rej[i: i + per_clip], axis=1))
    if not rows:
        return None
    header = sheet_header(run_id or out_png.stem, len(accepted), len(rejected), max_clips)
    rows = [caption_bar(width, line, HEADER_COLOURS[i]) for i, line in enumerate(header)] + rows
    sheet = np.full((sum(r.shape[0] for r in rows), width, 3), 20, np.uint8)
    y = 0
    for r in rows:
        sheet[y: y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0]
    return write_png(sheet, out_png)


def write_png(image: np.ndarray, out_png: Path) -> Path:
    """An RGB uint8 image as a PNG, written under a temp name and renamed."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    tmp.write_bytes(png.tobytes())
    tmp.replace(out_png)
    return out_png
