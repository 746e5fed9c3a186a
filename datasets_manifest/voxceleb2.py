"""VoxCeleb2: the released layout `<split>/{txt,mp4,aac}/idXXXXX/<youtube id>/NNNNN.{txt,mp4,m4a}`, where
`<split>` is `dev` or `test` (a folder named dev/test, or vox2_dev_* / vox2_test_*, anywhere above idXXXXX).

A txt file is a face track:

    Identity  : id00012
    Reference : 21Uxsk56VDQ          (the YouTube video)
    Offset    : 1
    FV Conf   : 16.647 (1)
    ASD Conf  : 4.009

    FRAME   X      Y      W      H
    000245  0.528  0.264  0.172  0.306     one line per frame, frame numbers at 25 fps of the source

VoxCeleb2's boxes are normalised to the frame, so face_box stays None (pixel boxes, as VoxCeleb1 writes
them, become the union box). Where the clip's mp4 exists locally it is the source (start 0, end = frames/25
when a txt gives the count); otherwise the source is `youtube:<Reference>` trimmed to the tracked frames.
An m4a without its mp4 is audio only and is reported. The published dev/test split is honoured (dev ->
train/val by identity hash, test -> test); a `vox2_meta.csv` (`VoxCeleb2 ID, ..., Set`) beside the folders
overrides the folder names.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow
from datasets_manifest.sources import youtube_source

FPS = 25.0
ATTRIBUTION = "VoxCeleb2 (CC BY-SA 4.0)"
META_FILE = "vox2_meta.csv"
_ID = re.compile(r"^id\d{5}$")
_CLIP = re.compile(r"^\d{5}$")
_SPLIT_PART = re.compile(r"(?:^|[_-])(dev|test)(?:[_-]|$)", re.IGNORECASE)
_PUBLISHED = {"dev": ("train", "val"), "test": ("test",)}


@dataclass
class _Clip:
    split: Optional[str] = None
    files: dict[str, Path] = field(default_factory=dict)  # suffix -> path


def _split_from_parts(parts: tuple[str, ...]) -> Optional[str]:
    for part in reversed(parts):
        m = _SPLIT_PART.search(part)
        if m:
            return m.group(1).lower()
    return None


def _read_meta(root: Path) -> dict[str, str]:
    path = root / META_FILE
    if not path.exists():
        return {}
    sets: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        cells = [c.strip() for c in row]
        if len(cells) >= 4 and _ID.match(cells[0]) and cells[-1].lower() in _PUBLISHED:
            sets[cells[0]] = cells[-1].lower()
    return sets


def read_track(path: Path) -> tuple[dict[str, str], list[tuple[int, float, float, float, float]]]:
    """Header fields and per-frame (frame, x, y, w, h) of one VoxCeleb face-track txt."""
    header: dict[str, str] = {}
    frames: list[tuple[int, float, float, float, float]] = []
    in_frames = False
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if text.upper().startswith("FRAME"):
            in_frames = True
            continue
        if in_frames:
            cells = text.split()
            if len(cells) != 5:
                raise ValueError(f"line {n}: expected FRAME X Y W H, got {text!r}")
            frames.append((int(cells[0]), *(float(c) for c in cells[1:])))
        elif ":" in text:
            key, value = text.split(":", 1)
            header[" ".join(key.split()).upper()] = value.strip()
    return header, frames


def _union_box(frames) -> Optional[list[float]]:
    if max(max(x + w, y + h) for _, x, y, w, h in frames) <= 1.5:
        return None  # normalised coordinates: no pixel box before the source is known
    return [min(f[1] for f in frames), min(f[2] for f in frames),
            max(f[1] + f[3] for f in frames), max(f[2] + f[4] for f in frames)]


def _row(identity: str, ytid: str, clip: str, files: dict[str, Path]) -> ClipRow:
    mp4, txt = files.get(".mp4"), files.get(".txt")
    if mp4 is None and txt is None:
        raise ValueError("audio only (m4a without its mp4 video)")
    start, end, box, reference = 0.0, None, None, ytid
    if txt is not None:
        header, frames = read_track(txt)
        if header.get("IDENTITY", identity) != identity:
            raise ValueError(f"Identity {header['IDENTITY']!r} differs from its folder {identity!r}")
        reference = header.get("REFERENCE", ytid)
        if reference != ytid:
            raise ValueError(f"Reference {reference!r} differs from its folder {ytid!r}")
        if not frames:
            raise ValueError("face track has no FRAME lines")
        first, last = frames[0][0], frames[-1][0]
        if last < first:
            raise ValueError(f"frame numbers go backwards ({first} .. {last})")
        box = _union_box(frames)
        if mp4 is None:
            start, end = first / FPS, (last + 1) / FPS
        else:
            end = (last - first + 1) / FPS
            box = None  # a box in source-video pixels does not apply to the already-cropped mp4
    source = str(mp4.resolve()) if mp4 is not None else youtube_source(reference)
    return ClipRow(
        clip_id=f"voxceleb2_{identity}_{ytid}_{clip}",
        dataset="voxceleb2",
        source=source,
        start_s=start,
        end_s=end,
        face_box=box,
        identity=identity,
        attribution=f"{ATTRIBUTION}; youtube:{reference}",
    )


def parse_voxceleb2(src: Path) -> ParseResult:
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder (VoxCeleb2 is read from its idXXXXX/<video>/NNNNN layout)")
    meta = _read_meta(src)
    clips: dict[tuple[str, str, str], _Clip] = {}
    result = ParseResult()
    for path in sorted(src.rglob("*")):
        if path.suffix not in (".txt", ".mp4", ".m4a") or not path.is_file():
            continue
        rel = path.relative_to(src)
        if len(rel.parts) < 3 or not _ID.match(rel.parts[-3]):
            continue
        identity, ytid, clip = rel.parts[-3], rel.parts[-2], path.stem
        if not _CLIP.match(clip):
            result.error(str(rel), f"clip file name {path.name!r} is not NNNNN{path.suffix}")
            continue
        entry = clips.setdefault((identity, ytid, clip), _Clip())
        entry.files[path.suffix] = path
        entry.split = meta.get(identity) or _split_from_parts(rel.parts[:-3]) or entry.split
    for (identity, ytid, clip), entry in sorted(clips.items()):
        where = f"{identity}/{ytid}/{clip}"
        published = _PUBLISHED.get(entry.split) if entry.split else None
        result.add(where, lambda i=identity, y=ytid, c=clip, f=entry.files: _row(i, y, c, f), published)
    if not clips and not result.errors:
        raise ValueError(f"{src} holds no VoxCeleb2 clips (idXXXXX/<video id>/NNNNN.txt|mp4)")
    return result
