"""Step outputs under an fsspec URL (memory:// here): same records and checksums as a local root, skip on
re-run, verified inputs, whole-dir replacement, clean-up of temp keys and scratch, and the preprocess flow
writing byte-identical shards with no shared folder."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from datasets_manifest.schema import ClipRow, rows_to_table
from tasks import storage
from tasks.errors import ClipRejected
from tasks.ledger import read_ledger
from tasks.step_runner import ClipState, run_step
from tasks.step_store import STATUS_FILE, StepOutputCorrupt, StepStore

ROOT = "memory://steps-test/root"


@pytest.fixture
def mem():
    """An empty in-memory filesystem, emptied again afterwards."""
    def clear():
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs.clear()
        MemoryFileSystem.pseudo_dirs.append("")

    clear()
    yield fsspec.filesystem("memory")
    clear()


@dataclass
class Writer:
    """Writes `files` (nested names allowed); rejects ids containing 'bad'."""

    files: dict
    name: str = "writer"
    version: str = "1"
    requires: tuple = ()
    calls: list = field(default_factory=list)

    def fingerprint(self) -> str:
        return "cfg"

    def run(self, row, inputs, out_dir: Path) -> dict:
        self.calls.append(row.clip_id)
        if "bad" in row.clip_id:
            raise ClipRejected("no_face", "nothing to see")
        for rel, data in self.files.items():
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / rel).write_bytes(data + row.clip_id.encode())
        return {"n": len(self.files)}


@dataclass
class Reader:
    """Concatenates the upstream's files (sorted by name) and remembers where it read them."""

    name: str = "reader"
    version: str = "1"
    requires: tuple = ("writer",)
    calls: list = field(default_factory=list)
    seen: list = field(default_factory=list)

    def fingerprint(self) -> str:
        return "cfg"

    def run(self, row, inputs, out_dir: Path) -> dict:
        self.calls.append(row.clip_id)
        src = inputs["writer"]
        self.seen.append(src)
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != STATUS_FILE)
        (out_dir / "joined.bin").write_bytes(b"|".join(p.read_bytes() for p in files))
        return {}


@dataclass
class Rejecting(Writer):
    files: dict = field(default_factory=dict)
    version: str = "3"

    def run(self, row, inputs, out_dir: Path) -> dict:
        (out_dir / "partial.bin").write_bytes(b"never published")
        raise ClipRejected("no_face", "gone")


FILES = {"a.txt": b"alpha-", "sub/b.bin": b"\x00\x01-"}


def _states(ids):
    return [ClipState(ClipRow(clip_id=i, dataset="t", source=f"/x/{i}.mp4", identity=i)) for i in ids]


def _run(store, ids, *steps):
    states = _states(ids)
    return [e for s in steps for e in run_step(s, states, store, "r")]


def _remote_names(fs, step, clip):
    prefix = f"/steps-test/root/{step}/{clip}"
    return sorted(k[len(prefix) + 1:] for k in fs.find(prefix))


def _inputs_left(scratch: Path) -> list[Path]:
    return [p for p in scratch.rglob("*") if p.is_file() and "inputs" in p.parts]


