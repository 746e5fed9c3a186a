"""Where a dataset's preprocessing outputs live under an output root.

The output root (shards, ledger, gate reports) is a local folder or any fsspec URL: `file:///data/out`, a
shared filesystem path, `s3://bucket/prefix`. The per-step outputs and the download cache are working files
that ffmpeg and the models read and write as local files, so they live under a local or shared folder: the
output root itself when it is local, else `work_root` (required then; on a multi-node Ray cluster it must be
a filesystem every node mounts at the same path, because batch b's crop may run on another node than its
download).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tasks import storage


@dataclass(frozen=True)
class DatasetLayout:
    root: str | Path
    dataset: str
    work_root: Optional[str | Path] = None

    def __post_init__(self) -> None:
        if storage.local_path(self.root) is None and self.work_root is None:
            raise ValueError(f"output root {self.root} is not a local folder: give work_root, a local or shared "
                             "folder for the per-step working files (crops, features, downloads)")
        if self.work_root is not None and storage.local_path(self.work_root) is None:
            raise ValueError(f"work_root {self.work_root} must be a local or shared folder (ffmpeg reads it)")

    @property
    def output(self) -> str:
        """The dataset's output URL (or local path) for shards, ledger and gate reports."""
        local = storage.local_path(self.root)
        return str(local / self.dataset) if local is not None else storage.join(str(self.root).rstrip("/"), self.dataset)

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
    def work(self) -> Path:
        return storage.local_path(self.work_root) / self.dataset if self.work_root is not None else self.base

    @property
    def steps(self) -> Path:
        return self.work / "steps"

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
        root = storage.local_path(self.work_root) if self.work_root is not None else storage.local_path(self.root)
        return root / "_download_cache"
