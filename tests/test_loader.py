"""Training loader: contract checks, splits by worker and node, determinism and exact resume positions,
shards at fsspec URLs (memory://, file://) and unreadable shards counted as rejections."""
from __future__ import annotations

import io
import tarfile

import fsspec
import numpy as np
import pytest
import torch

from tasks import contract
from tests.training_shards import AUDIO_DIM, CROP, WINDOW, write_shards
from training.loader import LoaderConfig, ShardLoader, crop_window, expand_shards, tar_samples


def _cfg(tmp_path, **kw) -> LoaderConfig:
    base = dict(shards=[str(tmp_path / "shard-*.tar")], window_frames=WINDOW, crop_size=CROP, batch_size=2)
    base.update(kw)
    return LoaderConfig(**base)


def _epoch_keys(loader: ShardLoader) -> list[str]:
    return [k for batch in loader.epoch_iter() for k in batch["sample_keys"]]


def test_batch_shapes_dtypes_and_values(tmp_path):
    write_shards(tmp_path, n_shards=1, per_shard=4, seed=3)
    loader = ShardLoader(_cfg(tmp_path, shuffle_buffer=0, shuffle_shards=False))
    batch = next(iter(loader))
    assert batch["video_latents"].shape == (2, 16, 3, 8, 8) and batch["video_latents"].dtype == torch.float16
    assert batch["reference_latent"].shape == (2, 16, 1, 8, 8)
    assert batch["struct"].shape == (2, WINDOW, 133) and batch["struct"].dtype == torch.float32
    assert batch["audio_features"].shape == (2, WINDOW, AUDIO_DIM) and batch["audio_features"].dtype == torch.float16
    assert batch["keep_mask"].shape == (2, WINDOW) and batch["keep_mask"].dtype == torch.bool
    assert batch["sample_keys"] == ["clip000_w000000", "clip000_w000001"]
    # values are the written ones (same generator, same draw order)
    rng = np.random.default_rng(3)
    from tests.training_shards import sample_members

    first = sample_members(rng, "clip000_w000000")
    expected = contract.load_npy(first[contract.VIDEO_LATENTS])
    np.testing.assert_array_equal(batch["video_latents"][0].numpy(), expected)
    expected_struct = contract.load_npy(first[contract.STRUCT])
    np.testing.assert_array_equal(batch["struct"][0].numpy(), expected_struct)


def test_each_sample_once_per_epoch_across_two_workers(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=5)
    loader = ShardLoader(_cfg(tmp_path, num_workers=2, partial_batches=True, shuffle_buffer=8))
    keys0 = _epoch_keys(loader)
    keys1 = _epoch_keys(loader)
    everything = sorted(f"clip{s:03d}_w{i:06d}" for s in range(4) for i in range(5))
    assert sorted(keys0) == everything and len(keys0) == 20
    assert sorted(keys1) == everything
    assert keys0 != keys1  # a new epoch reshuffles
    assert loader.epoch == 2 and loader.stats.samples == 40


def test_split_by_node_partitions_the_epoch(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=3)
    keys = [
        _epoch_keys(ShardLoader(_cfg(tmp_path, rank=r, world_size=2, partial_batches=True, num_workers=0)))
        for r in range(2)
    ]
    assert not set(keys[0]) & set(keys[1])
    assert len(keys[0]) == len(keys[1]) == 6
    assert sorted(keys[0] + keys[1]) == sorted(f"clip{s:03d}_w{i:06d}" for s in range(4) for i in range(3))


def test_tampered_samples_are_rejected_and_counted(tmp_path):
    def tamper(key, members):
        if key == "clip000_w000001":  # wrong struct width
            members[contract.STRUCT] = contract.npy_bytes(np.zeros((WINDOW, 7), np.float32))
        if key == "clip001_w000002":  # object array: needs pickle, must be refused
            buf = io.BytesIO()
            np.save(buf, np.array([None] * WINDOW, dtype=object), allow_pickle=True)
            members[contract.KEEP_MASK] = buf.getvalue()
        if key == "clip001_w000000":  # NaN latents
            arr = contract.load_npy(members[contract.VIDEO_LATENTS]).copy()
            arr[0, 0, 0, 0] = np.nan
            members[contract.VIDEO_LATENTS] = contract.npy_bytes(arr)
        return members

    write_shards(tmp_path, n_shards=2, per_shard=3, tamper=tamper)
    loader = ShardLoader(_cfg(tmp_path, partial_batches=True, num_workers=2))
    keys = _epoch_keys(loader)
    assert sorted(keys) == ["clip000_w000000", "clip000_w000002", "clip001_w000001"]
    assert loader.stats.rejected == {"contract": 3}  # the object array is refused by its header, unread
    joined = " ".join(loader.stats.last_rejections)
    assert "clip000_w000001" in joined and "struct.npy" in joined and "clip001_w000000" in joined
    assert f"header declares shape ({WINDOW}, 7), expected ({WINDOW}, 133)" in joined and "holds NaN or inf" in joined
    assert "keep_mask.npy: header declares dtype object, expected bool" in joined


