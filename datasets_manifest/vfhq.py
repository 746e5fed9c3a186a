"""VFHQ: one meta text file per clip, named `Clip+<youtube id>+P<person>+C<clip>+F<first>-<last>.txt`, with

    Video ID: <youtube id>       (header lines `key: value`; the VFHQ tools read H, W, FPS and CROP)
    H: 720
    W: 1280
    FPS: 25
    CROP: x0 y0 x1 y1            face crop box in pixels of the H x W video
    FRAME INDEX LANDMARKS ...    then one line per frame: frame index followed by landmark coordinates

Times follow the VFHQ tools: the clip spans frames first+1 .. last-1 of the source, so
start = (first+1)/FPS, end = (last-1)/FPS. Identity: `<youtube id>_P<person>` (persons are numbered per
video). The box is in the pixels of the H x W rendition named in the file.
"""
from __future__ import annotations

import re
from pathlib import Path

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow
from datasets_manifest.sources import youtube_source

ATTRIBUTION = "VFHQ (non-commercial research use only)"
_NAME = re.compile(r"^Clip\+(?P<vid>[A-Za-z0-9_-]{11})\+P(?P<pid>\d+)\+C(?P<cid>\d+)\+F(?P<first>\d+)-(?P<last>\d+)$")
_HEADER = re.compile(r"^(?P<key>[A-Za-z][A-Za-z ]*?)\s*:\s*(?P<value>.*)$")


def _read_meta(path: Path) -> tuple[dict[str, str], int]:
    """Header fields (upper-cased keys) and the number of per-frame landmark lines."""
    header: dict[str, str] = {}
    frames = 0
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line:
            continue
        if line[0].isdigit():
            frames += 1
            continue
        m = _HEADER.match(line)
        if m:
            header[m.group("key").strip().upper()] = m.group("value").strip()
    return header, frames


def _clip_row(path: Path) -> ClipRow:
    m = _NAME.match(path.stem)
    if not m:
        raise ValueError(f"file name {path.name!r} is not Clip+<video id>+P<n>+C<n>+F<first>-<last>.txt")
    header, frames = _read_meta(path)
    for key in ("H", "W", "FPS", "CROP"):
        if key not in header:
            raise ValueError(f"missing header line {key!r}")
    fps = float(header["FPS"])
    height, width = int(header["H"]), int(header["W"])
    if fps <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"FPS, H and W must be positive, got FPS={fps} H={height} W={width}")
    crop = header["CROP"].split()
    if len(crop) != 4:
        raise ValueError(f"CROP needs 4 numbers x0 y0 x1 y1, got {header['CROP']!r}")
    x0, y0, x1, y1 = (float(v) for v in crop)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"CROP {header['CROP']!r} is not inside the {width}x{height} frame")
    video_header = header.get("VIDEO ID") or header.get("VIDEO")
    if video_header and video_header != m.group("vid"):
        raise ValueError(f"header video id {video_header!r} differs from file name id {m.group('vid')!r}")
    if frames == 0:
        raise ValueError("no per-frame landmark lines")
    first, last = int(m.group("first")) + 1, int(m.group("last")) - 1
    source = youtube_source(m.group("vid"))
    return ClipRow(
        clip_id=f"vfhq_{m.group('vid')}_P{m.group('pid')}_C{m.group('cid')}",
        dataset="vfhq",
        source=source,
        start_s=first / fps,
        end_s=last / fps,
        face_box=[x0, y0, x1, y1],
        identity=f"{m.group('vid')}_P{m.group('pid')}",
        attribution=f"{ATTRIBUTION}; {source}",
    )


def parse_vfhq(src: Path) -> ParseResult:
    files = [src] if src.is_file() else sorted(src.rglob("*.txt"))
    if not files:
        raise ValueError(f"{src} holds no VFHQ meta files (*.txt)")
    result = ParseResult()
    for path in files:
        result.add(str(path.relative_to(src) if src.is_dir() else path.name), lambda p=path: _clip_row(p))
    return result
