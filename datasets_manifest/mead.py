"""MEAD: local files in the released layout `<actor>/video/<view>/<emotion>/level_<n>/<NNN>.mp4`,
e.g. `M003/video/front/angry/level_1/001.mp4` (actors M/W + 3 digits; views front, down, top, left_30,
left_60, right_30, right_60; neutral has level_1 only). `src` is the folder holding the actor folders.

Rows: `mead_<actor>_<view>_<emotion>_level_<n>_<NNN>`, source = the mp4's absolute path, whole file
(end_s None: the duration is only known once probed), identity = actor. An mp4 that does not fit the
layout is reported, not guessed at.
"""
from __future__ import annotations

import re
from pathlib import Path

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow

ATTRIBUTION = "MEAD (uniBruce/Mead)"
VIEWS = ("front", "down", "top", "left_30", "left_60", "right_30", "right_60")
EMOTIONS = ("angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised")
_ACTOR = re.compile(r"^[MW]\d{3}$")
_LEVEL = re.compile(r"^level_[1-3]$")
_CLIP = re.compile(r"^\d{3}$")


def _row(src: Path, path: Path) -> ClipRow:
    rel = path.relative_to(src)
    parts = rel.parts
    if len(parts) < 6 or parts[-5] != "video":
        raise ValueError("expected <actor>/video/<view>/<emotion>/level_<n>/<NNN>.mp4")
    actor, _, view, emotion, level, name = parts[-6:]
    problems = []
    if not _ACTOR.match(actor):
        problems.append(f"actor {actor!r} is not M/W + 3 digits")
    if view not in VIEWS:
        problems.append(f"view {view!r} is not one of {VIEWS}")
    if emotion not in EMOTIONS:
        problems.append(f"emotion {emotion!r} is not one of {EMOTIONS}")
    if not _LEVEL.match(level):
        problems.append(f"level {level!r} is not level_1..level_3")
    if not _CLIP.match(path.stem):
        problems.append(f"clip name {name!r} is not NNN.mp4")
    if problems:
        raise ValueError("; ".join(problems))
    return ClipRow(
        clip_id=f"mead_{actor}_{view}_{emotion}_{level}_{path.stem}",
        dataset="mead",
        source=str(path.resolve()),
        identity=actor,
        attribution=ATTRIBUTION,
    )


def parse_mead(src: Path) -> ParseResult:
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder (MEAD is read from <actor>/video/<view>/<emotion>/level_n/)")
    files = sorted(p for p in src.rglob("*.mp4") if p.is_file())
    if not files:
        raise ValueError(f"{src} holds no MEAD videos (*.mp4)")
    result = ParseResult()
    for path in files:
        result.add(str(path.relative_to(src)), lambda p=path: _row(src, p))
    return result
