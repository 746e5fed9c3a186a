"""Step 1 (download): sources of every kind, resume, retries, checksums, trimming, rejection reasons."""
from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import numpy as np
import pytest

from datasets_manifest.schema import ClipRow, sanitize_clip_id
from tasks.errors import ClipRejected
from tasks.fetchers import cache_entry
from tasks.media import iter_frames, probe, read_audio, read_frames
from tasks.steps.download import DownloadConfig, download_batch, download_clip, fetch_source

FPS = 25.0


# ---------------------------------------------------------------- a local HTTP server that speaks Range


@dataclass
class Served:
    """What the test server did: one record per request."""

    requests: list = field(default_factory=list)  # (path, Range header or None, status, body bytes sent)

    def hits(self, path: str) -> int:
        return sum(1 for r in self.requests if r[0] == path)


class FakeServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, list[int]] = {}  # path -> statuses to answer before serving (popped per request)
        self.always: dict[str, int] = {}  # path -> status answered forever
        self.cut_after: dict[str, int] = {}  # path -> close the first 200 after this many body bytes
        self.extra_headers: dict[str, dict] = {}
        self.ignore_range = False  # behave like a server without Range support
        self.drip_s = 0.0  # pause between 64 KiB pieces of a body (a slow link)
        self.log = Served()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _record(self, h, status, sent):
        with self._lock:
            self.log.requests.append((h.path, h.headers.get("Range"), status, sent))

    def _error(self, h, status):
        self._record(h, status, 0)
        h.send_response(status)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _handle(self, h):
        path = h.path
        if path in self.always:
            return self._error(h, self.always[path])
        with self._lock:
            queued = self.fail.get(path)
            status = queued.pop(0) if queued else None
        if status is not None:
            return self._error(h, status)
        data = self.files.get(path)
        if data is None:
            return self._error(h, 404)
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        rng = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        if rng and not self.ignore_range and (if_range is None or if_range == etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self._record(h, 416, 0)
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start:]
        status = 206 if start else 200
        h.send_response(status)
        h.send_header("Content-Type", "video/mp4")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in self.extra_headers.get(path, {}).items():
            h.send_header(k, v)
        h.end_headers()
        cut = self.cut_after.pop(path, None) if status == 200 else None
        if cut is not None:
            body = body[:cut]
        try:
            if self.drip_s:
                for i in range(0, len(body), 65536):
                    h.wfile.write(body[i:i + 65536])
                    h.wfile.flush()
                    time.sleep(self.drip_s)
            else:
                h.wfile.write(body)
                h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client was killed
            self._record(h, status, -1)
            return
        self._record(h, status, len(body))
        if cut is not None:
            h.close_connection = True

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def cfg(tmp_path) -> DownloadConfig:
    return DownloadConfig(cache_dir=tmp_path / "cache", retries=3, backoff_s=0.01, max_backoff_s=0.05,
                          timeout_s=5.0, chunk_bytes=64 * 1024, x264_preset="ultrafast")


def row(source: str, clip_id: str = "clip", start_s: float = 0.0, end_s=None) -> ClipRow:
    return ClipRow(clip_id=clip_id, dataset="test", source=source, start_s=start_s, end_s=end_s, identity="p0")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def sun(samples_dir) -> bytes:
    return (samples_dir / "sun.mp4").read_bytes()


@pytest.fixture(scope="module")
def short(samples_dir) -> Path:
    return samples_dir / "more" / "lp_d0.mp4"  # 3.1 s, no audio: cheap to copy around


# ---------------------------------------------------------------- local and file:// sources


def test_local_whole_source_is_stream_copied(samples_dir, tmp_path, cfg, sun):
    res = download_clip(row(str(samples_dir / "sun.mp4")), tmp_path / "out", cfg)
    assert res.path == tmp_path / "out" / "clip.mp4" and res.path.exists()
    assert res.source_kind == "local" and res.trimmed is False
    assert res.source_sha256 == sha(sun) and res.source_bytes == len(sun)
    assert res.sha256 == sha(res.path.read_bytes()) and res.bytes == res.path.stat().st_size
    info = probe(res.path)
    assert info.has_audio and abs(info.duration_s - 22.01) < 0.05
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["clip.mp4"]  # no temp left behind


