"""What a run shows in the Prefect UI beside its logs: the summary the CLI prints, a progress bar that moves
while batches finish, and the contact sheet of the crops (embedded as JPEG; the PNG lies beside the ledger)."""
from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Optional

import cv2
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from flows.gate_artifacts import artifact_key
from flows.run_summary import run_markdown


def publish_summary(result: dict, key_prefix: str, seconds: Optional[float] = None,
                    contact_sheet: bool = False) -> None:
    """The summary as markdown tables; `contact_sheet`: also a copy of the crops' contact sheet, so a top-level run
    (the dry-run) shows at its top what its preprocess subflow shows one level deeper."""
    create_markdown_artifact(run_markdown(result, seconds), key=artifact_key(key_prefix, "summary"),
                             description="clips in/out with reasons, seconds per step, shards, gates, output")
    sheet = result.get("preprocess", result).get("contact_sheet")
    if contact_sheet and sheet and Path(sheet).is_file():
        publish_contact_sheet(Path(sheet), key_prefix)


def publish_contact_sheet(png: Path, key_prefix: str, max_width: int = 960) -> None:
    """A markdown artifact with the sheet inline (JPEG, at most `max_width` px wide) and the PNG's path."""
    image = cv2.imread(str(png))
    if image.shape[1] > max_width:
        s = max_width / image.shape[1]
        image = cv2.resize(image, (max_width, round(image.shape[0] * s)), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    body = f"![contact sheet](data:image/jpeg;base64,{base64.b64encode(jpeg.tobytes()).decode()})" if ok else ""
    create_markdown_artifact(f"## Contact sheet\n\nCrop frames with their landmarks; rejected clips with the "
                             f"reason.\n\n{body}\n\nFull size: `{png}`", key=artifact_key(key_prefix, "contact-sheet"),
                             description="what the crops look like")


class ProgressArtifact:
    """Prefect's progress artifact for a run: `advance()` as each batch task finishes (thread-safe)."""

    def __init__(self, total: int, key_prefix: str, what: str):
        self.total, self.done, self.what = max(1, total), 0, what
        self._lock = threading.Lock()
        self.id = create_progress_artifact(0.0, key=artifact_key(key_prefix, "progress"),
                                           description=f"0/{total} {what}")

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            update_progress_artifact(self.id, 100.0 * self.done / self.total,
                                     description=f"{self.done}/{self.total} {self.what}")
