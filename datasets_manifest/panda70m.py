"""Panda-70M (snap-research/Panda-70M) csv: `videoID,url,timestamp,caption,matching_score[,...]` where
timestamp is a Python-literal list of ['H:MM:SS.fff', 'H:MM:SS.fff'] pairs, one per clip, caption and
matching_score lists of the same length. Read with ast.literal_eval (literals only, never eval).

Rows: `panda70m_<videoID>_<k>` (k = index in the list, as the release names clips), source from url,
identity = videoID (Panda-70M has no person ids). Published splits are honoured from the file name:
`*validation*` -> val, `*test*` -> test, `*train*` -> train (the release keeps these source videos apart).
`src` is one csv or a folder of them.
"""
from __future__ import annotations

import ast
import csv
import re
from pathlib import Path
from typing import Optional

from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow
from datasets_manifest.sources import parse_clock, source_from_url

ATTRIBUTION = "Panda-70M (snap-research/Panda-70M, non-commercial research use)"
REQUIRED_COLUMNS = ("videoID", "url", "timestamp")


_SPLIT_WORDS = {"validation": "val", "val": "val", "testing": "test", "test": "test",
                "training": "train", "train": "train"}


def published_split_of(path: Path) -> Optional[tuple[str, ...]]:
    """The split a Panda-70M csv name announces (panda70m_validation.csv -> ("val",)); None if it names none."""
    for word in re.split(r"[^a-z]+", path.stem.lower()):
        if word in _SPLIT_WORDS:
            return (_SPLIT_WORDS[word],)
    return None


def _spans(text: str) -> list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"timestamp is not a list literal: {text[:80]!r}") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"timestamp must be a non-empty list of [start, end] pairs, got {text[:80]!r}")
    return list(value)


def _clip(video_id: str, url: str, k: int, span) -> ClipRow:
    if not isinstance(span, (list, tuple)) or len(span) != 2:
        raise ValueError(f"expected [start, end], got {span!r}")
    start, end = (parse_clock(s) if isinstance(s, str) else float(s) for s in span)
    source = source_from_url(url)
    return ClipRow(
        clip_id=f"panda70m_{video_id}_{k}",
        dataset="panda70m",
        source=source,
        start_s=start,
        end_s=end,
        identity=video_id,
        attribution=f"{ATTRIBUTION}; {source}",
    )


def _parse_csv(path: Path, result: ParseResult) -> None:
    published = published_split_of(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks Panda-70M columns {missing} (header: {reader.fieldnames})")
        for rec in reader:
            where = f"{path.name}:{reader.line_num}"
            video_id = (rec.get("videoID") or "").strip()
            url = (rec.get("url") or "").strip()
            if not video_id or not url:
                result.error(where, "empty videoID or url")
                continue
            try:
                spans = _spans(rec.get("timestamp") or "")
            except ValueError as exc:
                result.error(where, str(exc))
                continue
            for k, span in enumerate(spans):
                result.add(f"{where} clip {k}", lambda k=k, span=span: _clip(video_id, url, k, span), published)


def parse_panda70m(src: Path) -> ParseResult:
    files = [src] if src.is_file() else sorted(src.rglob("*.csv"))
    if not files:
        raise ValueError(f"{src} holds no Panda-70M csv files")
    result = ParseResult()
    for path in files:
        try:
            _parse_csv(path, result)
        except (OSError, ValueError, csv.Error) as exc:
            if len(files) == 1:
                raise
            result.error(path.name, str(exc))  # one broken csv in a folder does not sink the others
    return result
