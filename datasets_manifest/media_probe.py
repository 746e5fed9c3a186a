"""What a media file holds, from `ffmpeg -i` (duration, streams, displayed size, rotation).

Below both the manifest builders (a sample clip's duration) and the steps (tasks/media.py, which decodes and
encodes): the bundled ffmpeg from `imageio-ffmpeg` (it ships no ffprobe), run with an argument list, never a shell.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class MediaError(RuntimeError):
    """The file cannot be read as media; the message says why (shown in the ledger)."""


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float
    has_video: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    has_audio: bool = False
    audio_rate: int = 0
    audio_channels: int = 0
    rotation: float = 0.0  # degrees of the display matrix; width x height is already the displayed size


_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\S+.*?: Video: .*?(\d{2,5})x(\d{2,5})[^\n]*?(?:(\d+(?:\.\d+)?) fps|(\d+(?:\.\d+)?) tbr)")
_ROTATION = re.compile(r"(?:displaymatrix|Display Matrix): rotation of (-?\d+(?:\.\d+)?) degrees", re.I)
_AUDIO = re.compile(r"Stream #\S+.*?: Audio: [^\n]*?(\d+) Hz, ([^,\n]+)")


def _channels(layout: str) -> int:
    layout = layout.strip()
    named = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "5.0": 5, "5.1": 6, "7.1": 8}
    if layout in named:
        return named[layout]
    m = re.match(r"(\d+) channels", layout)
    return int(m.group(1)) if m else 1


def probe(path: str | Path) -> MediaInfo:
    """Read container facts from `ffmpeg -i` (the bundled ffmpeg has no ffprobe).

    Width and height are the *displayed* size: ffmpeg's decoder applies a stream's display matrix (phone clips
    stored sideways), so a 90-degree rotation swaps the stored sides."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"no such file: {path}")
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True, errors="replace"
    )
    err = proc.stderr
    if "Invalid data found" in err or "moov atom not found" in err or "Duration:" not in err:
        last = err.strip().splitlines()[-1] if err.strip() else "unreadable"
        raise MediaError(f"not a readable media file ({last})")
    d = _DURATION.search(err)
    duration = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else 0.0
    v = _VIDEO.search(err)
    a = _AUDIO.search(err)
    r = _ROTATION.search(err)
    rotation = float(r.group(1)) if r else 0.0
    width, height = (int(v.group(1)), int(v.group(2))) if v else (0, 0)
    if round(rotation) % 180 == 90:
        width, height = height, width
    return MediaInfo(
        duration_s=duration,
        has_video=v is not None,
        width=width,
        height=height,
        rotation=rotation,
        fps=float(v.group(3) or v.group(4)) if v else 0.0,
        has_audio=a is not None,
        audio_rate=int(a.group(1)) if a else 0,
        audio_channels=_channels(a.group(2)) if a else 0,
    )
