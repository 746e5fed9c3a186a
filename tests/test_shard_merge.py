"""Shard groups + the one merge: determinism across write order, garbage collection after a partial failure,
fsspec output roots (memory://, file://) that round-trip byte for byte."""
from __future__ import annotations

import hashlib
import io

import fsspec
import pyarrow.parquet as pq
import pytest

from datasets_manifest.schema import ClipRow
from tasks import contract
from tasks.ledger import read_ledger, write_ledger_part
from tasks.step_runner import LedgerEntry
from tasks.steps.shard import (
    INDEX_FILE,
    STATUS_FILE,
    ShardClip,
    ShardConfig,
    begin_shard_set,
    completed_set,
    group_key,
    iter_samples,
    merge_shard_groups,
    plan_groups,
    shard_group_of,
    write_shard_group,
    write_shards,
)

CFG = ShardConfig(window_frames=17, stride=100, max_samples_per_shard=1)  # 17-frame windows every 100 frames: 2 per clip
GROUPS = 4


def _ids_in_distinct_groups(n: int) -> list[str]:
    seen: dict[str, str] = {}
    for i in range(100):
        seen.setdefault(shard_group_of(f"clip{i}", GROUPS), f"clip{i}")
        if len(seen) == n:
            return sorted(seen.values())
    raise AssertionError("hash spread too narrow")


@pytest.fixture(scope="module")
def clips(yongen_crop):
    ids = _ids_in_distinct_groups(3)
    return [ShardClip(row=ClipRow(clip_id=i, dataset="t", source="/s/y.mp4", identity=i, split=split),
                      crop_dir=yongen_crop.clip_dir, frames=yongen_crop.frames, step_versions={"crop": "1"})
            for i, split in zip(ids, ("train", "train", "test"))]


