"""Run one preprocessing step over a batch of clips: skip what is done, record what happened.

A step is any object with `name`, `version`, `requires`, `fingerprint()` and
`run(row, inputs, out_dir) -> info`, optionally `row_fields(row) -> dict`: the manifest fields it reads. The
cache key hashes the step's version and config, those fields and the checksums of the upstream outputs, so
fixing a manifest row recomputes what read it, and what depends on that, nothing else.

Per-clip failures never escape: ClipRejected becomes a cached `rejected` record (re-runs skip it until the
step's key changes, or `retry_rejected`); ClipRetryable (a transient failure: network, timeout) becomes a
`retryable` record and any other exception a `failed` one, both retried by the next run. So is an upstream
output that cannot be read back intact (a remote store's checksum mismatch: reason `corrupt_input`). A clip's
materialised inputs are released once its step ran, so a remote store's scratch holds only the clips in flight.
"""
from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from datasets_manifest.schema import ClipRow
from tasks.errors import ClipRejected, ClipRetryable
from tasks.step_store import StepOutputCorrupt, StepRecord, StepStore, fingerprint


class Step(Protocol):
    name: str
    version: str
    requires: tuple[str, ...]

    def fingerprint(self) -> str: ...

    def row_fields(self, row: ClipRow) -> dict: ...  # optional: steps without it read no manifest field

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict: ...


@dataclass
class ClipState:
    """A clip and what each step did to it so far (in this run or a cached earlier one)."""

    row: ClipRow
    records: dict[str, StepRecord] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return all(r.status == "ok" for r in self.records.values())

    @property
    def failure(self) -> Optional[StepRecord]:
        return next((r for r in self.records.values() if r.status != "ok"), None)


@dataclass(kw_only=True)
class LedgerEntry:
    """One clip's outcome at one step (one ledger row); built by keyword: thirteen fields are easy to misplace."""

    clip_id: str
    dataset: str
    step: str
    status: str  # ok | rejected | retryable | failed
    action: str  # ran | skipped (cached result reused)
    reason: str
    detail: str
    version: str
    key: str
    checksum: str
    seconds: float
    run_id: str
    finished_at: float


def step_key(step: Step, upstream: list[StepRecord], row: Optional[ClipRow] = None,
             step_fingerprint: Optional[str] = None) -> str:
    """`step_fingerprint`: step.fingerprint(), computed once by a caller keying many clips (the config hash was
    a third of a 10,000-row stale scan's time)."""
    config_print = step.fingerprint() if step_fingerprint is None else step_fingerprint
    parts = [step.name, step.version, config_print, [(r.step, r.checksum) for r in upstream]]
    fields = step.row_fields(row) if row is not None and hasattr(step, "row_fields") else {}
    if fields:  # only then: the keys of steps that read no manifest field stay what they were
        parts.append(fields)
    return fingerprint(*parts)


SCAN_CHUNK = 4096  # clips whose status files a stale scan holds at once


def stale_scan(steps: list[Step], rows: list[ClipRow], store: StepStore) -> list[dict]:
    """Before a run (a backfill), per step: how many clips' stored results are `current` (stored under the key this
    run would compute), `stale` (the step's version, config or manifest fields changed since), `behind_stale`
    (downstream of a stale result: recomputed when that one's output changes) or `missing`. Reads status files
    only (a chunk of clips at a time, through StepStore.load_many), keyed the way run_step keys them."""
    counts = {step.name: {"current": 0, "stale": 0, "behind_stale": 0, "missing": 0} for step in steps}
    prints = {step.name: step.fingerprint() for step in steps}
    for start in range(0, len(rows), SCAN_CHUNK):
        chunk = rows[start:start + SCAN_CHUNK]
        ids = [row.clip_id for row in chunk]
        stored = {step.name: store.load_many(step.name, ids) for step in steps}
        for i, row in enumerate(chunk):
            _scan_clip(steps, row, {name: recs[i] for name, recs in stored.items()}, prints, counts)
    return [{"step": step.name, "version": step.version, **counts[step.name]} for step in steps]


