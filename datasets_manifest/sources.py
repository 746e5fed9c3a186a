"""Turning what datasets publish (YouTube links, clock times) into manifest values.

Sources: a YouTube id or watch/short/embed link becomes `youtube:<id>`; other URLs stay URLs; paths stay paths.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

_YT_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
_YT_HOSTS = {"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com", "youtube-nocookie.com",
             "www.youtube-nocookie.com"}


def youtube_id_from_url(url: str) -> str | None:
    """The 11-character video id of a YouTube link, or None when the link is not a YouTube video link."""
    parsed = urlparse(url.strip())
    host = (parsed.hostname or "").lower()
    candidate: str | None = None
    if host in _YT_HOSTS:
        if parsed.path == "/watch":
            candidate = (parse_qs(parsed.query).get("v") or [None])[0]
        else:
            m = re.match(r"^/(?:embed|shorts|v|live)/([^/?#]+)", parsed.path)
            candidate = m.group(1) if m else None
    elif host == "youtu.be":
        candidate = parsed.path.lstrip("/").split("/")[0] or None
    return candidate if candidate and _YT_ID.match(candidate) else None


def youtube_source(video_id: str) -> str:
    """`youtube:<id>` for a bare YouTube id; raises ValueError when it is not an 11-character id."""
    video_id = video_id.strip()
    if not _YT_ID.match(video_id):
        raise ValueError(f"not a YouTube video id: {video_id!r}")
    return f"youtube:{video_id}"


def source_from_url(url: str) -> str:
    """`youtube:<id>` for a YouTube video link, the URL itself for any other http(s) URL."""
    url = url.strip()
    yt = youtube_id_from_url(url)
    if yt:
        return f"youtube:{yt}"
    if urlparse(url).scheme in ("http", "https") and urlparse(url).netloc:
        if (urlparse(url).hostname or "").lower() in _YT_HOSTS | {"youtu.be"}:
            raise ValueError(f"YouTube link without a video id: {url!r}")
        return url
    raise ValueError(f"not an http(s) URL: {url!r}")


_CLOCK = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d+)?)$")


def parse_clock(text: str) -> float:
    """Seconds from 'SS(.f)', 'MM:SS(.f)' or 'H:MM:SS(.f)' (minutes/seconds fields must be < 60 when nested)."""
    t = text.strip()
    m = _CLOCK.match(t)
    if not m:
        raise ValueError(f"bad clock time {text!r}")
    a, b, sec = m.group(1), m.group(2), float(m.group(3))
    if a is not None and b is not None:
        hours, minutes = int(a), int(b)
    elif a is not None:
        hours, minutes = 0, int(a)
    else:
        hours, minutes = 0, 0
    if (a is not None and sec >= 60) or (b is not None and minutes >= 60):
        raise ValueError(f"bad clock time {text!r} (field out of range)")
    return hours * 3600 + minutes * 60 + sec