def test_trim_2_to_4_is_two_seconds_with_audio(samples_dir, tmp_path, cfg):
    res = download_clip(row(f"file://{samples_dir / 'sun.mp4'}", start_s=2.0, end_s=4.0), tmp_path, cfg)
    assert res.source_kind == "file" and res.trimmed is True
    info = probe(res.path)
    assert info.has_video and info.has_audio and info.fps == FPS
    assert abs(info.duration_s - 2.0) <= 1 / FPS
    frames = read_frames(res.path, scale_to=(32, 32))
    assert abs(frames.shape[0] - 50) <= 1
    audio = read_audio(res.path)  # 16 kHz mono
    assert abs(audio.size / 16_000 - 2.0) <= 1 / FPS
    assert float(abs(audio).max()) > 0.01  # speech, not silence

    # Accurate seek: the first frame of the cut is source frame 50 (t = 2.0 s), not a keyframe before it.
    src = np.concatenate(list(itertools.islice(iter_frames(samples_dir / "sun.mp4", scale_to=(32, 32)), 2)))
    diffs = [float(abs(frames[0].astype(int) - src[i].astype(int)).mean()) for i in range(40, 60)]
    assert 40 + diffs.index(min(diffs)) == 50


def test_relative_local_path_resolves_against_local_root(samples_dir, tmp_path, cfg):
    cfg.local_root = samples_dir
    res = download_clip(row("more/lp_d0.mp4"), tmp_path, cfg)
    assert res.source_path == (samples_dir / "more" / "lp_d0.mp4").resolve()
    assert res.has_audio is False and res.trimmed is False


def test_end_past_source_too_far_is_too_short_and_slightly_past_is_clamped(short, tmp_path, cfg):
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(str(short), start_s=5.0, end_s=6.0), tmp_path, cfg)
    assert exc.value.reason == "too_short" and "3.120" in exc.value.detail
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(str(short), start_s=1.0, end_s=9.0), tmp_path, cfg)
    assert exc.value.reason == "too_short"
    res = download_clip(row(str(short), start_s=1.0, end_s=3.3), tmp_path, cfg)  # within end_slack_s
    assert abs(res.duration_s - 2.12) <= 1 / FPS
    assert not list(tmp_path.glob(".*.tmp.mp4"))


def test_missing_local_source_is_unreachable(tmp_path, cfg):
    for source in (str(tmp_path / "nowhere.mp4"), f"file://{tmp_path}/nowhere.mp4", str(tmp_path)):
        with pytest.raises(ClipRejected) as exc:
            download_clip(row(source), tmp_path / "out", cfg)
        assert exc.value.reason == "unreachable", source


def test_random_bytes_are_corrupt(tmp_path, cfg):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(50_000))
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(str(junk)), tmp_path / "out", cfg)
    assert exc.value.reason == "corrupt" and "not a readable media file" in exc.value.detail
    assert not (tmp_path / "out" / "clip.mp4").exists()


def test_audio_only_source_is_no_video(samples_dir, tmp_path, cfg):
    m4a = tmp_path / "speech.m4a"
    subprocess.run([sys.executable, "-c", "import sys; from tasks.media import run_ffmpeg; "
                    "run_ffmpeg(['-i', sys.argv[1], '-t', '2', '-vn', '-c:a', 'copy', '-y', sys.argv[2]], 'a')",
                    str(samples_dir / "sun.mp4"), str(m4a)], check=True, cwd=Path(__file__).parents[1])
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(str(m4a)), tmp_path / "out", cfg)
    assert exc.value.reason == "no_video"


def test_expected_sha256_fragment_is_checked(short, tmp_path, cfg):
    good = sha(short.read_bytes())
    assert download_clip(row(f"{short}#sha256={good}"), tmp_path, cfg).source_sha256 == good
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(f"{short}#sha256={'0' * 64}"), tmp_path, cfg)
    assert exc.value.reason == "download_failed" and "mismatch" in exc.value.detail


