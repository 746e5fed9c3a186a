"""Build one dataset's manifest: parse its published metadata, drop duplicates, assign splits, write parquet."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from datasets_manifest.celebvhq import parse_celebvhq
from datasets_manifest.hdtf import parse_hdtf
from datasets_manifest.mead import parse_mead
from datasets_manifest.panda70m import parse_panda70m
from datasets_manifest.records import ParseError, ParseResult
from datasets_manifest.samples import parse_samples
from datasets_manifest.schema import ClipRow, write_manifest
from datasets_manifest.splits import DEFAULT_FRACTIONS, assign_splits, check_fractions
from datasets_manifest.summary import format_summary, summarize
from datasets_manifest.talkvid import parse_talkvid
from datasets_manifest.vfhq import parse_vfhq
from datasets_manifest.voxceleb2 import parse_voxceleb2

Parser = Callable[[Path], ParseResult]

PARSERS: dict[str, Parser] = {
    "hdtf": parse_hdtf,
    "celebvhq": parse_celebvhq,
    "vfhq": parse_vfhq,
    "talkvid": parse_talkvid,
    "voxceleb2": parse_voxceleb2,
    "mead": parse_mead,
    "panda70m": parse_panda70m,
    "samples": parse_samples,
}
DATASETS: tuple[str, ...] = tuple(PARSERS)


class ManifestSourceError(ValueError):
    """The dataset source as a whole cannot be read (missing, unreadable, or not in the dataset's format)."""


@dataclass
class ManifestBuild:
    dataset: str
    rows: list[ClipRow]
    errors: list[ParseError] = field(default_factory=list)  # one per skipped record, with the reason
    notes: list[str] = field(default_factory=list)  # split decisions worth knowing (published-split conflicts)


def _check_source(dataset: str, src: Path) -> None:
    if not src.exists():
        raise ManifestSourceError(f"{dataset}: source {src} does not exist")
    if not os.access(src, os.R_OK) or (src.is_dir() and not os.access(src, os.X_OK)):
        raise ManifestSourceError(f"{dataset}: source {src} is not readable")


def build_manifest(
    dataset: str,
    src: str | Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> ManifestBuild:
    """Rows for one dataset with splits assigned; bad records are in `errors`, never raised.

    Raises ManifestSourceError when `src` itself is missing, unreadable or not the dataset's format, and
    ValueError for an unknown dataset name or bad split fractions.
    """
    if dataset not in PARSERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    fractions = check_fractions(split_fractions)
    src = Path(src)
    _check_source(dataset, src)
    try:
        parsed = PARSERS[dataset](src)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestSourceError(f"{dataset}: cannot read {src}: {exc}") from exc

    rows: list[ClipRow] = []
    errors = list(parsed.errors)
    seen: set[str] = set()
    for row in parsed.rows:
        if row.clip_id in seen:
            errors.append(ParseError(row.clip_id, f"duplicate clip_id {row.clip_id!r}: later record skipped"))
            continue
        seen.add(row.clip_id)
        rows.append(row)
    rows, notes = assign_splits(rows, dataset, seed=seed, split_fractions=fractions, published=parsed.published_splits)
    return ManifestBuild(dataset=dataset, rows=rows, errors=errors, notes=notes)


def summary_text(build: ManifestBuild, max_errors: int = 20) -> str:
    text = format_summary(summarize(build.rows, dataset=build.dataset, errors=len(build.errors), notes=build.notes))
    if build.errors:
        shown = build.errors[:max_errors]
        text += "\n\nskipped records:\n" + "\n".join(f"  {e}" for e in shown)
        if len(build.errors) > len(shown):
            text += f"\n  ... and {len(build.errors) - len(shown):,} more"
    return text


def manifest_command(dataset: str, src: str | Path, out: str | Path, seed: int = 0) -> str:
    """`dualforce manifest DATASET SRC -o OUT`: build, write the parquet atomically, return the summary."""
    build = build_manifest(dataset, src, seed=seed)
    path = write_manifest(build.rows, out)
    return f"wrote {len(build.rows):,} rows to {path}\n\n" + summary_text(build)
