"""The normalised clip manifest: one row per clip, whatever dataset it came from."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator, model_validator

SPLITS = ("train", "val", "test")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


MAX_ID_CHARS = 180
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def sanitize_clip_id(raw: str) -> str:
    """A clip id safe as a file name and a webdataset key (no '/', no '.' runs, no shell metacharacters).

    Webdataset splits keys at the first '.', so dots become '-' too. Whenever cleaning or truncating changes
    the id, "-" and 10 hex digits of the original's sha256 are appended, so ids that differ only in what
    was removed ("a/b" and "a_b", two long ids sharing 180 characters) stay distinct. Idempotent: a
    sanitised id comes back unchanged.
    """
    cleaned = _UNSAFE.sub("_", raw.strip()).replace(".", "-").strip("_-")
    if not cleaned:
        raise ValueError(f"clip id {raw!r} has no usable characters")
    if cleaned == raw and len(raw) <= MAX_ID_CHARS:
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[: MAX_ID_CHARS - 11].rstrip('_-')}-{digest}"


def validate_dataset_name(name: str) -> str:
    """Dataset names become a folder under the output root and a field of every sample's meta.json."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise ValueError(f"dataset name must be 1-64 letters, digits, '_' or '-' (starting with a letter or "
                         f"digit), got {str(name)[:80]!r}")
    return name


class ClipRow(BaseModel):
    """One clip of one dataset. `source` is a local path, file:// / http(s) / fsspec URL, or `youtube:<id>`."""

    clip_id: str
    dataset: str
    source: str
    start_s: float = 0.0
    end_s: Optional[float] = None  # None: to the end of the source
    face_box: Optional[list[float]] = Field(default=None, description="x0, y0, x1, y1 in source pixels")
    identity: str
    split: str = "train"
    attribution: str = ""

    @field_validator("clip_id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return sanitize_clip_id(v)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_name(v)

    @field_validator("split")
    @classmethod
    def _known_split(cls, v: str) -> str:
        if v not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {v!r}")
        return v

    @field_validator("face_box")
    @classmethod
    def _box(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is None:
            return v
        if len(v) != 4 or not all(math.isfinite(x) for x in v) or not (v[2] > v[0] and v[3] > v[1]):
            raise ValueError(f"face_box must be x0,y0,x1,y1 with x1>x0, y1>y0; got {v}")
        return [float(x) for x in v]

    @model_validator(mode="after")
    def _times(self) -> "ClipRow":
        for name in ("start_s", "end_s"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds, got {value}")
        if self.start_s < 0:
            raise ValueError(f"start_s must be >= 0, got {self.start_s}")
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        return self

    @property
    def duration_s(self) -> Optional[float]:
        return None if self.end_s is None else self.end_s - self.start_s


MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("face_box", pa.list_(pa.float64(), 4)),
        ("identity", pa.string()),
        ("split", pa.string()),
        ("attribution", pa.string()),
    ]
)


def rows_to_table(rows: Iterable[ClipRow]) -> pa.Table:
    rows = list(rows)
    cols = {name: [getattr(r, name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA)


def write_manifest(rows: Iterable[ClipRow], path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a killed run never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(rows_to_table(rows), tmp)
    tmp.replace(path)
    return path


class ManifestRowError(ValueError):
    def __init__(self, index: int, reason: str):
        super().__init__(f"manifest row {index}: {reason}")
        self.index = index
        self.reason = reason


def read_manifest(path: str | Path) -> tuple[list[ClipRow], list[ManifestRowError]]:
    """Rows that validate, plus one error per malformed row (never raises for a single bad row)."""
    table = pq.read_table(path)
    good: list[ClipRow] = []
    bad: list[ManifestRowError] = []
    seen: dict[str, int] = {}  # clip id -> the row that first had it
    for i, rec in enumerate(table.to_pylist()):
        try:
            row = ClipRow(**{k: v for k, v in rec.items() if v is not None or k in ("end_s", "face_box")})
        except Exception as exc:  # pydantic ValidationError and friends
            bad.append(ManifestRowError(i, str(exc).replace("\n", " ")))
            continue
        if row.clip_id in seen:
            first = seen[row.clip_id]
            bad.append(ManifestRowError(i, f"duplicate clip_id {row.clip_id!r}: row {first} has it too "
                                           f"({rec.get('clip_id')!r} here, {table['clip_id'][first].as_py()!r} there)"))
            continue
        seen[row.clip_id] = i
        good.append(row)
    return good, bad