def test_shell_metacharacters_never_reach_a_shell(short, tmp_path, cfg, monkeypatch):
    weird_dir = tmp_path / "we'ird $(touch PWNED) dir"
    weird_dir.mkdir()
    src = weird_dir / "a;b`touch PWNED2`.mp4"
    src.write_bytes(short.read_bytes())
    calls = []
    real_run, real_popen = subprocess.run, subprocess.Popen

    def spy_run(args, *a, **kw):
        calls.append((args, kw.get("shell", False)))
        return real_run(args, *a, **kw)

    monkeypatch.setattr(subprocess, "run", spy_run)
    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **kw: calls.append((args, kw.get("shell"))) or
                        real_popen(args, *a, **kw))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    raw_id = "x; rm -rf ~ && echo $(id) | tee `pwd`/../evil"
    res = download_clip(row(str(src), clip_id=raw_id, start_s=0.5, end_s=1.5), out, cfg)
    assert res.path.parent == out and re.fullmatch(r"[A-Za-z0-9_-]+\.mp4", res.path.name)
    assert res.path.name == sanitize_clip_id(raw_id) + ".mp4" and res.path.name.startswith("x_rm_-rf")
    assert [p.name for p in out.iterdir()] == [res.path.name]
    assert calls and all(isinstance(args, list) and not shell for args, shell in calls)
    assert not list(tmp_path.rglob("PWNED*")) and not list(tmp_path.rglob("evil*"))


# ---------------------------------------------------------------- http(s)


def test_http_full_download_equals_source(server, tmp_path, cfg, sun):
    server.files["/v/sun.mp4"] = sun
    res = download_clip(row(server.url("/v/sun.mp4")), tmp_path / "out", cfg)
    assert res.source_kind == "http" and res.source_sha256 == sha(sun) and res.source_bytes == len(sun)
    assert res.source_path.read_bytes() == sun
    assert res.source_path.parent == cache_entry(cfg.cache_dir, server.url("/v/sun.mp4")).dir
    assert not list(res.source_path.parent.glob("*.part*"))
    assert server.log.requests == [("/v/sun.mp4", None, 200, len(sun))]


def test_http_resumes_a_part_file(server, tmp_path, cfg, sun):
    url = server.url("/v/sun.mp4")
    server.files["/v/sun.mp4"] = sun
    entry = cache_entry(cfg.cache_dir, url)
    entry.dir.mkdir(parents=True)
    n = 1_000_000
    entry.part_path(".mp4").write_bytes(sun[:n])  # as a killed download leaves it
    fetched = fetch_source(url, cfg)
    assert fetched.path.read_bytes() == sun and fetched.sha256 == sha(sun)
    assert server.log.requests == [("/v/sun.mp4", f"bytes={n}-", 206, len(sun) - n)]
    assert not entry.part_path(".mp4").exists()