@pytest.fixture(scope="module")
def ref(clips, tmp_path_factory):
    """The shard set written in one call, locally: what every other way of writing it must equal."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    stats = write_shards(clips, out, CFG, key="k", groups=GROUPS)
    return out, stats, _files(fsspec.filesystem("file"), str(out))


def _files(fs, root: str) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    prefix = root.rstrip("/") + "/"
    return {p[len(prefix):]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


def _local(tmp_path, name):
    return fsspec.filesystem("file"), str(tmp_path / name)


def test_groups_written_in_any_order_merge_to_the_same_bytes(clips, ref, tmp_path):
    _, stats, ref_files = ref
    assert stats.samples == 6 and stats.shards == 6 and set(stats.per_split) == {"train", "test"}
    planned = plan_groups(clips, GROUPS)
    assert len(planned) == 3
    out = tmp_path / "reversed"
    results = [write_shard_group(m, out, g, CFG, group_key("k", g, [c.row.clip_id for c in m]))
               for g, m in reversed(list(planned.items()))]
    merge_shard_groups(out, results, CFG, "k", GROUPS)
    fs, _ = _local(tmp_path, "x")
    assert _files(fs, str(out)) == ref_files
    names = sorted(p.split("/", 1)[1] for p in _files(fs, str(out)) if p.endswith(".tar"))
    assert names == sorted(f"shard-{shard_group_of(c.row.clip_id, GROUPS)}-{i:06d}.tar" for c in clips for i in (0, 1))


def test_partial_failure_leaves_no_orphan_duplicate_or_half_written_shard(clips, ref, tmp_path):
    fs, root = _local(tmp_path, "s")
    fs.copy(str(ref[0]), root, recursive=True)  # a finished set, as a completed run left it
    clean = ref[2]
    assert _files(fs, root) == clean
    victim = clips[0].row
    g = shard_group_of(victim.clip_id, GROUPS)
    # what a killed run and an older, larger run leave behind:
    half = f"{root}/train/shard-{g}-000000.tar"
    with open(half, "r+b") as f:  # a shard of the victim's group cut short ...
        f.truncate(1000)
    fs.rm_file(f"{root}/_groups/{g}.json")  # ... by a writer killed before its record
    fs.pipe_file(f"{root}/train/.shard-{g}-000001.tar.tmp-deadbeef", b"half a tar")  # a temp file
    fs.pipe_file(f"{root}/train/shard-{g}-000007.tar", b"old")  # shards an older run had and this one does not:
    g2 = shard_group_of(clips[1].row.clip_id, GROUPS)  # in the rewritten group and in a group that is reused
    fs.pipe_file(f"{root}/train/shard-{g2}-000007.tar", b"old")
    fs.pipe_file(f"{root}/test/shard-g0099-000000.tar", b"old")  # a group that no longer exists
    fs.pipe_file(f"{root}/_groups/g0099.json", b"{}")
    assert completed_set(root, "k") is None  # the truncated shard means: not complete

    again = write_shards(clips, root, CFG, key="k", groups=GROUPS)
    assert not again.skipped
    # the rewritten group cleared its own old shards; the merge collected the rest
    assert sorted(again.removed) == sorted([f"train/.shard-{g}-000001.tar.tmp-deadbeef", f"train/shard-{g2}-000007.tar",
                                            "test/shard-g0099-000000.tar", "_groups/g0099.json"])
    assert _files(fs, root) == clean  # same names, same bytes, nothing else
    skipped = [r for r in again.groups if r.skipped]
    assert {r.group for r in skipped} == {shard_group_of(c.row.clip_id, GROUPS) for c in clips[1:]}
    index = pq.read_table(f"{root}/{INDEX_FILE}").to_pylist()
    on_disk = {p for p in _files(fs, root) if p.endswith(".tar")}
    assert {r["shard"] for r in index} == on_disk and len(index) == len({r["key"] for r in index}) == 6
    samples = list(iter_samples(root, contract.ContractSpec(17, require_features=False)))
    assert sorted(s["__key__"] for s in samples) == sorted(r["key"] for r in index)


def test_merge_refuses_a_group_whose_shards_are_gone(clips, tmp_path):
    fs, root = _local(tmp_path, "s")
    (g, members), = list(plan_groups(clips[:1], GROUPS).items())
    result = write_shard_group(members, root, g, CFG, "gk")
    fs.rm_file(f"{root}/{result.shards[0]['shard']}")
    with pytest.raises(FileNotFoundError, match=rf"train/shard-{g}-000000.tar"):
        merge_shard_groups(root, [result], CFG, "k", GROUPS)
    assert not fs.exists(f"{root}/{STATUS_FILE}")


def test_a_started_rewrite_unmarks_the_finished_set(clips, tmp_path):
    root = str(tmp_path / "s")
    write_shards(clips[:1], root, CFG, key="k1", groups=GROUPS)
    assert begin_shard_set(root, "k1") is not None  # same key: finished, untouched
    assert begin_shard_set(root, "k2") is None and not (tmp_path / "s" / STATUS_FILE).exists()


@pytest.mark.parametrize("url", ["memory://dualforce-test/out", "file://{tmp}/viaurl"])
def test_fsspec_output_roots_round_trip(clips, ref, tmp_path, url):
    url = url.format(tmp=tmp_path)
    stats = write_shards(clips, url, CFG, key="k", groups=GROUPS)
    assert stats.samples == 6
    fs, root = fsspec.core.url_to_fs(url)
    assert _files(fs, root) == ref[2]
    assert write_shards(clips, url, CFG, key="k", groups=GROUPS).skipped
    assert not [p for p in fs.find(root) if ".tmp-" in p]

    entry = LedgerEntry(clip_id="c", dataset="t", step="shard", status="ok", action="ran", reason="", detail="",
                        version="2", key="key", checksum="", seconds=1.0, run_id="r1", finished_at=1.0)
    write_ledger_part(url, [entry], "run-1")
    assert read_ledger(url).to_pylist() == [{**entry.__dict__}]
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{INDEX_FILE}")))
    assert table.num_rows == 6
    if url.startswith("memory://"):
        fs.rm(root, recursive=True)
