"""http(s) sources: streamed with requests into a resumable `.part`, retried with backoff, verified.

What is verified:
- length: the body must match Content-Length (200) or the total of Content-Range (206);
- entity: a resumed request carries `If-Range` with the ETag (or Last-Modified) saved when the `.part` was
  started, so a changed resource comes back whole (200) instead of being spliced onto old bytes; a 206 whose
  ETag differs from the saved one discards the `.part`;
- content: when `verify_checksum`, a digest the server states for the whole representation
  (`Repr-Digest`/`Digest` sha-256 or md5, `Content-MD5` on a full 200, `x-goog-hash` md5) and an expected
  sha256 from the manifest (`#sha256=<hex>` on the source) must match the bytes on disk.

Failures: 401/403/404/410/451 -> `unreachable` at once; connection errors, timeouts, 408/429/5xx and
short bodies are retried (resuming what arrived); when every try failed that way the clip is `ClipRetryable`
(the next run tries again): `unreachable` when no try reached the server, otherwise `download_failed`. A
checksum mismatch or a malformed URL is a final `ClipRejected`.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import requests

from tasks.errors import ClipRejected, ClipRetryable
from tasks.fetchers.cache import CacheEntry, FetchedSource, safe_suffix
from tasks.fetchers.retry import RetryPolicy

GONE = {401, 403, 404, 410, 451}
TRANSIENT = {408, 425, 429}
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
USER_AGENT = "dualforce-pipeline/0.1 (+requests)"


class _Mismatch(Exception):
    """The bytes on disk do not match a stated checksum (the file is already deleted)."""

    def __init__(self, msg: str, resumed: bool):
        super().__init__(msg)
        self.resumed = resumed


class _Retry(Exception):
    def __init__(self, msg: str, retry_after_s: Optional[float] = None):
        super().__init__(msg)
        self.retry_after_s = retry_after_s


@dataclass
class _PartState:
    """Validators of the entity a `.part` was started from, kept beside it (`.part.json`)."""

    etag: Optional[str] = None
    last_modified: Optional[str] = None
    total: Optional[int] = None
    digests: dict = field(default_factory=dict)  # algorithm -> hex, stated by the server

    @classmethod
    def load(cls, path: Path) -> "_PartState":
        try:
            raw = json.loads(path.read_text())
            return cls(raw.get("etag"), raw.get("last_modified"), raw.get("total"), dict(raw.get("digests", {})))
        except (FileNotFoundError, json.JSONDecodeError):
            return cls()

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(path)


def _b64_to_hex(value: str) -> Optional[str]:
    try:
        return base64.b64decode(value.strip().strip(":"), validate=True).hex()
    except (binascii.Error, ValueError):
        return None


def stated_digests(headers, full_response: bool) -> dict:
    """Whole-representation digests in response headers, as {'sha256'|'md5': hex}."""
    found: dict = {}
    for name in ("Repr-Digest", "Digest"):
        for item in (headers.get(name) or "").split(","):
            algo, _, value = item.strip().partition("=")
            algo = algo.strip().lower().replace("-", "")
            if algo in ("sha256", "md5") and value:
                hexval = _b64_to_hex(value)
                if hexval:
                    found.setdefault(algo, hexval)
    for item in (headers.get("x-goog-hash") or "").split(","):
        algo, _, value = item.strip().partition("=")
        if algo.strip().lower() == "md5" and value:
            hexval = _b64_to_hex(value)
            if hexval:
                found.setdefault("md5", hexval)
    if full_response and headers.get("Content-MD5"):
        hexval = _b64_to_hex(headers["Content-MD5"])
        if hexval:
            found.setdefault("md5", hexval)
    return found


def _retry_after(headers) -> Optional[float]:
    value = (headers.get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def _strong_etag(etag: Optional[str]) -> Optional[str]:
    return etag if etag and not etag.startswith("W/") else None


def fetch_http(
    url: str,
    entry: CacheEntry,
    *,
    policy: RetryPolicy,
    timeout_s: float,
    chunk_bytes: int,
    verify_checksum: bool = True,
    expected_sha256: Optional[str] = None,
    session: Optional[requests.Session] = None,
) -> FetchedSource:
    """Download `url` into `entry` (call under `entry.lock()`); resumes a `.part` left by a killed run."""
    suffix = safe_suffix(urlsplit(url).path)
    final, part = entry.data_path(suffix), entry.part_path(suffix)
    state_path = part.with_name(part.name + ".json")
    if final.exists():  # renamed into place but meta.json not written (killed in between): adopt it
        try:
            return _verified_commit(entry, final, _PartState.load(state_path), expected_sha256,
                                    verify_checksum, resumed=True, state_path=state_path)
        except _Mismatch:
            pass  # deleted; fetch it again below
    own_session = session is None
    sess = session or requests.Session()
    try:
        return _fetch_with_retries(url, entry, sess, final, part, state_path, policy, timeout_s, chunk_bytes,
                                   verify_checksum, expected_sha256)
    finally:
        if own_session:
            sess.close()


def _worth_retrying(exc: BaseException) -> bool:
    """A server that asked us to wait or failed for now, a dropped connection, a timeout, or a resumed download
    whose bytes did not add up (fetched whole next time); anything else ends the fetch at once."""
    return isinstance(exc, (_Retry, requests.ConnectionError, requests.Timeout)) or (
        isinstance(exc, _Mismatch) and exc.resumed)


def _fetch_with_retries(url, entry, sess, final, part, state_path, policy, timeout_s, chunk_bytes,
                        verify_checksum, expected_sha256) -> FetchedSource:
    reached_server = False
    try:
        for attempt in policy.retrying(_worth_retrying):
            with attempt:
                try:
                    resumed, state = _attempt(sess, url, part, state_path, timeout_s, chunk_bytes)
                except _Retry:  # the server answered (5xx, 429): the final reason is download_failed
                    reached_server = True
                    raise
                reached_server = True
                part.replace(final)
                return _verified_commit(entry, final, state, expected_sha256, verify_checksum, resumed, state_path)
    except _Mismatch as exc:
        if not exc.resumed:
            raise ClipRejected("download_failed", f"{url}: {exc}") from None
        last_error, transient = f"{exc} (resumed download; fetching it whole)", False
    except _Retry as exc:
        last_error, transient = str(exc), True
    except (requests.ConnectionError, requests.Timeout) as exc:
        last_error, transient = f"{type(exc).__name__}: {exc}", True
    except requests.RequestException as exc:  # invalid URL, too many redirects, ...
        raise ClipRejected("unreachable", f"{url}: {type(exc).__name__}: {exc}") from exc
    reason = "download_failed" if reached_server else "unreachable"
    error = ClipRetryable if transient else ClipRejected
    raise error(reason, f"{url}: gave up after {policy.attempts} attempts; last error: {last_error}")


def _attempt(sess, url, part: Path, state_path: Path, timeout_s, chunk_bytes) -> tuple[bool, _PartState]:
    """One GET; appends to `part`. Returns (resumed, state) when `part` holds the whole entity."""
    offset = part.stat().st_size if part.exists() else 0
    state = _PartState.load(state_path) if offset else _PartState()
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _strong_etag(state.etag) or state.last_modified
        if validator:
            headers["If-Range"] = validator
    with sess.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s)) as resp:
        status = resp.status_code
        if status in GONE:
            raise ClipRejected("unreachable", f"{url}: HTTP {status} {resp.reason}")
        if status in TRANSIENT or status >= 500:
            raise _Retry(f"HTTP {status} {resp.reason}", _retry_after(resp.headers))
        if status == 416 and offset:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m and m.group(3) != "*" and int(m.group(3)) == offset:
                return True, state  # the .part was already complete
            _discard(part, state_path)
            raise _Retry("HTTP 416 for the saved partial download; starting over")
        etag = resp.headers.get("ETag")
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or m.group(1) is None or int(m.group(1)) != offset:
                _discard(part, state_path)
                raise _Retry(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}; starting over")
            if state.etag and etag and etag != state.etag:
                _discard(part, state_path)
                raise _Retry(f"ETag changed from {state.etag} to {etag}; starting over")
            total = None if m.group(3) == "*" else int(m.group(3))
            mode, resumed = "ab", True
            state.digests.update(stated_digests(resp.headers, full_response=False))
        elif status == 200:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode, resumed, offset = "wb", False, 0
            state = _PartState(etag, resp.headers.get("Last-Modified"), total,
                               stated_digests(resp.headers, full_response=True))
        else:
            raise ClipRejected("download_failed", f"{url}: HTTP {status} {resp.reason}")
        state.total = total if total is not None else state.total
        state.save(state_path)
        try:
            with open(part, mode) as f:
                for block in resp.iter_content(chunk_size=chunk_bytes):
                    f.write(block)
        except (requests.RequestException, OSError) as exc:  # body cut off: keep what arrived, resume
            raise _Retry(f"transfer interrupted after {part.stat().st_size} bytes: {type(exc).__name__}")
    size = part.stat().st_size
    if state.total is not None and size != state.total:
        if size > state.total:
            _discard(part, state_path)
        raise _Retry(f"received {size} bytes, expected {state.total}")
    return resumed, state


def _discard(part: Path, state_path: Path) -> None:
    part.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)


def _verified_commit(entry, final: Path, state: _PartState, expected_sha256, verify, resumed, state_path):
    """Check stated digests, then record the entry; raises _Mismatch (file deleted) on a bad checksum."""
    expected = dict(state.digests) if verify else {}
    if expected_sha256:
        expected["sha256"] = expected_sha256.lower()
    for algo, want in expected.items():
        h = hashlib.new(algo)
        with open(final, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want:
            final.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
            raise _Mismatch(f"{algo} mismatch: got {h.hexdigest()}, expected {want}", resumed)
    state_path.unlink(missing_ok=True)
    return entry.commit(final, "http", {"etag": state.etag, "last_modified": state.last_modified})
