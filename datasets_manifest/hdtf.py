"""HDTF (MRzzm/HDTF, `HDTF_dataset/`): per subset (RD, WDA, WRA) the published space-separated text files

    {S}_video_url.txt        `<video name> <youtube url>`           (WDA's file starts with a UTF-8 BOM)
    {S}_annotion_time.txt    `<video name>.mp4 MM:SS-MM:SS [MM:SS-MM:SS ...]`   one range per clip, index 0..
    {S}_crop_wh.txt          `<video name>_<clip index>.mp4 <x> <w> <y> <h>`  (README: min_width, width,
                             min_height, height; the HDTF download script crops `w:h:x:y`)
    {S}_resolution.txt       `<video name>.mp4 <height>`: the resolution the crop boxes refer to

Rows: `hdtf_<S>_<video>_<k>`, source `youtube:<id>`, [start, end] from the annotation, face box
[x, y, x+w, y+h] in the pixels of the video at the published resolution (None when the crop file has no
line for the clip). Identity: the video name without its trailing number for WDA/WRA (`AdamKinzinger1` ->
`AdamKinzinger`: one politician, several videos); RD names (`Radio12`) are kept whole, since the published
files do not say which radio videos share a host.
"""
from __future__ import annotations

import re
from pathlib import Path

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow
from datasets_manifest.sources import parse_clock, source_from_url

SUBSETS = ("RD", "WDA", "WRA")
ATTRIBUTION = "HDTF (MRzzm/HDTF), CC BY 4.0"


def _dataset_dir(src: Path) -> Path:
    if src.is_dir() and any((src / f"{s}_video_url.txt").exists() for s in SUBSETS):
        return src
    if (src / "HDTF_dataset").is_dir():
        return src / "HDTF_dataset"
    raise ValueError(f"{src} holds no HDTF metadata (expected RD/WDA/WRA_video_url.txt, or an HDTF_dataset/ folder)")


def _table(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a whitespace-separated file; BOM and blank lines tolerated."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.replace("\ufeff", "").split()
        if fields:
            out.append((n, fields))
    return out


def identity_of(subset: str, video: str) -> str:
    return video if subset == "RD" else (re.sub(r"\d+$", "", video) or video)


def _time_range(text: str) -> tuple[float, float]:
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"bad time range {text!r} (expected MM:SS-MM:SS)")
    start, end = parse_clock(parts[0]), parse_clock(parts[1])
    return start, end


def _crop_box(fields: list[str]) -> list[float]:
    if len(fields) != 4:
        raise ValueError(f"crop line needs 4 numbers (x w y h), got {fields}")
    x, w, y, h = (float(v) for v in fields)
    return [x, y, x + w, y + h]


def parse_hdtf(src: Path) -> ParseResult:
    root = _dataset_dir(src)
    result = ParseResult()
    for subset in SUBSETS:
        url_file = root / f"{subset}_video_url.txt"
        time_file = root / f"{subset}_annotion_time.txt"
        if not url_file.exists() and not time_file.exists():
            continue
        urls: dict[str, str] = {}
        for n, fields in _table(url_file):
            if len(fields) != 2:
                result.error(f"{url_file.name}:{n}", f"expected '<video name> <url>', got {len(fields)} fields")
                continue
            urls[fields[0]] = fields[1]
        crops: dict[str, tuple[int, list[str]]] = {}
        crop_file = root / f"{subset}_crop_wh.txt"
        for n, fields in _table(crop_file):
            crops[fields[0]] = (n, fields[1:])
        for n, fields in _table(time_file):
            where = f"{time_file.name}:{n}"
            video = fields[0].removesuffix(".mp4")
            if len(fields) < 2:
                result.error(where, f"video {video!r} has no time ranges")
                continue
            if video not in urls:
                result.error(where, f"video {video!r} has no line in {url_file.name}")
                continue
            for k, span in enumerate(fields[1:]):

                def make(video=video, k=k, span=span) -> ClipRow:
                    start, end = _time_range(span)
                    crop = crops.get(f"{video}_{k}.mp4")
                    if crop is not None:
                        try:
                            box = _crop_box(crop[1])
                        except ValueError as exc:
                            raise ValueError(f"{crop_file.name}:{crop[0]}: {exc}") from None
                    else:
                        box = None
                    source = source_from_url(urls[video])
                    return ClipRow(
                        clip_id=f"hdtf_{subset}_{video}_{k}",
                        dataset="hdtf",
                        source=source,
                        start_s=start,
                        end_s=end,
                        face_box=box,
                        identity=identity_of(subset, video),
                        attribution=f"{ATTRIBUTION}; {source}",
                    )

                result.add(f"{where} clip {k}", make)
    if not result.rows and not result.errors:
        raise ValueError(f"{root} has HDTF url files but no annotation (*_annotion_time.txt) lines")
    return result
