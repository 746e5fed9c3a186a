"""TalkVid (FreedomIntelligence/TalkVid): JSON metadata, a list of clip objects (or JSON Lines, one per line):

    {"id": "videovideoTr6MMsoWAog-scene1-scene1", "height": 1080, "width": 1920, "fps": 24.0,
     "start-time": 0.1, "start-frame": 0, "end-time": 5.14, "end-frame": 121, "durations": "5.042s",
     "info": {"Person ID": "597", "Video Link": "https://www.youtube.com/watch?v=Tr6MMsoWAog", ...}, ...}

Rows: `talkvid_<id>`, source from "Video Link" (`youtube:<id>` for YouTube), [start-time, end-time],
identity "Person ID" (TalkVid numbers its 7,729 speakers across videos). No face box is published.
`src` is a .json / .jsonl file or a folder of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow
from datasets_manifest.sources import source_from_url

ATTRIBUTION = "TalkVid (FreedomIntelligence/TalkVid)"


def _records(path: Path, result: ParseResult) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                result.error(f"{path.name}:{n}", f"invalid JSON line: {exc.msg}")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a list of clip objects")
    for i, rec in enumerate(data):
        yield f"{path.name}#{i}", rec


def _row(rec: Any) -> ClipRow:
    if not isinstance(rec, dict):
        raise ValueError(f"clip record must be an object, got {type(rec).__name__}")
    info = rec["info"]
    if not isinstance(info, dict):
        raise ValueError("'info' must be an object")
    person = str(info["Person ID"]).strip()
    if not person:
        raise ValueError("empty 'Person ID'")
    source = source_from_url(str(info["Video Link"]))
    return ClipRow(
        clip_id=f"talkvid_{rec['id']}",
        dataset="talkvid",
        source=source,
        start_s=float(rec["start-time"]),
        end_s=float(rec["end-time"]),
        identity=person,
        attribution=f"{ATTRIBUTION}; {source}",
    )


def parse_talkvid(src: Path) -> ParseResult:
    files = [src] if src.is_file() else sorted([*src.rglob("*.json"), *src.rglob("*.jsonl")])
    if not files:
        raise ValueError(f"{src} holds no TalkVid metadata (*.json / *.jsonl)")
    result = ParseResult()
    for path in files:
        try:
            for where, rec in _records(path, result):
                result.add(where, lambda r=rec: _row(r))
        except (OSError, ValueError) as exc:
            if len(files) == 1:
                raise
            result.error(path.name, str(exc))  # one broken file in a folder does not sink the others
    return result
