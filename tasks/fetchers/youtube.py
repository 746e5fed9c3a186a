"""`youtube:<id>` sources through yt-dlp's Python API, only when yt-dlp is importable.

yt-dlp is an optional extra (`pip install 'dualforce-pipeline[youtube]'`); without it, or without a network,
the clip is rejected as `unreachable` with the reason, never a crash. Network failures (name resolution,
refused connections, timeouts, HTTP 5xx/429) once yt-dlp's own retries are spent are `ClipRetryable`: the next
run tries again. yt-dlp resumes its own `.part` files.
"""
from __future__ import annotations

import importlib
import re

from tasks.errors import ClipRejected, ClipRetryable
from tasks.fetchers.cache import CacheEntry, FetchedSource
from tasks.media import ffmpeg_exe

_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{11}")
# Messages that mean "the video or the network is not there" rather than "the transfer went wrong".
_UNREACHABLE = re.compile(
    r"unavailable|private video|has been removed|not available|members-only|sign in to confirm|"
    r"HTTP Error 40[134]|HTTP Error 410|Unable to download (?:webpage|API page)|Failed to resolve|"
    r"Name or service not known|Temporary failure in name resolution|getaddrinfo|Network is unreachable|"
    r"No route to host|Connection refused|timed out",
    re.IGNORECASE,
)
# Network failures that may pass (among those and the transfer errors): retryable on the next run.
_TRANSIENT = re.compile(
    r"Failed to resolve|Name or service not known|Temporary failure in name resolution|getaddrinfo|"
    r"Network is unreachable|No route to host|Connection refused|Connection reset|timed out|"
    r"HTTP Error (?:429|5\d\d)",
    re.IGNORECASE,
)
_FINISHED = re.compile(r"source\.[A-Za-z0-9]{1,5}")
# Prefer H.264 + AAC in MP4 so a whole-source clip can be stream-copied; fall back to anything.
FORMAT = "bv*[ext=mp4][vcodec^=avc1]+ba[ext=m4a]/b[ext=mp4]/bv*+ba/b"


def fetch_youtube(video_id: str, entry: CacheEntry, *, attempts: int, timeout_s: float) -> FetchedSource:
    """Download one YouTube video into `entry` (call under `entry.lock()`); yt-dlp retries attempts-1 times."""
    if not _VIDEO_ID.fullmatch(video_id):
        raise ClipRejected("unreachable", f"malformed YouTube id {video_id!r} (expected 11 of [A-Za-z0-9_-])")
    try:
        yt_dlp = importlib.import_module("yt_dlp")
    except ImportError:
        raise ClipRejected("unreachable", "yt-dlp is not installed (pip install 'dualforce-pipeline[youtube]')") \
            from None
    entry.dir.mkdir(parents=True, exist_ok=True)
    options = {
        "format": FORMAT,
        "merge_output_format": "mp4",
        "outtmpl": str(entry.dir / "source.%(ext)s"),
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "continuedl": True,
        "retries": max(attempts - 1, 0),
        "fragment_retries": max(attempts - 1, 0),
        "socket_timeout": timeout_s,
        "ffmpeg_location": ffmpeg_exe(),
    }
    url = f"https://www.youtube.com/watch?v={video_id}"
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=True)
    except Exception as exc:  # yt_dlp.utils.DownloadError and whatever its extractors let through
        message = str(exc)
        reason = "unreachable" if _UNREACHABLE.search(message) else "download_failed"
        error = ClipRetryable if _TRANSIENT.search(message) else ClipRejected
        raise error(reason, f"youtube:{video_id}: {message.strip()[:500]}") from exc
    path = _output_path(info, entry)
    if path is None:
        raise ClipRejected("download_failed", f"youtube:{video_id}: yt-dlp reported success but wrote no file")
    return entry.commit(path, "youtube", {"youtube_id": video_id, "title": (info or {}).get("title")})


def _output_path(info, entry: CacheEntry):
    for item in (info or {}).get("requested_downloads") or []:
        fp = item.get("filepath")
        if fp and (entry.dir / fp).resolve().parent == entry.dir.resolve() and (entry.dir / fp).is_file():
            return entry.dir / fp
    # Finished merges are "source.<ext>"; per-format pieces ("source.f137.mp4") and ".part"s are not.
    done = [p for p in entry.dir.glob("source.*")
            if p.is_file() and _FINISHED.fullmatch(p.name) and p.suffix not in (".part", ".ytdl", ".json")]
    return max(done, key=lambda p: p.stat().st_size) if done else None