def test_round_trip_matches_a_local_store_and_a_rerun_skips(mem, tmp_path):
    local, remote = StepStore(tmp_path / "local"), StepStore(ROOT, scratch=tmp_path / "scratch")
    assert remote.remote and not local.remote
    ids = ["a", "bad1"]
    _run(local, ids, Writer(FILES), Reader())
    w, r = Writer(FILES), Reader()
    first = _run(remote, ids, w, r)
    assert {(e.clip_id, e.step): (e.status, e.action) for e in first} == {
        ("a", "writer"): ("ok", "ran"), ("bad1", "writer"): ("rejected", "ran"), ("a", "reader"): ("ok", "ran")}

    for step, clip in [("writer", "a"), ("reader", "a"), ("writer", "bad1")]:
        lr, rr = local.load(step, clip), remote.load(step, clip)
        assert (rr.status, rr.key, rr.checksum, rr.info) == (lr.status, lr.key, lr.checksum, lr.info)
    assert remote.load("writer", "a").checksum  # ok records carry a checksum; identical bytes -> identical sum
    assert _remote_names(mem, "writer", "a") == [STATUS_FILE, "a.txt", "sub/b.bin"]
    assert _remote_names(mem, "writer", "bad1") == [STATUS_FILE]  # a rejection publishes only its status
    assert _remote_names(mem, "reader", "a") == [STATUS_FILE, "joined.bin"]
    assert r.seen[0].is_relative_to(tmp_path / "scratch")  # the step read local files

    got = remote.clip_dir("reader", "a")
    assert (got / "joined.bin").read_bytes() == (local.clip_dir("reader", "a") / "joined.bin").read_bytes() \
        == b"alpha-a|\x00\x01-a"
    assert json.loads((got / STATUS_FILE).read_text()) == asdict(remote.load("reader", "a"))  # looks like a local dir
    assert remote.clip_dir("writer", "zzz").exists() is False  # like a local store: no output, no folder
    remote.release()

    w.calls.clear()
    r.calls.clear()
    again = _run(remote, ids, w, r)
    assert w.calls == [] and r.calls == []
    assert {e.action for e in again} == {"skipped"} and len(again) == 3
    assert StepStore(f"{ROOT}/").load("writer", "a") == remote.load("writer", "a")  # a trailing slash is the same root


def test_corrupt_remote_file_fails_the_downstream_clip_with_a_clear_reason(mem, tmp_path):
    remote = StepStore(ROOT, scratch=tmp_path / "scratch")
    w, r = Writer(FILES), Reader()
    _run(remote, ["a", "b"], w)
    mem.pipe_file("/steps-test/root/writer/a/sub/b.bin", b"flipped bits")

    with pytest.raises(StepOutputCorrupt, match=r"writer/a under memory://steps-test/root does not match its recorded checksum"):
        remote.clip_dir("writer", "a")
    assert _inputs_left(tmp_path / "scratch") == []  # a rejected download is not kept

    entries = _run(remote, ["a", "b"], w, r)
    by = {(e.clip_id, e.step): e for e in entries}
    assert by[("a", "writer")].action == "skipped"  # the upstream record itself still reads fine
    assert (by[("a", "reader")].status, by[("a", "reader")].reason) == ("failed", "corrupt_input")
    assert "does not match its recorded checksum" in by[("a", "reader")].detail
    assert by[("b", "reader")].status == "ok" and r.calls == ["b"]
    assert remote.load("reader", "a") is None


def test_cached_copy_is_reused_while_it_checks_out_and_refetched_when_not(mem, tmp_path):
    remote = StepStore(ROOT, scratch=tmp_path / "scratch")
    _run(remote, ["a"], Writer(FILES))
    d = remote.clip_dir("writer", "a")
    assert (d / "a.txt").read_bytes() == b"alpha-a"
    mem.rm_file("/steps-test/root/writer/a/a.txt")  # no download happens for a verified cached copy...
    assert remote.clip_dir("writer", "a") == d and (d / "a.txt").read_bytes() == b"alpha-a"
    (d / "a.txt").write_bytes(b"tampered")  # ...but a copy that no longer matches is fetched again
    with pytest.raises(StepOutputCorrupt):  # (and here the remote lost the file, so that fails loudly)
        remote.clip_dir("writer", "a")


def test_new_commit_replaces_the_whole_clip_dir(mem, tmp_path):
    remote = StepStore(ROOT, scratch=tmp_path / "scratch")
    _run(remote, ["a"], Writer({"a.txt": b"v1-", "sub/old.bin": b"old-", "sub/deeper/x": b"x-"}))
    assert _remote_names(mem, "writer", "a") == [STATUS_FILE, "a.txt", "sub/deeper/x", "sub/old.bin"]

    w2 = Writer({"a.txt": b"v2-"}, version="2")
    _run(remote, ["a"], w2)
    assert _remote_names(mem, "writer", "a") == [STATUS_FILE, "a.txt"]
    d = remote.clip_dir("writer", "a")
    assert sorted(p.name for p in d.rglob("*") if p.is_file()) == [STATUS_FILE, "a.txt"] and (d / "a.txt").read_bytes() == b"v2-a"

    _run(remote, ["a"], Rejecting())
    assert _remote_names(mem, "writer", "a") == [STATUS_FILE]
    assert remote.load("writer", "a").status == "rejected"


