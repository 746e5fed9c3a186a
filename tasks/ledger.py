"""The per-clip ledger: one parquet part per run (append-only, safe for concurrent workers) and a merged view.

`root` is a local path or any fsspec URL (file://, s3://, memory://); a part appears whole or not at all.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.step_runner import LedgerEntry

LEDGER_DIR = "ledger"
LEDGER_SCHEMA = pa.schema(
    [(f.name, pa.float64() if f.type in ("float", float) else pa.string()) for f in fields(LedgerEntry)]
)


def write_ledger_part(root: str | Path, entries: Iterable[LedgerEntry], part: str) -> str:
    fs, base = storage.filesystem(root)
    rows = [asdict(e) for e in entries]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), buf)
    path = storage.join(base, LEDGER_DIR, f"{part}.parquet")
    storage.write_bytes(fs, path, buf.getvalue())
    return path


def read_ledger(root: str | Path) -> pa.Table:
    fs, base = storage.filesystem(root)
    d = storage.join(base, LEDGER_DIR)
    parts = sorted(p for p in fs.glob(storage.join(d, "*.parquet")) if not storage.is_tmp(p)) if fs.exists(d) else []
    if not parts:
        return LEDGER_SCHEMA.empty_table()
    tables = [pq.read_table(io.BytesIO(fs.cat_file(p)), schema=LEDGER_SCHEMA) for p in parts]
    return pa.concat_tables(tables).sort_by([("finished_at", "ascending")])


def latest_status(root: str | Path) -> dict[tuple[str, str], dict]:
    """(clip_id, step) -> the most recent ledger row."""
    out: dict[tuple[str, str], dict] = {}
    for row in read_ledger(root).to_pylist():
        out[(row["clip_id"], row["step"])] = row
    return out


def step_counts(entries: Iterable[LedgerEntry]) -> list[dict]:
    """Per step: clips ok / rejected / retryable / failed / skipped (cached), seconds, and the reasons."""
    by_step: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    seconds: dict[str, float] = defaultdict(float)
    order: list[str] = []
    for e in entries:
        if e.step not in by_step:
            order.append(e.step)
        by_step[e.step][e.status] += 1
        if e.action == "skipped":
            by_step[e.step]["skipped"] += 1
        if e.status != "ok":
            reasons[e.step][e.reason] += 1
        seconds[e.step] += e.seconds
    return [
        {
            "step": s,
            "ok": by_step[s]["ok"],
            "rejected": by_step[s]["rejected"],
            "retryable": by_step[s]["retryable"],
            "failed": by_step[s]["failed"],
            "skipped": by_step[s]["skipped"],
            "seconds": round(seconds[s], 2),
            "reasons": ", ".join(f"{r}×{n}" for r, n in reasons[s].most_common()),
        }
        for s in order
    ]
