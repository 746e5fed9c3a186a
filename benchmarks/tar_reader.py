"""The loader's tar reader against webdataset's tar expander, on shards of `lite`-size samples.

    python -m benchmarks.tar_reader [--shards 8 --per-shard 16 --repeats 3]

Each sample has the members and sizes of a `lite` training window (33 frames at a 512² crop: video.mp4 ~300 KB,
video_latents [16, 9, 64, 64] float16 1.2 MB, reference_latent, struct [33, 133], audio_features [33, 1024] float16,
keep_mask, head_pose, audio.wav, meta.json; random bytes where content does not matter to a reader). Both read
every member's bytes of every sample, opened through `fsspec.open` (local files, warm cache), best of `repeats`,
taking turns: `training.loader.tar_samples` (seek + read per member, with the contract's member limits, as the
loader runs it) and webdataset's `tar_file_expander` + `group_by_keys` (stream-mode tarfile). Prints seconds per
epoch, MB/s and own / webdataset.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np


def _members(rng: np.random.Generator) -> dict[str, bytes]:
    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()

    T = 33
    return {
        "video.mp4": rng.bytes(300_000),
        "audio.wav": rng.bytes(T * 640 * 2 + 44),
        "video_latents.npy": npy(rng.standard_normal((16, 9, 64, 64)).astype(np.float16)),
        "reference_latent.npy": npy(rng.standard_normal((16, 1, 64, 64)).astype(np.float16)),
        "struct.npy": npy(rng.standard_normal((T, 133)).astype(np.float32)),
        "audio_features.npy": npy(rng.standard_normal((T, 1024)).astype(np.float16)),
        "keep_mask.npy": npy(np.ones(T, bool)),
        "head_pose.npy": npy(rng.standard_normal((T, 3)).astype(np.float32)),
        "meta.json": json.dumps({"clip_id": "x", "window_start": 0}).encode(),
    }


def write_shards(root: Path, shards: int, per_shard: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = root / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                for name, data in _members(rng).items():
                    info = tarfile.TarInfo(f"c{s:03d}_w{i:06d}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def read_own(paths: list[Path], limits) -> int:
    from training.loader import tar_samples

    total = 0
    for p in paths:
        with fsspec.open(str(p), "rb") as f:
            for sample in tar_samples(f, limits):
                assert "__error__" not in sample, sample["__error__"]
                total += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    return total


def read_webdataset(paths: list[Path]) -> int:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    total = 0
    for p in paths:
        with fsspec.open(str(p), "rb") as f:
            for sample in group_by_keys(tar_file_expander([{"url": str(p), "stream": f}])):
                total += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    return total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from tasks import contract

    limits = contract.member_limits(contract.ContractSpec(window_frames=contract.WINDOW_FRAMES, crop_size=512,
                                                           audio_dim=contract.HUBERT_LARGE_DIM))
    with tempfile.TemporaryDirectory(prefix="tar-reader-") as tmp:
        paths = write_shards(Path(tmp), args.shards, args.per_shard)
        read_own(paths, limits), read_webdataset(paths)  # warm the page cache
        own, wds = [], []
        for _ in range(args.repeats):
            for runs, read in ((own, lambda: read_own(paths, limits)), (wds, lambda: read_webdataset(paths))):
                t0 = time.perf_counter()
                nbytes = read()
                runs.append(time.perf_counter() - t0)
    samples = args.shards * args.per_shard
    result = {"samples": samples, "sample_mb": nbytes / samples / 1e6, "own_s": min(own), "webdataset_s": min(wds),
              "own_mb_per_s": nbytes / min(own) / 1e6, "webdataset_mb_per_s": nbytes / min(wds) / 1e6,
              "own_over_webdataset": min(own) / min(wds)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