def test_resume_position_gives_the_same_remaining_batches(tmp_path):
    write_shards(tmp_path, n_shards=3, per_shard=4)
    cfg = _cfg(tmp_path, num_workers=2, shuffle_buffer=5, seed=7)
    full = ShardLoader(cfg)
    it = iter(full)
    reference = [next(it)["sample_keys"] for _ in range(9)]  # crosses into the next epoch
    part = ShardLoader(cfg)
    it = iter(part)
    first = [next(it)["sample_keys"] for _ in range(4)]
    resumed = ShardLoader(cfg, **part.state())
    it = iter(resumed)
    rest = [next(it)["sample_keys"] for _ in range(5)]
    assert first + rest == reference


def test_resampled_epochs_draw_with_replacement_and_differ(tmp_path):
    write_shards(tmp_path, n_shards=3, per_shard=2)
    loader = ShardLoader(_cfg(tmp_path, resampled=True, shards_per_epoch=6, partial_batches=True, seed=1))
    e0, e1 = _epoch_keys(loader), _epoch_keys(loader)
    assert len(e0) == len(e1) == 12
    assert len(set(e0)) < 12  # drawn with replacement from 6 distinct samples
    assert e0 != e1


def test_train_window_frames_crop_from_the_start(tmp_path):
    arrays = {
        "video_latents": np.arange(16 * 5 * 2 * 2).reshape(16, 5, 2, 2),
        "struct": np.arange(17 * 3).reshape(17, 3),
        "audio_features": np.arange(17 * 2).reshape(17, 2),
        "keep_mask": np.ones(17, bool),
        "reference_latent": np.zeros((16, 1, 2, 2)),
    }
    out = crop_window(arrays, 9)
    assert out["video_latents"].shape == (16, 3, 2, 2) and out["struct"].shape == (9, 3)
    np.testing.assert_array_equal(out["video_latents"], arrays["video_latents"][:, :3])
    write_shards(tmp_path, n_shards=1, per_shard=2, window_frames=17)
    batch = next(iter(ShardLoader(_cfg(tmp_path, window_frames=17, train_window_frames=9))))
    assert batch["video_latents"].shape[2] == 3 and batch["struct"].shape[1] == 9
    with pytest.raises(ValueError, match="4n\\+1"):
        ShardLoader(_cfg(tmp_path, window_frames=17, train_window_frames=8))


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no shards match"):
        expand_shards([str(tmp_path / "nothing-*.tar")])


MEM_ROOT = "/loader-test"
MEM_URL = "memory://loader-test"  # as a user writes it; expanded URLs come back as memory:///loader-test/...


@pytest.fixture
def memfs():
    """fsspec's process-wide memory filesystem, emptied under MEM_ROOT after the test."""
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists(MEM_ROOT):
        fs.rm(MEM_ROOT, recursive=True)


def _to_memory(fs, paths) -> None:
    for path in paths:
        fs.pipe(f"{MEM_ROOT}/{path.name}", path.read_bytes())


def test_memory_url_shards_give_the_same_batches_as_local_paths(tmp_path, memfs):
    _to_memory(memfs, write_shards(tmp_path, n_shards=3, per_shard=3, seed=5))
    local = list(ShardLoader(_cfg(tmp_path, shuffle_buffer=4, seed=2, partial_batches=True)).epoch_iter())
    remote_loader = ShardLoader(_cfg(tmp_path, shards=[f"{MEM_URL}/shard-*.tar"], shuffle_buffer=4,
                                     seed=2, partial_batches=True))
    assert remote_loader.dataset.urls == [f"memory://{MEM_ROOT}/shard-{i:06d}.tar" for i in range(3)]
    remote = list(remote_loader.epoch_iter())
    assert len(remote) == len(local) == 5
    for a, b in zip(local, remote):
        assert a["sample_keys"] == b["sample_keys"]
        for key in ("video_latents", "reference_latent", "struct", "audio_features", "keep_mask"):
            assert a[key].dtype == b[key].dtype
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    everything = [f"clip{s:03d}_w{i:06d}" for s in range(3) for i in range(3)]
    assert sorted(k for b in remote for k in b["sample_keys"]) == everything


def test_file_url_glob_with_two_workers_gives_the_local_sample_set(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=3)
    local = _epoch_keys(ShardLoader(_cfg(tmp_path, partial_batches=True)))
    url_loader = ShardLoader(_cfg(tmp_path, shards=[f"file://{tmp_path}/shard-*.tar"], num_workers=2,
                                  partial_batches=True))
    assert all(u.startswith("file:///") for u in url_loader.dataset.urls) and len(url_loader.dataset.urls) == 4
    remote = _epoch_keys(url_loader)
    assert sorted(remote) == sorted(local) and len(remote) == 12
    assert not url_loader.stats.rejected


