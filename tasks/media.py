"""ffmpeg access shared by every step: the binary, probing, frame decoding and writing.

We use the ffmpeg that ships inside `imageio-ffmpeg` (no system ffmpeg, no ffprobe) and drive it through
ffmpeg-python with argument lists, so no manifest string ever reaches a shell.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np


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


_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\S+.*?: Video: .*?(\d{2,5})x(\d{2,5})[^\n]*?(?:(\d+(?:\.\d+)?) fps|(\d+(?:\.\d+)?) tbr)")
_AUDIO = re.compile(r"Stream #\S+.*?: Audio: [^\n]*?(\d+) Hz, ([^,\n]+)")


def _channels(layout: str) -> int:
    layout = layout.strip()
    named = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "5.0": 5, "5.1": 6, "7.1": 8}
    if layout in named:
        return named[layout]
    m = re.match(r"(\d+) channels", layout)
    return int(m.group(1)) if m else 1


def probe(path: str | Path) -> MediaInfo:
    """Read container facts from `ffmpeg -i` (the bundled ffmpeg has no ffprobe)."""
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
    return MediaInfo(
        duration_s=duration,
        has_video=v is not None,
        width=int(v.group(1)) if v else 0,
        height=int(v.group(2)) if v else 0,
        fps=float(v.group(3) or v.group(4)) if v else 0.0,
        has_audio=a is not None,
        audio_rate=int(a.group(1)) if a else 0,
        audio_channels=_channels(a.group(2)) if a else 0,
    )


def run_ffmpeg(args: list[str], what: str) -> None:
    """Run ffmpeg with an argument list; raise MediaError with the tail of its log on failure."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *args], capture_output=True)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise MediaError(f"{what} failed: {' | '.join(tail) or 'ffmpeg exit ' + str(proc.returncode)}")


def iter_frames(
    path: str | Path,
    *,
    fps: Optional[float] = None,
    scale_to: Optional[tuple[int, int]] = None,
    chunk: int = 32,
) -> Iterator[np.ndarray]:
    """Stream RGB frames as uint8 chunks [n, H, W, 3] through a pipe, so memory stays flat for long sources."""
    info = probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: no video stream")
    filters = []
    if fps:
        filters.append(f"fps={fps}")
    w, h = info.width, info.height
    if scale_to:
        w, h = scale_to
        filters.append(f"scale={w}:{h}:flags=area")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    if filters:
        cmd += ["-vf", ",".join(filters)]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-an", "-"]
    frame_bytes = w * h * 3
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            buf = proc.stdout.read(frame_bytes * chunk)
            if not buf:
                break
            n = len(buf) // frame_bytes
            if n:
                yield np.frombuffer(buf[: n * frame_bytes], np.uint8).reshape(n, h, w, 3)
            if len(buf) < frame_bytes * chunk:
                break
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        rc = proc.wait()
    if rc != 0:
        raise MediaError(f"decoding {path} failed: {err.strip()[-300:]}")


def read_frames(path: str | Path, **kw) -> np.ndarray:
    chunks = list(iter_frames(path, **kw))
    if not chunks:
        raise MediaError(f"{path}: no frames decoded")
    return np.concatenate(chunks, axis=0)


def read_audio(path: str | Path, sample_rate: int = 16_000) -> np.ndarray:
    """Mono float32 audio resampled by ffmpeg; empty array when the file has no audio stream."""
    info = probe(path)
    if not info.has_audio:
        return np.zeros(0, np.float32)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
           "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"reading audio of {path} failed: {proc.stderr.decode(errors='replace')[-300:]}")
    return np.frombuffer(proc.stdout, np.float32).copy()


class VideoWriter:
    """Pipe RGB frames into libx264; the file appears under its final name only after a clean close.

    Bit-exact flags and a fixed thread count make the same frames give the same bytes on every run.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int = 25, crf: int = 18,
                 preset: str = "veryfast", threads: int = 2):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp.mp4")
        self.size = (width, height)
        self.frames = 0
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
               "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-threads", str(threads), "-fflags", "+bitexact", "-flags:v", "+bitexact",
               "-map_metadata", "-1", "-movflags", "+faststart", str(self.tmp)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frames: np.ndarray) -> None:
        """frames: [n, H, W, 3] or [H, W, 3] uint8 RGB."""
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        if frames.shape[-3:-1] != (self.size[1], self.size[0]):
            raise ValueError(f"frame size {frames.shape[-3:-1]} does not match writer {self.size[::-1]}")
        self._proc.stdin.write(frames.tobytes())
        self.frames += 1 if frames.ndim == 3 else frames.shape[0]

    def close(self) -> Path:
        self._proc.stdin.close()
        err = self._proc.stderr.read().decode(errors="replace")
        self._proc.stderr.close()
        if self._proc.wait() != 0:
            self.tmp.unlink(missing_ok=True)
            raise MediaError(f"encoding {self.path.name} failed: {err.strip()[-300:]}")
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        self._proc.kill()
        self._proc.wait()
        self._proc.stderr.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = 16_000) -> Path:
    """16-bit PCM mono wav, written atomically."""
    import soundfile as sf

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.wav")
    sf.write(tmp, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)
    return path


def wav_bytes(samples: np.ndarray, sample_rate: int = 16_000) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()
