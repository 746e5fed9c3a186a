"""Preprocessing step 1: a manifest row -> the source video trimmed to [start_s, end_s], as `<clip_id>.mp4`.

Sources: local paths, file:// URLs, http(s) (requests; resumable, retried, verified), other fsspec URLs
(memory://, s3:// with s3fs, ...) and `youtube:<id>` (yt-dlp, when installed). A source may end in
`#sha256=<64 hex>` to state the expected checksum of the whole source file.

Remote sources are fetched whole, once, into a cache keyed by a hash of the source string (HDTF and
CelebV-HQ cut many clips from one video); local files are read in place.

Trimming choice: a range that covers the whole source is stream-copied into MP4 (no quality loss, fast;
re-encoded only if the codecs cannot go into MP4). Any other range is re-encoded (H.264 CRF 18 + AAC) with
ffmpeg's input seek, which is frame-accurate when transcoding: stream copy could only cut at keyframes,
giving clips that start up to a GOP (often 2-10 s) early and breaking audio/video alignment downstream.

Per-clip failures raise `ClipRejected` with one of: unreachable, download_failed, corrupt, corrupt_stream
(decodable, but the decoder reported damaged data: re-encoding would hide it), no_video, too_short.
Outputs appear atomically (temp name in the same directory, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence, Union
from urllib.parse import unquote, urlsplit

from datasets_manifest.schema import ClipRow, sanitize_clip_id
from tasks.errors import ClipRejected
from tasks.fetchers.cache import FetchedSource, cache_entry, sha256_file
from tasks.fetchers.fsspec_source import fetch_fsspec
from tasks.fetchers.http import fetch_http
from tasks.fetchers.retry import RetryPolicy
from tasks.fetchers.youtube import fetch_youtube
from tasks.media import MediaError, MediaInfo, decode_errors, error_stream, locate_decode_error, probe, run_ffmpeg

STEP_VERSION = "1"

_CHECKSUM_FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]{64})$")


@dataclass
class DownloadConfig:
    cache_dir: Path = Path("~/.cache/dualforce/sources")
    retries: int = 4  # total tries per remote source (first try included)
    backoff_s: float = 1.0  # first wait; doubles after each failure (with jitter), capped at max_backoff_s
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0  # connect and per-read timeout
    chunk_bytes: int = 1 << 20
    verify_checksum: bool = True  # check digests the server states (Repr-Digest, Digest, Content-MD5, ...)
    local_root: Optional[Path] = None  # relative local sources resolve against this (default: cwd)
    end_slack_s: float = 0.5  # end_s may overshoot the source by this much (clamped); more -> too_short
    crf: int = 18
    x264_preset: str = "veryfast"
    audio_bitrate: str = "192k"

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.local_root is not None:
            self.local_root = Path(self.local_root).expanduser()
        if self.retries < 1:
            raise ValueError(f"retries is the number of tries and must be >= 1, got {self.retries}")
        if self.timeout_s <= 0 or self.chunk_bytes <= 0:
            raise ValueError("timeout_s and chunk_bytes must be > 0")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be within 0..51, got {self.crf}")

    def fingerprint(self) -> str:
        """Hash of the settings that change the output clip (with STEP_VERSION): the ledger's version key."""
        keyed = {"step": STEP_VERSION, "crf": self.crf, "preset": self.x264_preset,
                 "audio_bitrate": self.audio_bitrate, "end_slack_s": self.end_slack_s}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.backoff_s, self.max_backoff_s)


@dataclass(frozen=True)
class DownloadResult:
    path: Path  # dest / f"{clip_id}.mp4"
    bytes: int  # of the clip file
    sha256: str  # of the clip file
    seconds: float  # wall time of this call
    source_kind: str  # local | file | http | fsspec | youtube
    trimmed: bool  # False when the whole source was stream-copied
    duration_s: float  # of the clip, probed
    has_audio: bool
    source_path: Path  # the whole source on local disk (cache entry or the local file)
    source_bytes: int
    source_sha256: str
    source_cached: bool  # True when the source was already in the cache (no fetch in this call)

    def as_record(self) -> dict:
        """JSON-ready form for the ledger."""
        rec = asdict(self)
        rec["path"], rec["source_path"] = str(self.path), str(self.source_path)
        return rec


def source_kind(source: str) -> str:
    if source.startswith("youtube:"):
        return "youtube"
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "file"
    if "://" in source and len(scheme) > 1:
        return "fsspec"
    return "local"


