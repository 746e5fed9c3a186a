"""What a user runs after the dry-run: export -> generate -> evaluate, filled in with this run's own paths.

The commands are printed at the end of the dry-run's summary and kept in its report (`next_commands`); a test runs
them as printed. `./run` is named by the repository's path unless the user is in it, so they run from anywhere.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import cv2

from tasks.media import iter_frames

REPO = Path(__file__).resolve().parents[1]
FACE_IMAGE = "face.png"


def run_command() -> str:
    return "./run" if Path.cwd().resolve() == REPO else shlex.quote(str(REPO / "run"))


def write_face_image(video: Path, png: Path) -> Path:
    """The first frame of a sample clip as a PNG: a real face for `generate --image` (temp file + rename)."""
    frames = iter_frames(video, chunk=1)
    try:
        first = next(frames)[0]  # [H, W, 3] RGB
    finally:
        frames.close()  # stops the ffmpeg reader after one frame
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(first, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {tmp}")
    tmp.replace(png)
    return png


def next_commands(out_dir: Path, joint_run: Path, face: Path, speech: Path, split: str = "train") -> list[str]:
    """export the joint run's weights, generate 2 s from the sample face and speech, evaluate on the dry-run's
    shards (its two clips are both in `split`: the samples have no held-out identity)."""
    run, q = run_command(), lambda p: shlex.quote(str(p))
    model = out_dir / "model"
    return [
        f"{run} export {q(joint_run)} -o {q(model)}",
        f"{run} generate --model {q(model)} --image {q(face)} --audio {q(speech)} -o {q(out_dir / 'generated.mp4')} "
        "--seconds 2 --steps 4",
        f"{run} evaluate --model {q(model)} --shards {q(out_dir / 'samples' / 'shards')} --split {split} --clips 2 "
        f"--steps 4 --long-seconds 4 -o {q(out_dir / 'evaluation')}",
    ]
