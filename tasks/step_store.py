"""Where step outputs live, and how a step knows its work for a clip is already done.

Layout: <root>/<step>/<clip_id>/ holds the step's files and `_status.json`, written last. A clip's step is
done when its status file carries the same cache key; the key hashes the step's version, its config and the
checksums of the upstream outputs it read, so bumping one step's version (or changing what feeds it)
recomputes that step and whatever depends on it, nothing else. Outputs are built in a temporary sibling
directory and renamed into place, so a killed run leaves no half-written step output.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tasks import storage

STATUS_FILE = "_status.json"


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (dataclasses via asdict)."""
    norm = [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dir_checksum(path: Path) -> str:
    """sha256 over the names and bytes of every file in a directory (status file excluded)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != STATUS_FILE):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class StepRecord:
    clip_id: str
    step: str
    status: str  # ok | rejected | failed
    key: str
    version: str
    reason: str = ""
    detail: str = ""
    checksum: str = ""
    seconds: float = 0.0
    finished_at: float = field(default_factory=time.time)
    info: dict = field(default_factory=dict)


class StepStore:
    def __init__(self, root: str | Path):
        local = storage.local_path(root)  # a plain path or file:// URL; ffmpeg and the models need real files
        if local is None:
            raise ValueError(f"step outputs need a local or shared folder, got {root}")
        self.root = local

    def clip_dir(self, step: str, clip_id: str) -> Path:
        return self.root / step / clip_id

    def load(self, step: str, clip_id: str) -> Optional[StepRecord]:
        f = self.clip_dir(step, clip_id) / STATUS_FILE
        if not f.exists():
            return None
        try:
            return StepRecord(**json.loads(f.read_text()))
        except (ValueError, TypeError):
            return None  # a damaged status file means: not done

    def staging_dir(self, step: str, clip_id: str) -> Path:
        d = self.root / step / f".{clip_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def commit(self, staging: Path, record: StepRecord) -> StepRecord:
        """Write the status into the staging dir and swap it into place."""
        if record.status == "ok":
            record.checksum = dir_checksum(staging)
        (staging / STATUS_FILE).write_text(json.dumps(asdict(record), indent=1, default=str))
        final = self.clip_dir(record.step, record.clip_id)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(final)
        return record

    def clean_staging(self) -> int:
        """Remove leftovers of killed runs (temporary and superseded dirs)."""
        n = 0
        if not self.root.exists():
            return 0
        for step_dir in self.root.iterdir():
            if step_dir.is_dir():
                for d in step_dir.glob(".*.tmp-*"):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
                for d in step_dir.glob(".*.old-*"):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
        return n
