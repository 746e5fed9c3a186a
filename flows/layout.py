"""Where a dataset's preprocessing outputs live under an output root.

The output root (shards, ledger, gate reports) and the per-step outputs are local folders or any fsspec URL:
`file:///data/out`, a shared filesystem path, `s3://bucket/prefix`. Step outputs go under `work_root` when
given, else under the output root. A remote step root needs no shared filesystem: each worker builds a step's
files in a local scratch folder and uploads them, and fetches (and checksums) the upstream files it reads
(tasks/step_store.py). The download cache is always a local folder (ffmpeg reads it): `<work root>/_download_cache`
when the work root is local, else `<scratch_root>/_download_cache` (scratch_root defaults to
tasks.step_store.default_scratch_base(), a per-user folder in the system temp dir).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tasks import storage
from tasks.step_store import default_scratch_base


def _under(root: str | Path, name: str) -> Path | str:
    """`root/name` as a local Path when root is local, else as a URL."""
    local = storage.local_path(root)
    return local / name if local is not None else storage.join(str(root).rstrip("/"), name)


@dataclass(frozen=True)
class DatasetLayout:
    root: str | Path
    dataset: str
    work_root: Optional[str | Path] = None
    scratch_root: Optional[str | Path] = None

    def __post_init__(self) -> None:
        if self.scratch_root is not None and storage.local_path(self.scratch_root) is None:
            raise ValueError(f"scratch_root {self.scratch_root} must be a local folder (steps write files there)")

    @property
    def output(self) -> str:
        """The dataset's output URL (or local path) for shards, ledger and gate reports."""
        return str(_under(self.root, self.dataset))

    @property
    def is_local(self) -> bool:
        return storage.local_path(self.root) is not None

    @property
    def base(self) -> Path:
        """The dataset's output folder (local roots only; see `output` for any root)."""
        local = storage.local_path(self.root)
        if local is None:
            raise ValueError(f"output root {self.root} is not a local folder")
        return local / self.dataset

    @property
    def work(self) -> Path | str:
        """The dataset's working root (step outputs): a Path when local, else a URL."""
        return _under(self.work_root if self.work_root is not None else self.root, self.dataset)

    @property
    def steps(self) -> Path | str:
        """Root of tasks.step_store.StepStore: a Path when local, else a URL."""
        return _under(self.work, "steps")

    @property
    def shards(self) -> Path:
        return self.base / "shards"

    @property
    def shards_url(self) -> str:
        return storage.join(self.output, "shards")

    @property
    def ledger(self) -> str | Path:
        """Root holding ledger/<run>.parquet parts (tasks.ledger); a Path for local roots, else a URL."""
        return self.base if self.is_local else self.output

    @property
    def download_cache(self) -> Path:
        """Always local: the work root's when it is local, else the scratch folder's."""
        work_root = storage.local_path(self.work_root if self.work_root is not None else self.root)
        if work_root is not None:
            return work_root / "_download_cache"
        scratch = storage.local_path(self.scratch_root) if self.scratch_root is not None else default_scratch_base()
        return scratch / "_download_cache"
