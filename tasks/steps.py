"""The per-clip preprocessing steps as objects the step runner can drive (name, version, config, run).

Each adapter is thin: the work lives in the step's own module (tasks/download.py, tasks/crop.py, ...).
Bump a step's `version` when its output for the same input changes; that re-runs it and what depends on it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets_manifest.schema import ClipRow
from tasks.crop import CropConfig, crop_clip
from tasks.download import DownloadConfig, download_clip
from tasks.errors import ClipRejected
from tasks.step_store import fingerprint

DOWNLOADED_VIDEO = "source.mp4"


@dataclass
class DownloadStep:
    config: DownloadConfig = field(default_factory=DownloadConfig)
    name: str = "download"
    version: str = "1"
    requires: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        # The cache dir and retry policy do not change what is downloaded.
        return fingerprint("download")

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        result = download_clip(row, out_dir, self.config)
        result.path.rename(out_dir / DOWNLOADED_VIDEO)
        return {"bytes": result.bytes, "sha256": result.sha256, "source_kind": result.source_kind,
                "duration_s": result.duration_s, "trimmed": result.trimmed}


@dataclass
class CropStep:
    config: CropConfig = field(default_factory=CropConfig)
    name: str = "crop"
    version: str = "1"
    requires: tuple[str, ...] = ("download",)

    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        src = inputs["download"] / DOWNLOADED_VIDEO
        if not src.exists():
            raise ClipRejected("missing_input", f"{src} is missing")
        r = crop_clip(src, out_dir, self.config)
        return {"frames": r.frames, "audio_samples": r.audio_samples, "trimmed_s": round(r.trimmed_s, 3),
                "median_face_px": round(r.median_face_px, 1), "landmarker": r.landmarker}