def test_failed_upload_leaves_no_old_status_and_is_retried(mem, tmp_path, monkeypatch):
    remote = StepStore(ROOT, scratch=tmp_path / "scratch")
    _run(remote, ["a"], Writer(FILES))
    real_put = remote.fs.put_file
    monkeypatch.setattr(remote.fs, "put_file", lambda *a, **k: (_ for _ in ()).throw(OSError("connection reset")))
    [entry] = _run(remote, ["a"], Writer(FILES, version="2"))
    assert (entry.status, entry.reason) == ("failed", "publish_failed") and "connection reset" in entry.detail
    assert remote.load("writer", "a") is None  # never the v1 status beside half of v2's files
    monkeypatch.setattr(remote.fs, "put_file", real_put)
    [entry] = _run(remote, ["a"], Writer(FILES, version="2"))
    assert (entry.status, entry.action) == ("ok", "ran") and remote.load("writer", "a").version == "2"
    assert not (tmp_path / "scratch").exists() or not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]


def test_clean_staging_removes_temp_keys_and_scratch_leftovers(mem, tmp_path):
    remote = StepStore(ROOT, scratch=tmp_path / "scratch")
    _run(remote, ["a"], Writer(FILES))
    status_key = "/steps-test/root/writer/a/" + STATUS_FILE
    tmp_keys = [storage.tmp_name(status_key), storage.tmp_name("/steps-test/root/writer/b/a.txt")]
    for k in tmp_keys:
        mem.pipe_file(k, b"half")
    staging = remote.staging_dir("writer", "c")  # what a kill mid-step leaves behind
    (staging / "out.txt").write_text("half")
    kept = remote.clip_dir("writer", "a")  # a materialised input never released (killed worker)

    assert remote.clean_staging() == 4
    assert not any(mem.exists(k) for k in tmp_keys) and not staging.exists() and not kept.exists()
    assert _remote_names(mem, "writer", "a") == [STATUS_FILE, "a.txt", "sub/b.bin"]
    assert remote.load("writer", "a").status == "ok"
    assert remote.clean_staging() == 0


def test_scratch_keeps_no_inputs_after_release(mem, tmp_path):
    scratch = tmp_path / "scratch"
    remote = StepStore(ROOT, scratch=scratch)
    _run(remote, ["a", "b"], Writer(FILES), Reader())
    assert _inputs_left(scratch) == []  # run_step released each clip's inputs once its step ran
    assert not [p for p in scratch.rglob("*") if p.is_file()]  # and staging went with the upload

    with StepStore(ROOT, scratch=scratch) as store:
        one, two = store.clip_dir("writer", "a"), store.clip_dir("writer", "b")
        assert (one / "a.txt").exists() and (two / "a.txt").exists()
        store.release("a")
        assert not one.exists() and (two / "a.txt").exists()
    assert not two.exists() and _inputs_left(scratch) == []


def test_layout_puts_step_outputs_under_a_remote_root_and_keeps_downloads_local(tmp_path):
    from flows.layout import DatasetLayout
    from tasks.step_store import default_scratch_base

    remote = DatasetLayout("memory://b/out/", "t")
    assert (remote.output, remote.steps, remote.shards_url) == ("memory://b/out/t", "memory://b/out/t/steps", "memory://b/out/t/shards")
    assert remote.download_cache == default_scratch_base() / "_download_cache"
    assert DatasetLayout("memory://b/out", "t", scratch_root=str(tmp_path)).download_cache == tmp_path / "_download_cache"
    split = DatasetLayout(tmp_path / "out", "t", work_root="memory://bucket/work")
    assert (split.steps, split.ledger) == ("memory://bucket/work/t/steps", tmp_path / "out" / "t")
    assert split.download_cache == default_scratch_base() / "_download_cache"
    local = DatasetLayout(tmp_path / "out", "t", work_root=f"file://{tmp_path}/work")
    assert (local.steps, local.download_cache) == (tmp_path / "work" / "t" / "steps", tmp_path / "work" / "_download_cache")
    assert DatasetLayout(tmp_path / "out", "t").steps == tmp_path / "out" / "t" / "steps"
    with pytest.raises(ValueError, match="scratch_root memory://s must be a local folder"):
        DatasetLayout("memory://b/out", "t", scratch_root="memory://s")