def test_killed_download_leaves_only_a_part_that_is_resumed(server, cfg, sun):
    url = server.url("/v/sun.mp4")
    server.files["/v/sun.mp4"], server.drip_s = sun, 0.05
    entry = cache_entry(cfg.cache_dir, url)
    part = entry.part_path(".mp4")
    code = ("import sys; from pathlib import Path; from tasks.steps.download import DownloadConfig, fetch_source; "
            "fetch_source(sys.argv[1], DownloadConfig(cache_dir=Path(sys.argv[2]), chunk_bytes=65536))")
    child = subprocess.Popen([sys.executable, "-c", code, url, str(cfg.cache_dir)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size >= 4 * 65536) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    have = part.stat().st_size
    assert 0 < have < len(sun)
    assert sorted(p.name for p in entry.dir.iterdir() if p.name != ".lock") == [part.name, part.name + ".json"]
    assert entry.cached("http") is None

    server.drip_s = 0.0
    fetched = fetch_source(url, cfg)
    assert fetched.path.read_bytes() == sun and fetched.sha256 == sha(sun)
    # The killed child's request may be logged after this one (its server thread finishes late): look it up.
    assert ("/v/sun.mp4", f"bytes={have}-", 206, len(sun) - have) in server.log.requests
    assert [r for r in server.log.requests if r[1] is not None] == [("/v/sun.mp4", f"bytes={have}-", 206, len(sun) - have)]


def test_http_part_of_a_changed_resource_is_restarted(server, cfg, sun, short):
    """If-Range carries the saved ETag: the server sends the new file whole, not a splice."""
    url = server.url("/v/sun.mp4")
    server.files["/v/sun.mp4"] = sun
    entry = cache_entry(cfg.cache_dir, url)
    entry.dir.mkdir(parents=True)
    part = entry.part_path(".mp4")
    part.write_bytes(short.read_bytes()[:300_000])  # started from an older version of the resource
    part.with_name(part.name + ".json").write_text('{"etag": "\\"old\\"", "total": 2958395}')
    assert fetch_source(url, cfg).sha256 == sha(sun)
    assert server.log.requests == [("/v/sun.mp4", "bytes=300000-", 200, len(sun))]


def test_http_server_without_range_support_restarts_the_part(server, cfg, sun):
    url = server.url("/v/sun.mp4")
    server.files["/v/sun.mp4"], server.ignore_range = sun, True
    entry = cache_entry(cfg.cache_dir, url)
    entry.dir.mkdir(parents=True)
    entry.part_path(".mp4").write_bytes(sun[:500_000])
    assert fetch_source(url, cfg).path.read_bytes() == sun
    assert server.log.requests == [("/v/sun.mp4", "bytes=500000-", 200, len(sun))]


def test_http_complete_part_is_finished_without_a_body(server, cfg, sun):
    """Killed after the last byte but before the rename: the server answers 416 and nothing is re-sent."""
    url = server.url("/v/sun.mp4")
    server.files["/v/sun.mp4"] = sun
    entry = cache_entry(cfg.cache_dir, url)
    entry.dir.mkdir(parents=True)
    entry.part_path(".mp4").write_bytes(sun)
    assert fetch_source(url, cfg).sha256 == sha(sun)
    assert server.log.requests == [("/v/sun.mp4", f"bytes={len(sun)}-", 416, 0)]


def test_http_interrupted_body_is_resumed_within_the_call(server, cfg, sun):
    server.files["/v/sun.mp4"] = sun
    server.cut_after["/v/sun.mp4"] = 700_000
    fetched = fetch_source(server.url("/v/sun.mp4"), cfg)
    assert fetched.sha256 == sha(sun)
    first, second = server.log.requests
    assert first == ("/v/sun.mp4", None, 200, 700_000)
    # requests hands over whole chunks, so the .part holds what arrived up to the last full chunk
    offset = int(second[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 700_000 and offset % cfg.chunk_bytes == 0
    assert second == ("/v/sun.mp4", f"bytes={offset}-", 206, len(sun) - offset)


def test_http_retries_503_then_succeeds(server, cfg, short):
    data = short.read_bytes()
    server.files["/a.mp4"] = data
    server.fail["/a.mp4"] = [503, 503]
    assert fetch_source(server.url("/a.mp4"), cfg).sha256 == sha(data)
    assert [r[2] for r in server.log.requests] == [503, 503, 200]


def test_http_always_failing_gives_download_failed_after_retries(server, cfg):
    server.always["/down.mp4"] = 503
    cfg.retries = 4
    with pytest.raises(ClipRejected) as exc:
        fetch_source(server.url("/down.mp4"), cfg)
    assert exc.value.reason == "download_failed" and "4 attempts" in exc.value.detail and "503" in exc.value.detail
    assert server.log.hits("/down.mp4") == 4


def test_http_404_is_unreachable_without_retrying(server, tmp_path, cfg):
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(server.url("/missing.mp4")), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "404" in exc.value.detail
    assert server.log.hits("/missing.mp4") == 1


def test_http_refused_connection_is_unreachable(tmp_path, cfg):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(f"http://127.0.0.1:{port}/x.mp4"), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "3 attempts" in exc.value.detail


def test_http_stated_digest_is_verified(server, cfg, short):
    data = short.read_bytes()
    server.files["/good.mp4"] = data
    server.files["/bad.mp4"] = data
    good = base64.b64encode(hashlib.sha256(data).digest()).decode()
    server.extra_headers["/good.mp4"] = {"Repr-Digest": f"sha-256=:{good}:"}
    server.extra_headers["/bad.mp4"] = {"Repr-Digest": f"sha-256=:{base64.b64encode(bytes(32)).decode()}:"}
    assert fetch_source(server.url("/good.mp4"), cfg).sha256 == sha(data)
    with pytest.raises(ClipRejected) as exc:
        fetch_source(server.url("/bad.mp4"), cfg)
    assert exc.value.reason == "download_failed" and "sha256 mismatch" in exc.value.detail
    assert server.log.hits("/bad.mp4") == 1  # a fresh (not resumed) download is not retried on mismatch
    assert not list(cache_entry(cfg.cache_dir, server.url("/bad.mp4")).dir.glob("source*"))


def test_shared_source_is_fetched_once(server, tmp_path, cfg, sun):
    server.files["/v/sun.mp4"] = sun
    url = server.url("/v/sun.mp4")
    a = download_clip(row(url, "c1", 1.0, 2.0), tmp_path, cfg)
    b = download_clip(row(url, "c2", 3.0, 4.0), tmp_path, cfg)
    assert server.log.hits("/v/sun.mp4") == 1
    assert (a.source_cached, b.source_cached) == (False, True) and a.source_path == b.source_path
    assert a.sha256 != b.sha256 and abs(a.duration_s - 1.0) <= 1 / FPS and abs(b.duration_s - 1.0) <= 1 / FPS


def test_shared_source_fetched_once_under_concurrency(server, cfg, short):
    server.files["/s.mp4"] = short.read_bytes()
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch_source(server.url("/s.mp4"), cfg)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len({r.sha256 for r in results}) == 1
    assert server.log.hits("/s.mp4") == 1 and sum(not r.cached for r in results) == 1


def test_http_html_error_page_is_corrupt_and_evicted(server, tmp_path, cfg):
    server.files["/page.mp4"] = b"<html><body>Please log in</body></html>" * 50
    with pytest.raises(ClipRejected) as exc:
        download_clip(row(server.url("/page.mp4")), tmp_path, cfg)
    assert exc.value.reason == "corrupt"
    assert cache_entry(cfg.cache_dir, server.url("/page.mp4")).cached("http") is None


# ---------------------------------------------------------------- fsspec and YouTube


def test_memory_fsspec_source(short, tmp_path, cfg):
    data = short.read_bytes()
    with fsspec.open("memory://dl-test/clips/d0.mp4", "wb") as f:
        f.write(data)
    try:
        res = download_clip(row("memory://dl-test/clips/d0.mp4", start_s=1.0, end_s=2.0), tmp_path, cfg)
        assert res.source_kind == "fsspec" and res.source_sha256 == sha(data)
        assert res.source_path.read_bytes() == data and abs(res.duration_s - 1.0) <= 1 / FPS
        with pytest.raises(ClipRejected) as exc:
            download_clip(row("memory://dl-test/clips/absent.mp4"), tmp_path, cfg)
        assert exc.value.reason == "unreachable"
    finally:
        fsspec.filesystem("memory").rm("/dl-test", recursive=True)


def test_unknown_fsspec_protocol_is_unreachable(tmp_path, cfg):
    with pytest.raises(ClipRejected) as exc:
        download_clip(row("nosuchproto://bucket/a.mp4"), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "nosuchproto" in exc.value.detail


def test_s3_without_s3fs_is_unreachable(tmp_path, cfg):
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed here; this checks the message when it is not")
    except ImportError:
        pass
    with pytest.raises(ClipRejected) as exc:
        download_clip(row("s3://some-bucket/a.mp4"), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "not installed" in exc.value.detail


def test_youtube_without_yt_dlp_is_unreachable(tmp_path, cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # makes `import yt_dlp` raise ImportError
    with pytest.raises(ClipRejected) as exc:
        download_clip(row("youtube:dQw4w9WgXcQ"), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "yt-dlp is not installed" in exc.value.detail
    with pytest.raises(ClipRejected) as exc:
        download_clip(row("youtube:bad id; rm"), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "malformed YouTube id" in exc.value.detail


class _FakeYoutubeDL:
    """Stands in for yt_dlp.YoutubeDL: copies a sample to the output template, or fails like it does."""

    sample: Path
    calls: list = []
    error: str | None = None

    def __init__(self, options):
        self.options = options

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def extract_info(self, url, download):
        type(self).calls.append((url, download, self.options))
        if self.error:
            raise RuntimeError(self.error)
        out = Path(self.options["outtmpl"].replace("%(ext)s", "mp4"))
        out.write_bytes(self.sample.read_bytes())
        return {"title": "t", "requested_downloads": [{"filepath": str(out)}]}


def test_youtube_through_yt_dlp_api(short, tmp_path, cfg, monkeypatch):
    import types

    fake = types.ModuleType("yt_dlp")
    fake.YoutubeDL = _FakeYoutubeDL
    _FakeYoutubeDL.sample, _FakeYoutubeDL.calls, _FakeYoutubeDL.error = short, [], None
    monkeypatch.setitem(sys.modules, "yt_dlp", fake)
    a = download_clip(row("youtube:dQw4w9WgXcQ", "y1", 0.0, 1.0), tmp_path, cfg)
    b = download_clip(row("youtube:dQw4w9WgXcQ", "y2", 1.0, 2.0), tmp_path, cfg)
    assert a.source_kind == "youtube" and a.source_sha256 == sha(short.read_bytes())
    assert len(_FakeYoutubeDL.calls) == 1 and b.source_cached  # one download for two clips
    url, download, opts = _FakeYoutubeDL.calls[0]
    assert url == "https://www.youtube.com/watch?v=dQw4w9WgXcQ" and download is True
    assert opts["merge_output_format"] == "mp4" and opts["retries"] == cfg.retries - 1

    _FakeYoutubeDL.error = "ERROR: [youtube] abcdefghijk: Video unavailable. This video has been removed"
    with pytest.raises(ClipRejected) as exc:
        download_clip(row("youtube:abcdefghijk"), tmp_path, cfg)
    assert exc.value.reason == "unreachable" and "Video unavailable" in exc.value.detail
    _FakeYoutubeDL.error = "ERROR: Postprocessing: Conversion failed!"
    with pytest.raises(ClipRejected) as exc:
        download_clip(row("youtube:abcdefghijl"), tmp_path, cfg)
    assert exc.value.reason == "download_failed"


def test_batch_records_failures_per_clip_and_fetches_shared_sources_once(server, samples_dir, tmp_path, cfg,
                                                                        short):
    server.files["/s.mp4"] = short.read_bytes()
    url = server.url("/s.mp4")
    rows = [row(url, "a", 0.0, 1.0), row(server.url("/gone.mp4"), "b"), row(url, "c", 1.0, 2.0),
            row(str(samples_dir / "more" / "lp_d0.mp4"), "d", 0.0, 9.0), row(url, "e", 2.0, 3.0)]
    out = download_batch(rows, tmp_path / "out", cfg, workers=3)
    assert [getattr(o, "reason", "ok") for o in out] == ["ok", "unreachable", "ok", "too_short", "ok"]
    assert [o.path.name for o in out if not isinstance(o, ClipRejected)] == ["a.mp4", "c.mp4", "e.mp4"]
    assert server.log.hits("/s.mp4") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "c.mp4", "e.mp4"]


def test_config_validation_and_fingerprint(tmp_path):
    with pytest.raises(ValueError, match="retries"):
        DownloadConfig(cache_dir=tmp_path, retries=0)
    with pytest.raises(ValueError, match="crf"):
        DownloadConfig(cache_dir=tmp_path, crf=60)
    base = DownloadConfig(cache_dir=tmp_path)
    assert base.fingerprint() == DownloadConfig(cache_dir=tmp_path / "other", retries=9).fingerprint()
    assert base.fingerprint() != DownloadConfig(cache_dir=tmp_path, crf=23).fingerprint()


# ---------------------------------------------------------------- through the step runner: cache keys, retries


def _run(steps, rows, store, run_id):
    """Each step over fresh states of `rows`; returns {(step, clip): entry}."""
    from tasks.step_runner import ClipState, run_step

    states = [ClipState(r) for r in rows]
    return {(e.step, e.clip_id): e for s in steps for e in run_step(s, states, store, run_id)}


def _actions(entries) -> dict:
    return {k: e.action for k, e in entries.items()}


def test_manifest_row_edits_recompute_exactly_that_clip(samples_dir, tmp_path, cfg):
    from tasks.step_store import StepStore
    from tasks.steps.crop import CropStep
    from tasks.steps.download import DOWNLOADED_VIDEO, DownloadStep

    store, steps = StepStore(tmp_path / "steps"), [DownloadStep(cfg), CropStep()]
    sun = row(str(samples_dir / "sun.mp4"), "sun", 0.0, 2.0)
    yongen = row(str(samples_dir / "yongen.mp4"), "yongen", 0.0, 2.0)
    first = _run(steps, [sun, yongen], store, "r1")
    assert {e.status for e in first.values()} == {"ok"}
    assert set(_actions(_run(steps, [sun, yongen], store, "r2")).values()) == {"skipped"}

    # a corrected time range: that clip's download and crop run again, the other clip is untouched
    yongen = yongen.model_copy(update={"end_s": 1.6})
    e = _run(steps, [sun, yongen], store, "r3")
    assert _actions(e) == {("download", "sun"): "skipped", ("crop", "sun"): "skipped",
                           ("download", "yongen"): "ran", ("crop", "yongen"): "ran"}
    assert probe(store.clip_dir("download", "yongen") / DOWNLOADED_VIDEO).duration_s == pytest.approx(1.6, abs=0.05)
    assert e["download", "yongen"].checksum != first["download", "yongen"].checksum

    # a changed source (here: a stated checksum) downloads again; the crop follows only if the bytes changed
    sun = sun.model_copy(update={"source": f"{sun.source}#sha256={sha((samples_dir / 'sun.mp4').read_bytes())}"})
    e = _run(steps, [sun, yongen], store, "r4")
    assert e["download", "sun"].action == "ran" and e["download", "yongen"].action == "skipped"
    same_bytes = e["download", "sun"].checksum == first["download", "sun"].checksum
    assert e["crop", "sun"].action == ("skipped" if same_bytes else "ran")
    assert e["crop", "yongen"].action == "skipped"

    # a corrected face box: the crop runs again, the download does not
    yongen = yongen.model_copy(update={"face_box": [189.0, 196.0, 489.0, 496.0]})
    e = _run(steps, [sun, yongen], store, "r5")
    assert _actions(e) == {("download", "sun"): "skipped", ("crop", "sun"): "skipped",
                           ("download", "yongen"): "skipped", ("crop", "yongen"): "ran"}
    assert e["crop", "yongen"].status == "ok"


def test_transient_http_failure_is_retried_next_run_and_a_404_stays_cached(server, tmp_path, cfg, short):
    from tasks.ledger import step_counts
    from tasks.step_store import StepStore
    from tasks.steps.download import DownloadStep

    server.files["/flaky.mp4"] = short.read_bytes()
    server.always["/flaky.mp4"] = 503
    store, steps = StepStore(tmp_path / "steps"), [DownloadStep(cfg)]
    rows = [row(server.url("/flaky.mp4"), "flaky", 0.0, 1.0), row(server.url("/gone.mp4"), "gone")]
    e = _run(steps, rows, store, "r1")
    assert (e["download", "flaky"].status, e["download", "flaky"].reason) == ("retryable", "download_failed")
    assert (e["download", "gone"].status, e["download", "gone"].reason) == ("rejected", "unreachable")
    counts = step_counts(e.values())[0]
    assert (counts["ok"], counts["retryable"], counts["rejected"]) == (0, 1, 1)

    del server.always["/flaky.mp4"]  # the server is back
    e = _run(steps, rows, store, "r2")
    assert (e["download", "flaky"].status, e["download", "flaky"].action) == ("ok", "ran")
    assert (e["download", "gone"].status, e["download", "gone"].action) == ("rejected", "skipped")
    assert server.log.hits("/gone.mp4") == 1  # the 404 was asked once, in the first run


def test_fetchers_mark_transient_failures_retryable_and_permanent_ones_not(server, tmp_path, cfg, short,
                                                                          monkeypatch):
    import socket
    import types

    from tasks.errors import ClipRetryable
    from tasks.fetchers import fsspec_source

    def failure(source: str) -> ClipRejected:
        with pytest.raises(ClipRejected) as exc:
            fetch_source(source, cfg)
        return exc.value

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/x.mp4"
    server.always["/busy.mp4"] = 429
    server.files["/a.mp4"] = short.read_bytes()
    bad_sum = server.url("/a.mp4") + "#sha256=" + "0" * 64
    transient = {refused: "unreachable", server.url("/busy.mp4"): "download_failed"}
    permanent = {server.url("/missing.mp4"): "unreachable", bad_sum: "download_failed",
                 "http:///x.mp4": "unreachable"}
    for source, reason in transient.items():
        exc = failure(source)
        assert isinstance(exc, ClipRetryable) and exc.reason == reason, source
    for source, reason in permanent.items():
        exc = failure(source)
        assert not isinstance(exc, ClipRetryable) and exc.reason == reason, source

    calls = []

    def flaky_copy(fs, path, part, chunk_bytes):
        calls.append(path)
        raise ConnectionResetError("peer reset")

    fsspec.filesystem("memory").pipe("/flaky.mp4", short.read_bytes())
    monkeypatch.setattr(fsspec_source, "_copy", flaky_copy)
    assert isinstance(failure("memory://flaky.mp4"), ClipRetryable) and len(calls) == cfg.retries

    fake = types.ModuleType("yt_dlp")
    fake.YoutubeDL = _FakeYoutubeDL
    monkeypatch.setitem(sys.modules, "yt_dlp", fake)
    _FakeYoutubeDL.calls = []
    for message, retryable in (("ERROR: Unable to download webpage: <urlopen error timed out>", True),
                               ("ERROR: unable to download video data: HTTP Error 503: Service Unavailable", True),
                               ("ERROR: [youtube] abcdefghijk: Video unavailable", False)):
        _FakeYoutubeDL.error = message
        assert isinstance(failure("youtube:abcdefghijk"), ClipRetryable) == retryable, message


def test_retry_waits_grow_with_jitter_and_honour_retry_after():
    """tenacity's full-jitter exponential wait, capped; a server's Retry-After is waited at least (within the cap)."""
    from tenacity import RetryCallState

    from tasks.fetchers.retry import RetryPolicy

    policy = RetryPolicy(attempts=5, backoff_s=1.0, max_backoff_s=8.0)

    def after(attempt: int, exc: Exception) -> RetryCallState:
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        state.set_exception((type(exc), exc, None))
        return state

    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 8.0)):
        waits = [policy.wait_s(after(attempt, OSError("reset"))) for _ in range(200)]
        assert 0.0 <= min(waits) and max(waits) <= cap + 1e-9 and max(waits) > cap / 2  # spread over [0, cap]

    class Busy(Exception):
        def __init__(self, seconds):
            super().__init__("503")
            self.retry_after_s = seconds

    assert all(policy.wait_s(after(1, Busy(5.0))) >= 5.0 for _ in range(50))
    assert policy.wait_s(after(1, Busy(100.0))) == 8.0
