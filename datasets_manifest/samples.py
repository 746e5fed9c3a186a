"""The project's sample clips (`../shared/samples`): every *.mp4 directly in the folder (not `more/`).

Rows: `samples_<stem>`, identity = file stem, source = absolute path, [0, probed duration]. Attribution is
the matching row of ATTRIBUTION.md (`| file | from | licence | what |`) when that file lists the clip.
A file ffmpeg cannot read is reported, not fatal.
"""
from __future__ import annotations

from pathlib import Path

from datasets_manifest.media_probe import MediaError, probe
from datasets_manifest.records import ParseResult
from datasets_manifest.schema import ClipRow

ATTRIBUTION_FILE = "ATTRIBUTION.md"


def read_attributions(folder: Path) -> dict[str, str]:
    """file name -> 'from (licence)' from the markdown table in ATTRIBUTION.md; {} when absent."""
    path = folder / ATTRIBUTION_FILE
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].endswith(".mp4"):
            out[cells[0]] = f"{cells[1]} ({cells[2]})"
    return out


def _row(path: Path, attributions: dict[str, str]) -> ClipRow:
    try:
        info = probe(path)
    except MediaError as exc:
        raise ValueError(str(exc)) from None
    if not info.has_video or info.duration_s <= 0:
        raise ValueError(f"no video stream or zero duration (duration {info.duration_s} s)")
    return ClipRow(
        clip_id=f"samples_{path.stem}",
        dataset="samples",
        source=str(path.resolve()),
        start_s=0.0,
        end_s=info.duration_s,
        identity=path.stem,
        attribution=attributions.get(path.name, ""),
    )


def parse_samples(src: Path) -> ParseResult:
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder of sample clips")
    files = sorted(p for p in src.glob("*.mp4") if p.is_file())
    if not files:
        raise ValueError(f"{src} holds no *.mp4 clips at its top level")
    attributions = read_attributions(src)
    result = ParseResult()
    for path in files:
        result.add(path.name, lambda p=path: _row(p, attributions))
    return result