def fetch_source(source: str, cfg: DownloadConfig, expected_sha256: Optional[str] = None) -> FetchedSource:
    """The whole source on local disk, fetched at most once per source (cached); raises ClipRejected."""
    m = _CHECKSUM_FRAGMENT.search(source)
    if m:
        source, expected_sha256 = source[: m.start()], m.group(1).lower()
    kind = source_kind(source)
    if kind in ("local", "file"):
        return _local_source(_local_path(source, kind, cfg), kind, cfg, expected_sha256)
    entry = cache_entry(cfg.cache_dir, source)
    with entry.lock():
        hit = entry.cached(kind)
        if hit is not None:
            if expected_sha256 and hit.sha256 != expected_sha256.lower():
                entry.evict()  # cached under an older/other expectation: fetch again and verify
            else:
                return hit
        policy = cfg.retry_policy
        if kind == "http":
            return fetch_http(source, entry, policy=policy, timeout_s=cfg.timeout_s, chunk_bytes=cfg.chunk_bytes,
                              verify_checksum=cfg.verify_checksum, expected_sha256=expected_sha256)
        if kind == "fsspec":
            return fetch_fsspec(source, entry, policy=policy, chunk_bytes=cfg.chunk_bytes,
                                expected_sha256=expected_sha256)
        fetched = fetch_youtube(source[len("youtube:"):], entry, attempts=cfg.retries, timeout_s=cfg.timeout_s)
        if expected_sha256 and fetched.sha256 != expected_sha256:
            entry.evict()
            raise ClipRejected("download_failed", f"{source}: sha256 mismatch: got {fetched.sha256}")
        return fetched


def _local_path(source: str, kind: str, cfg: DownloadConfig) -> Path:
    if kind == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ClipRejected("unreachable", f"{source}: file:// URLs on other hosts are not supported")
        return Path(unquote(parts.path))
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (cfg.local_root or Path.cwd()) / path
    return path