def _truncate_inside_sample(path, sample_index: int) -> None:
    """Cut the tar in the middle of the first member of its `sample_index`-th sample."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    first = members[sample_index * len(members) // 3]  # write_shards(per_shard=3): equal member counts
    data = path.read_bytes()
    path.write_bytes(data[: first.offset_data + first.size // 2])


def test_missing_and_truncated_shards_are_counted_and_the_rest_arrives(tmp_path, memfs):
    paths = write_shards(tmp_path, n_shards=3, per_shard=3)
    _truncate_inside_sample(paths[1], 2)
    _to_memory(memfs, paths)
    missing = f"memory://{MEM_ROOT}/shard-000009.tar"
    loader = ShardLoader(_cfg(tmp_path, shards=[f"memory://{MEM_ROOT}/shard-*.tar", missing], partial_batches=True))
    keys = _epoch_keys(loader)
    expected = [f"clip{s:03d}_w{i:06d}" for s in (0, 2) for i in range(3)] + ["clip001_w000000", "clip001_w000001"]
    assert sorted(keys) == sorted(expected)
    # the sample cut in its first member is judged too (and lost: no members), then the shard is counted
    assert loader.stats.rejected == {"shard": 2, "contract": 1}
    messages = loader.stats.last_rejections
    assert len(messages) == 3
    assert any(missing in m and "FileNotFoundError" in m for m in messages)
    assert any("shard-000001.tar (after 3 samples)" in m and "unexpected end of data" in m for m in messages)
    assert any("clip001_w000002" in m and "video.mp4: missing" in m for m in messages)
    with pytest.raises(ValueError, match="memory:// shards .* only readable with num_workers=0"):
        ShardLoader(_cfg(tmp_path, shards=[missing], num_workers=2))
    # nothing readable at all: the epoch's clear error names the shard rejections
    only_bad = ShardLoader(_cfg(tmp_path, shards=[missing]))
    with pytest.raises(RuntimeError, match="yielded no batch.*'shard': 1.*FileNotFoundError"):
        _epoch_keys(only_bad)


def test_brace_and_glob_expansion_for_memory_urls(memfs):
    for name in ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar", "other.tar"]:
        memfs.pipe(f"{MEM_ROOT}/{name}", b"x")
    base, canonical = MEM_URL, f"memory://{MEM_ROOT}"
    urls = expand_shards([f"{base}/shard-{{000002..000003}}.tar", f"{canonical}/shard-00000[01].tar",
                          f"{base}/shard-*2.tar"])
    assert urls == [f"{canonical}/shard-{i:06d}.tar" for i in range(4)]  # sorted, each once
    assert expand_shards([f"{base}/sub-{{a,b}}-*.tar", f"{base}/other.tar"]) == [f"{canonical}/other.tar"]
    assert expand_shards([f"{base}/absent.tar"]) == [f"{canonical}/absent.tar"]  # no glob: kept, counted when read
    chained = expand_shards([f"simplecache::{base}/shard-00000[3-9].tar"])  # fsspec chain prefix kept
    assert chained == [f"simplecache::{canonical}/shard-000003.tar"]
    with pytest.raises(ValueError, match="no shards match"):
        expand_shards([f"{base}/nothing-*.tar", f"{base}/shard-{{7..8}}*.tar"])


class _Unseekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._buf.readinto(b)


def test_tar_samples_groups_members_by_key_seekable_or_streamed(tmp_path):
    path = write_shards(tmp_path, n_shards=1, per_shard=2)[0]
    with tarfile.open(path, "a") as tar:  # a member repeating clip000_w000001's suffix, then a lone one
        for name, data in [("clip000_w000001.struct.npy", b"again"), ("clip000_w000009.META.JSON", b"{}"),
                           ("__index__", b"skip"), ("noext", b"skip")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    seekable = list(tar_samples(io.BytesIO(data)))
    streamed = list(tar_samples(_Unseekable(data)))
    assert seekable == streamed
    assert [s["__key__"] for s in seekable] == ["clip000_w000000", "clip000_w000001", "clip000_w000009"]
    assert sorted(k for k in seekable[0] if k != "__key__") == sorted(contract.BASE_MEMBERS + contract.FEATURE_MEMBERS)
    assert "__error__" not in seekable[0] and "duplicate member 'clip000_w000001.struct.npy'" in seekable[1]["__error__"]
    assert seekable[2] == {"__key__": "clip000_w000009", "meta.json": b"{}"}  # suffixes are lower-cased
    with tarfile.open(path) as tar:
        first = tar.extractfile("clip000_w000000.video_latents.npy").read()
    assert seekable[0]["video_latents.npy"] == first


def test_float16_finite_check_matches_isfinite():
    from tasks.contract import all_finite

    every_f16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65536 bit patterns
    for value in every_f16[::97]:
        single = np.full((3, 2), 1.0, np.float16)
        single[1, 1] = value
        assert all_finite(single) == bool(np.isfinite(single).all())
    assert not all_finite(every_f16) and all_finite(every_f16[np.isfinite(every_f16)])
    assert all_finite(np.ones(4, np.float32)) and not all_finite(np.array([1.0, np.inf], np.float32))
