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

__all__ = [
    "DATASETS",
    "PARSERS",
    "ManifestBuild",
    "ManifestSourceError",
    "ParseError",
    "ParseResult",
    "build_manifest",
    "manifest_command",
    "summary_text",
]
