"""The source cache: one directory per source string, so N clips cut from one video fetch it once.

Layout: `<cache_dir>/<key[:2]>/<key>/` with `key = sha256(source)`; inside, the data file (`source<.ext>`),
its `.part` while downloading, a `.lock` that serialises fetchers of the same source across threads and
processes (POSIX flock), and `meta.json` (bytes, sha256, server validators). An entry counts as complete only
when `meta.json` names a data file of the recorded size.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}")


@dataclass(frozen=True)
class FetchedSource:
    """A whole source video on local disk."""

    path: Path
    bytes: int
    sha256: str
    kind: str  # local | file | http | fsspec | youtube
    cached: bool = False  # True when no fetch happened in this call


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


def safe_suffix(name: str) -> str:
    """The extension of a URL path when it is a plain short one ('.mp4'), else ''. Never lets '/' through."""
    suffix = Path(name).suffix
    return suffix.lower() if _SUFFIX.fullmatch(suffix) else ""


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    source: str
    dir: Path

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def data_path(self, suffix: str = "") -> Path:
        return self.dir / f"source{suffix}"

    def part_path(self, suffix: str = "") -> Path:
        return self.dir / f"source{suffix}.part"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive per-source lock: a second worker on the same source waits, then finds it cached."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read_meta(self) -> Optional[dict]:
        try:
            return json.loads(self.meta_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_name(f"meta.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        tmp.replace(self.meta_path)

    def cached(self, kind: str) -> Optional[FetchedSource]:
        """The complete cached download, or None (missing, unfinished, or a data file of the wrong size)."""
        meta = self.read_meta()
        if not meta or "file" not in meta:
            return None
        path = self.dir / Path(meta["file"]).name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size != meta.get("bytes"):
            return None
        return FetchedSource(path=path, bytes=size, sha256=meta["sha256"], kind=kind, cached=True)

    def commit(self, path: Path, kind: str, extra: Optional[dict] = None) -> FetchedSource:
        """Record a finished data file (already renamed into place) in meta.json."""
        size = path.stat().st_size
        digest = sha256_file(path)
        meta = {"source": self.source, "file": path.name, "bytes": size, "sha256": digest,
                "kind": kind, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta.update(extra or {})
        self.write_meta(meta)
        return FetchedSource(path=path, bytes=size, sha256=digest, kind=kind)

    def evict(self) -> None:
        """Forget this source (e.g. it turned out not to be media), so the next call fetches it afresh."""
        self.meta_path.unlink(missing_ok=True)
        for p in self.dir.glob("source*"):
            if p.is_file():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)


def cache_entry(cache_dir: Path, source: str) -> CacheEntry:
    key = source_key(source)
    return CacheEntry(source=source, dir=Path(cache_dir).expanduser() / key[:2] / key)