def _scan_clip(steps: list[Step], row: ClipRow, stored: dict[str, Optional[StepRecord]], prints: dict[str, str],
               counts: dict[str, dict[str, int]]) -> None:
    """One clip's verdict per step, from its stored records, counted into `counts`."""
    done: dict[str, StepRecord] = {}
    stale: set[str] = set()
    for step in steps:
        rec = stored[step.name]
        if rec is None or any(r not in done and r not in stale for r in step.requires):
            state = "missing"
        elif any(r in stale for r in step.requires):
            state = "behind_stale"
        else:
            key = step_key(step, [done[r] for r in step.requires], row, prints[step.name])
            state = "current" if rec.key == key else "stale"
        if state in ("stale", "behind_stale"):
            stale.add(step.name)
        if rec is not None and rec.status == "ok":
            done[step.name] = rec
        counts[step.name][state] += 1


def run_step(
    step: Step,
    states: list[ClipState],
    store: StepStore,
    run_id: str,
    on_clip: Optional[Callable[[ClipState, LedgerEntry], None]] = None,
    retry_rejected: bool = False,
) -> list[LedgerEntry]:
    """Advance every alive clip in `states` through `step` (in place); returns the ledger entries.

    `retry_rejected`: run clips whose cached record is a rejection again (e.g. after fixing what rejected them).
    """
    reusable = ("ok",) if retry_rejected else ("ok", "rejected")
    config_print = step.fingerprint()  # one per batch, as stale_scan keys them
    entries: list[LedgerEntry] = []
    for state in states:
        if not state.alive:
            continue
        row = state.row
        missing = [r for r in step.requires if r not in state.records]
        if missing:
            rec = StepRecord(row.clip_id, step.name, "failed", "", step.version, "missing_input",
                             f"upstream steps {missing} have no result")
            action = "ran"
        else:
            upstream = [state.records[r] for r in step.requires]
            key = step_key(step, upstream, row, config_print)
            cached = store.load(step.name, row.clip_id)
            if cached is not None and cached.key == key and cached.status in reusable:
                rec, action = cached, "skipped"
            else:
                try:
                    rec, action = _execute(step, row, upstream, key, store), "ran"
                finally:
                    store.release(row.clip_id)
        state.records[step.name] = rec
        entry = LedgerEntry(
            clip_id=row.clip_id, dataset=row.dataset, step=step.name, status=rec.status, action=action,
            reason=rec.reason, detail=rec.detail, version=rec.version, key=rec.key, checksum=rec.checksum,
            seconds=rec.seconds if action == "ran" else 0.0, run_id=run_id, finished_at=time.time(),
        )
        entries.append(entry)
        if on_clip:
            on_clip(state, entry)
    return entries


def _execute(step: Step, row: ClipRow, upstream: list[StepRecord], key: str, store: StepStore) -> StepRecord:
    t0 = time.perf_counter()
    rec = StepRecord(row.clip_id, step.name, "ok", key, step.version)
    try:
        inputs = {r.step: store.clip_dir(r.step, row.clip_id) for r in upstream}
    except Exception as exc:  # an upstream output that cannot be read back: this clip fails, the batch goes on
        rec.status, rec.reason = "failed", "corrupt_input" if isinstance(exc, StepOutputCorrupt) else "error"
        rec.detail = f"{type(exc).__name__}: {exc}"
        rec.seconds = time.perf_counter() - t0
        return rec
    staging = store.staging_dir(step.name, row.clip_id)
    try:
        rec.info = step.run(row, inputs, staging) or {}
    except ClipRejected as exc:  # ClipRetryable included: its status keeps the next run from reusing it
        rec.status = "retryable" if isinstance(exc, ClipRetryable) else "rejected"
        rec.reason, rec.detail, rec.info = exc.reason, exc.detail, exc.info
    except Exception as exc:  # an unexpected bug or environment problem: recorded, retried next run
        rec.status, rec.reason = "failed", "error"
        rec.detail = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-2].strip()}"
    rec.seconds = time.perf_counter() - t0
    if rec.status == "failed":
        shutil.rmtree(staging, ignore_errors=True)
        return rec
    if rec.status in ("rejected", "retryable"):
        for f in staging.iterdir():  # keep only the status: a rejection has no outputs
            f.unlink() if f.is_file() else None
    try:
        return store.commit(staging, rec)
    except Exception as exc:  # e.g. an object store dropping the upload: recorded, retried next run
        shutil.rmtree(staging, ignore_errors=True)
        rec.status, rec.reason, rec.detail = "failed", "publish_failed", f"{type(exc).__name__}: {exc}"
        return rec
