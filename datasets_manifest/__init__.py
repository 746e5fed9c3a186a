"""One parser per public dataset -> one normalised clip manifest (parquet, see schema.py)."""
from datasets_manifest.build import (
    DATASETS,
    PARSERS,
    ManifestBuild,
    ManifestSourceError,
    build_manifest,
    manifest_command,
    summary_text,
)
from datasets_manifest.records import ParseError, ParseResult
from datasets_manifest.splits import assign_splits
from datasets_manifest.summary import ManifestSummary, SplitStats, format_summary, summarize

__all__ = [
    "DATASETS",
    "PARSERS",
    "ManifestBuild",
    "ManifestSourceError",
    "ManifestSummary",
    "SplitStats",
    "ParseError",
    "ParseResult",
    "assign_splits",
    "build_manifest",
    "format_summary",
    "manifest_command",
    "summarize",
    "summary_text",
]
