"""Other URLs (memory://, s3://, gs://, chained `simplecache::...`) through fsspec, resumable by seeking.

A protocol whose package is missing (s3fs, gcsfs, ...) or a missing object -> `unreachable`; other errors
are retried with backoff and end in `download_failed`: `ClipRetryable` (the next run tries again) when the
last one looked transient (`_transient`: OS/network errors, timeouts, throttling, 5xx), else final. The size
fsspec reports is checked.
"""
from __future__ import annotations

import re
from typing import Optional

import fsspec

from tasks.errors import ClipRejected, ClipRetryable
from tasks.fetchers.cache import CacheEntry, FetchedSource, safe_suffix
from tasks.fetchers.retry import RetryPolicy

# Backends raise their own types (botocore, aiohttp, gcsfs, ...): judged by type name and message as well.
_TRANSIENT = re.compile(r"timeout|timed out|connect|throttl|slow ?down|temporar|unavailable|\b(?:429|5\d\d)\b",
                        re.IGNORECASE)


def _transient(exc: Exception) -> bool:
    """Whether waiting could help: OS-level errors (connections, short copies) and network-sounding ones."""
    return isinstance(exc, (OSError, TimeoutError)) or bool(_TRANSIENT.search(f"{type(exc).__name__}: {exc}"))


def fetch_fsspec(url: str, entry: CacheEntry, *, policy: RetryPolicy, chunk_bytes: int,
                 expected_sha256: Optional[str] = None) -> FetchedSource:
    """Copy `url` into `entry` (call under `entry.lock()`)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ClipRejected("unreachable", f"{url}: the filesystem package for this protocol is not installed "
                                          f"({exc})") from exc
    except ValueError as exc:
        raise ClipRejected("unreachable", f"{url}: {exc}") from exc
    suffix = safe_suffix(path)
    final, part = entry.data_path(suffix), entry.part_path(suffix)
    try:
        for attempt in policy.retrying(_worth_retrying):
            with attempt:
                _copy(fs, path, part, chunk_bytes)
                part.replace(final)
                fetched = entry.commit(final, "fsspec")
                if expected_sha256 and fetched.sha256 != expected_sha256.lower():
                    entry.evict()
                    raise ClipRejected("download_failed", f"{url}: sha256 mismatch: got {fetched.sha256}, "
                                                          f"expected {expected_sha256}")
                return fetched
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ClipRejected("unreachable", f"{url}: {type(exc).__name__}: {exc}") from exc
    except ClipRejected:
        raise
    except Exception as exc:  # backends raise their own types (botocore, aiohttp, ...): all were retried
        error = ClipRetryable if _transient(exc) else ClipRejected
        raise error("download_failed", f"{url}: gave up after {policy.attempts} attempts; last error: "
                                       f"{type(exc).__name__}: {exc}") from exc


def _worth_retrying(exc: BaseException) -> bool:
    """Every backend error but a missing or unreadable path and our own rejection (a checksum that does not match)."""
    return isinstance(exc, Exception) and not isinstance(
        exc, (FileNotFoundError, IsADirectoryError, PermissionError, ClipRejected))


def _copy(fs, path: str, part, chunk_bytes: int) -> None:
    if fs.isdir(path):
        raise IsADirectoryError(path)
    size = fs.size(path)
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    with fs.open(path, "rb") as src, open(part, "ab" if offset else "wb") as dst:
        if offset:
            src.seek(offset)
        for block in iter(lambda: src.read(chunk_bytes), b""):
            dst.write(block)
    got = part.stat().st_size
    if size is not None and got != size:
        raise IOError(f"copied {got} bytes, the filesystem reports {size}")