def _local_source(path: Path, kind: str, cfg: DownloadConfig, expected_sha256: Optional[str]) -> FetchedSource:
    """A local file read in place; its sha256 is memoised in the cache, keyed by path, size and mtime."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ClipRejected("unreachable", f"{path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise ClipRejected("unreachable", f"{path}: not a regular file")
    path = path.resolve()
    entry = cache_entry(cfg.cache_dir, f"local:{path}")
    memo = entry.read_meta() or {}
    if memo.get("bytes") == st.st_size and memo.get("mtime_ns") == st.st_mtime_ns and memo.get("sha256"):
        digest, cached = memo["sha256"], True
    else:
        digest, cached = sha256_file(path, cfg.chunk_bytes), False
        try:  # best effort: a read-only cache only costs re-hashing next time
            entry.dir.mkdir(parents=True, exist_ok=True)
            entry.write_meta({"local_path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                              "sha256": digest})
        except OSError:
            pass
    if expected_sha256 and digest != expected_sha256.lower():
        raise ClipRejected("download_failed", f"{path}: sha256 mismatch: got {digest}, expected {expected_sha256}")
    return FetchedSource(path=path, bytes=st.st_size, sha256=digest, kind=kind, cached=cached)


def download_clip(row: ClipRow, dest: Path, cfg: DownloadConfig) -> DownloadResult:
    """Fetch `row.source` (cached per source) and cut [start_s, end_s] into `dest/<clip_id>.mp4`."""
    t0 = time.monotonic()
    clip_id = sanitize_clip_id(row.clip_id)  # ClipRow already did; again in case it was built unvalidated
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{clip_id}.mp4"
    for stale in dest.glob(f".{clip_id}.*.tmp.mp4"):  # left by a killed earlier run of this clip
        stale.unlink(missing_ok=True)

    fetched = fetch_source(row.source, cfg)
    try:
        info = probe(fetched.path)
    except MediaError as exc:
        if fetched.kind not in ("local", "file"):  # e.g. an HTML error page served as 200: fetch again next time
            entry = cache_entry(cfg.cache_dir, _CHECKSUM_FRAGMENT.sub("", row.source))
            with entry.lock():
                entry.evict()
        raise ClipRejected("corrupt", f"{row.source}: {exc}") from None
    if not info.has_video:
        raise ClipRejected("no_video", f"{row.source}: the source has no video stream")
    end_s = _checked_end(row, info, cfg)

    tmp = dest / f".{clip_id}.{uuid.uuid4().hex[:8]}.tmp.mp4"
    try:
        trimmed = _cut(fetched.path, tmp, row.start_s, end_s, info, cfg)
        try:
            out_info = probe(tmp)
        except MediaError as exc:
            raise ClipRejected("corrupt", f"{row.source}: the cut clip is unreadable: {exc}") from None
        if not out_info.has_video or out_info.duration_s <= 0:
            raise ClipRejected("too_short", f"{row.source}: [{row.start_s}, {end_s}] holds no video frames")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return DownloadResult(
        path=out, bytes=out.stat().st_size, sha256=sha256_file(out), seconds=time.monotonic() - t0,
        source_kind=fetched.kind, trimmed=trimmed, duration_s=out_info.duration_s, has_audio=out_info.has_audio,
        source_path=fetched.path, source_bytes=fetched.bytes, source_sha256=fetched.sha256,
        source_cached=fetched.cached,
    )


def _checked_end(row: ClipRow, info: MediaInfo, cfg: DownloadConfig) -> Optional[float]:
    """end_s to cut at (None: to the end); too_short when the range lies beyond the source."""
    duration = info.duration_s
    if duration <= 0:  # container states no duration: let ffmpeg find out, the output probe decides
        return row.end_s
    if row.start_s >= duration:
        raise ClipRejected("too_short", f"{row.source}: starts at {row.start_s:.3f} s but the source lasts "
                                        f"{duration:.3f} s")
    if row.end_s is not None and row.end_s > duration + cfg.end_slack_s:
        raise ClipRejected("too_short", f"{row.source}: ends at {row.end_s:.3f} s but the source lasts "
                                        f"{duration:.3f} s")
    if row.end_s is not None and row.end_s >= duration:
        return None
    return row.end_s


def _cut(src: Path, tmp: Path, start_s: float, end_s: Optional[float], info: MediaInfo,
         cfg: DownloadConfig) -> bool:
    """Write the range to `tmp`; returns True when re-encoded (trimmed), False for a whole-file stream copy."""
    half_frame = 0.5 / (info.fps or 25.0)
    whole = start_s < half_frame and (end_s is None or end_s >= info.duration_s - half_frame)
    # "file:" keeps ffmpeg from reading a path such as "concat:a|b" as a protocol; paths are absolute.
    inp, outp = f"file:{src.resolve()}", f"file:{tmp.resolve()}"
    streams = ["-map", "0:v:0", "-map", "0:a:0?", "-sn", "-dn", "-map_chapters", "-1"]
    if whole:
        try:
            run_ffmpeg(["-i", inp, *streams, "-c", "copy", "-movflags", "+faststart", "-f", "mp4", "-y", outp],
                       "stream copy")
            return False
        except MediaError:
            pass  # codecs that MP4 cannot carry: re-encode below
    seek = ["-ss", f"{start_s:.6f}"] if start_s > 0 else []
    length = ["-t", f"{end_s - start_s:.6f}"] if end_s is not None else []
    video = ["-c:v", "libx264", "-preset", cfg.x264_preset, "-crf", str(cfg.crf), "-pix_fmt", "yuv420p"]
    if info.width % 2 or info.height % 2:  # yuv420p needs even sides: drop the last row/column
        video += ["-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0"]
    audio = ["-c:a", "aac", "-b:a", cfg.audio_bitrate]
    try:
        log = run_ffmpeg([*seek, "-i", inp, *length, *streams, *video, *audio, "-movflags", "+faststart",
                          "-f", "mp4", "-y", outp], "trim")
    except MediaError as exc:
        raise ClipRejected("corrupt", f"{src}: {exc}") from None
    errors = decode_errors(log)
    if errors:  # the re-encode would bake the gap or the concealment into a clean-looking clip
        stream = error_stream(errors)
        at = locate_decode_error(src, stream, start_s, None if end_s is None else end_s - start_s)
        where = f" near {at:.2f} s of the clip ({start_s + at:.2f} s of the source)" if at is not None else ""
        raise ClipRejected("corrupt_stream", f"{src.name}: {len(errors)} {stream} decode error(s){where}; "
                                             f"first: {errors[0][:200]}", info={"position_s": at, "stream": stream})
    return not whole


def download_batch(rows: Sequence[ClipRow], dest: Path, cfg: DownloadConfig,
                   workers: int = 4) -> list[Union[DownloadResult, ClipRejected]]:
    """`download_clip` over a batch with a thread pool (I/O and ffmpeg run outside the GIL).

    One entry per row, in order: the result or the clip's ClipRejected (recorded, never fatal to the batch).
    Clips of the same source wait on its cache lock, so each source is still fetched once.
    """
    def one(row: ClipRow) -> Union[DownloadResult, ClipRejected]:
        try:
            return download_clip(row, dest, cfg)
        except ClipRejected as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, rows))


DOWNLOADED_VIDEO = "source.mp4"


@dataclass
class DownloadStep:
    """Step 1: the clip's time range of its source, trimmed, as `source.mp4`."""

    config: DownloadConfig = field(default_factory=DownloadConfig)
    name: ClassVar[str] = "download"
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ()

    def fingerprint(self) -> str:
        # The settings that change the clip; the cache dir and retry policy do not.
        return self.config.fingerprint()

    def row_fields(self, row: ClipRow) -> dict:
        # The source string keeps its `#sha256=` fragment: a corrected checksum is a different download.
        return {"source": row.source, "start_s": row.start_s, "end_s": row.end_s}

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        result = download_clip(row, out_dir, self.config)
        result.path.rename(out_dir / DOWNLOADED_VIDEO)
        return {"bytes": result.bytes, "sha256": result.sha256, "source_kind": result.source_kind,
                "duration_s": result.duration_s, "trimmed": result.trimmed}


def downloaded_video(inputs: dict[str, Path]) -> Path:
    """The download step's clip, which every crop step reads."""
    src = inputs[DownloadStep.name] / DOWNLOADED_VIDEO
    if not src.exists():
        raise ClipRejected("missing_input", f"{src} is missing")
    return src
