"""Output roots as fsspec URLs: local folders, `file://`, shared filesystems, object stores (s3://, memory://).

Every write here is all-or-nothing for readers: bytes go to a hidden temporary name first and are then moved
onto the final name. On a local filesystem that move is an atomic rename; object stores have no rename, so
fsspec's move is a server-side copy + delete, and the final key appears only once the copy is complete.
Temporary names all match `.<name>.tmp-<hex>`, so a clean-up can find the leftovers of a killed writer.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path
from typing import Optional

import fsspec
from fsspec import AbstractFileSystem

TMP_MARK = ".tmp-"


def filesystem(url: str | Path) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/") or "/"


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def local_path(url: str | Path) -> Optional[Path]:
    """The local path behind `url` (a plain path or file://), or None for remote/in-memory filesystems."""
    fs, path = filesystem(url)
    return Path(path) if is_local(fs) else None


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def tmp_name(path: str) -> str:
    head, name = posixpath.split(path)
    return posixpath.join(head, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def is_tmp(path: str) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    return name.startswith(".") and TMP_MARK in name


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old object or the new one, never a part."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = tmp_name(path)
    if is_local(fs):
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs.pipe_file(tmp, data)
    _move(fs, tmp, path)


def publish_file(fs: AbstractFileSystem, local_file: Path, path: str) -> None:
    """Move a finished local file onto `path` (rename when local, upload to a temp key + move otherwise)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if is_local(fs):
        os.replace(local_file, path)
        return
    tmp = tmp_name(path)
    fs.put_file(str(local_file), tmp)
    _move(fs, tmp, path)
    local_file.unlink()


def _move(fs: AbstractFileSystem, src: str, dst: str) -> None:
    try:
        fs.mv(src, dst)
    except BaseException:
        if fs.exists(src):
            fs.rm_file(src)
        raise


def read_bytes(fs: AbstractFileSystem, path: str) -> Optional[bytes]:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def remove(fs: AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
