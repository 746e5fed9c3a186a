"""Where a dataset's preprocessing outputs live under an output root."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    dataset: str

    @property
    def base(self) -> Path:
        return Path(self.root) / self.dataset

    @property
    def steps(self) -> Path:
        return self.base / "steps"

    @property
    def shards(self) -> Path:
        return self.base / "shards"

    @property
    def ledger(self) -> Path:
        """Directory holding ledger/<run>.parquet parts (tasks.ledger)."""
        return self.base

    @property
    def download_cache(self) -> Path:
        return Path(self.root) / "_download_cache"
