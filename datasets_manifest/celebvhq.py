"""CelebV-HQ (CelebV-HQ/CelebV-HQ, `celebvhq_info.json`):

    {"meta_info": {...}, "clips": {"<ytb_id>_<k>": {"ytb_id": ..., "duration": {"start_sec", "end_sec"},
                                                   "bbox": {"top", "bottom", "left", "right"},
                                                   "attributes": {...}, "version": "v0.1"}}}

The published bbox is NORMALISED to 0..1 of the source frame (the dataset's own download_and_process.py
multiplies it by the frame height/width after download), so it cannot become a pixel `face_box` before the
source is fetched: rows carry face_box=None and the crop step detects the face itself. The box is still
checked (inside 0..1, top < bottom, left < right) so broken records are reported.

Identity: the JSON has no person ids; the YouTube id stands in for one (clips of one upload share a
speaker). The same celebrity in two uploads is therefore two identities: a known limit of this dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow
from datasets_manifest.sources import youtube_source

INFO_FILE = "celebvhq_info.json"
ATTRIBUTION = "CelebV-HQ (non-commercial research use only)"


def _info_path(src: Path) -> Path:
    return src / INFO_FILE if src.is_dir() else src


def _check_normalised_bbox(bbox: dict) -> None:
    top, bottom, left, right = (float(bbox[k]) for k in ("top", "bottom", "left", "right"))
    if not all(0.0 <= v <= 1.0 for v in (top, bottom, left, right)):
        raise ValueError(f"bbox values must be normalised to 0..1, got {bbox}")
    if not (top < bottom and left < right):
        raise ValueError(f"bbox must have top < bottom and left < right, got {bbox}")


def parse_celebvhq(src: Path) -> ParseResult:
    path = _info_path(src)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    clips = data.get("clips") if isinstance(data, dict) else None
    if not isinstance(clips, dict):
        raise ValueError(f"{path} has no 'clips' object (is it celebvhq_info.json?)")
    result = ParseResult()
    for key, rec in clips.items():

        def make(key=key, rec=rec) -> ClipRow:
            if not isinstance(rec, dict):
                raise ValueError(f"clip record must be an object, got {type(rec).__name__}")
            ytb = str(rec["ytb_id"])
            dur = rec["duration"]
            _check_normalised_bbox(rec["bbox"])
            source = youtube_source(ytb)
            return ClipRow(
                clip_id=f"celebvhq_{key}",
                dataset="celebvhq",
                source=source,
                start_s=float(dur["start_sec"]),
                end_s=float(dur["end_sec"]),
                face_box=None,
                identity=ytb,
                attribution=f"{ATTRIBUTION}; {source}",
            )

        result.add(f"{path.name}#{key}", make)
    return result