# -- the real preprocess flow ---------------------------------------------------------------------------------

def _tars(fs, root: str) -> dict[str, bytes]:
    return {k[len(root):]: fs.cat_file(k) for k in sorted(fs.find(root)) if k.endswith(".tar")}


def test_preprocess_with_a_memory_output_root_writes_the_local_runs_shards(prefect_test_server, mem, samples_dir, tmp_path):
    from flows.preprocess import preprocess

    row = ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"), identity="a", start_s=0.0, end_s=1.6)
    manifest = tmp_path / "m.parquet"
    pq.write_table(rows_to_table([row]), manifest)
    common = dict(dataset="t", manifest=str(manifest), steps=["download", "crop", "shard"], windows={"shard_features": False})

    local = preprocess(output_root=str(tmp_path / "out"), **common)
    url = "memory://pp-test/out"
    remote = preprocess(output_root=url, storage={"scratch_root": str(tmp_path / "scratch")}, **common)
    assert remote["clips_out"] == local["clips_out"] == 1 and remote["shards"]["samples"] == local["shards"]["samples"] >= 1

    lfs, lroot = storage.filesystem(tmp_path / "out" / "t" / "shards")
    rfs, rroot = storage.filesystem(f"{url}/t/shards")
    local_tars, remote_tars = _tars(lfs, lroot), _tars(rfs, rroot)
    assert local_tars and local_tars == remote_tars
    names = tarfile.open(fileobj=io.BytesIO(next(iter(remote_tars.values())))).getnames()
    assert names and all(n.startswith("good_w000000.") for n in names)
    assert rfs.exists("/pp-test/out/t/steps/crop/good/" + STATUS_FILE)  # step outputs went to the URL too
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file() and "_download_cache" not in p.parts]

    again = preprocess(output_root=url, storage={"scratch_root": str(tmp_path / "scratch")}, **common)
    assert again["shards"]["skipped"]
    second = [r for r in read_ledger(f"{url}/t").to_pylist() if r["run_id"] == again["run_id"]]
    assert {(r["step"], r["action"]) for r in second} == {("download", "skipped"), ("crop", "skipped"), ("shard", "skipped")}


def test_load_many_gives_loads_records_in_order_for_local_and_remote_roots(mem, tmp_path):
    """The stale listing's batched read: the same records as one `load` per clip, in the clips' order, None where a
    clip has no status or a damaged one, on a local root (read in turn) and a remote one (runs read in threads)."""
    ids = ["a", "bad1", "c", "d"]
    for store in (StepStore(tmp_path / "local"), StepStore(ROOT, scratch=tmp_path / "scratch")):
        _run(store, ids[:3], Writer(FILES), Reader())
        damaged = "writer/c/" + STATUS_FILE
        if store.remote:
            mem.pipe_file(f"/steps-test/root/{damaged}", b"{not json")
        else:
            (store.root / damaged).write_bytes(b"{not json")
        asked = ["d", "c", "bad1", "a", "a", "zzz"]
        many = store.load_many("writer", asked, readers=3)
        assert many == [store.load("writer", i) for i in asked]
        assert [None if r is None else (r.clip_id, r.status) for r in many] == [
            None, None, ("bad1", "rejected"), ("a", "ok"), ("a", "ok"), None]
        assert [r and r.clip_id for r in store.load_many("reader", ["a", "bad1"])] == ["a", None]
