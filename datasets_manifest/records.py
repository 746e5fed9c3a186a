"""What a dataset parser hands back: validated rows, per-record errors, and the splits a dataset publishes.

A parser never raises for one bad record: it records a `ParseError` saying where and why, and goes on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from pydantic import ValidationError

from datasets_manifest.schema import SPLITS, ClipRow


@dataclass(frozen=True)
class ParseError:
    """One record that could not become a clip row. `where` is file[:line] or file#record-key."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def describe_error(exc: BaseException) -> str:
    """A one-line reason, readable in a ledger (pydantic's multi-line reports flattened to field: message)."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ())) or "record"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return "; ".join(parts)
    if isinstance(exc, OSError):
        return f"cannot read {exc.filename or 'file'}: {exc.strerror or exc}"
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args else "missing field"
    return str(exc).replace("\n", " ") or type(exc).__name__


@dataclass
class ParseResult:
    rows: list[ClipRow] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)
    # clip_id -> the splits the dataset's own release allows for it (e.g. VoxCeleb2 test -> ("test",)).
    published_splits: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def add(
        self,
        where: str,
        make: Callable[[], ClipRow],
        published: Optional[tuple[str, ...]] = None,
    ) -> Optional[ClipRow]:
        """Build one row; a bad record (ValueError/KeyError/TypeError/IndexError, or an unreadable per-record
        file: OSError) becomes a ParseError."""
        try:
            row = make()
        except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:  # ValidationError is a ValueError
            self.error(where, describe_error(exc))
            return None
        if published is not None:
            unknown = [s for s in published if s not in SPLITS]
            if unknown or not published:
                raise ValueError(f"published splits must be a non-empty subset of {SPLITS}, got {published}")
            self.published_splits[row.clip_id] = tuple(published)
        self.rows.append(row)
        return row

    def error(self, where: str, reason: str) -> None:
        self.errors.append(ParseError(where, reason))

    def extend(self, other: "ParseResult") -> None:
        self.rows.extend(other.rows)
        self.errors.extend(other.errors)
        self.published_splits.update(other.published_splits)
