"""Fetchers: bring one source (http(s), fsspec URL, YouTube id) into the local source cache.

Each fetcher writes into a `CacheEntry` (a directory keyed by a hash of the source string) through a `.part`
file that the next call resumes, and raises `tasks.errors.ClipRejected` with a stable reason on failure.
`tasks.steps.download` picks the fetcher and trims the cached source into a clip.
"""
from tasks.fetchers.cache import CacheEntry, FetchedSource, cache_entry, sha256_file
from tasks.fetchers.retry import RetryPolicy

__all__ = ["CacheEntry", "FetchedSource", "RetryPolicy", "cache_entry", "sha256_file"]
