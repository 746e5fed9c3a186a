"""Training loader throughput against a plain sequential read of the same shard tars (same run, same files).

    python -m benchmarks.loader_throughput [--shards 16 --per-shard 32 --crop 256 --window-frames 33 --workers 0 2]

The plain read opens each tar in order and decodes every npy member with np.load(allow_pickle=False) (no
validation, no shuffle, no tensors): what reading the shards takes without our loader. The loader decodes
with tasks.contract.load_npy, whose regex fast path skips np.load's header parsing; `ratio_to_plain_fast_decode`
is the ratio against the plain read using that same decoder, i.e. what the loader's own work costs. The loader
(which opens the same local paths through fsspec) adds contract validation, the shuffle buffer, collation to
torch tensors and (with workers) process start-up and hand-off. Files are read once before timing so both
see a warm page cache; the plain read and the loader alternate, each figure is the best of --repeats (the
machine may be shared: the 1-minute load average is printed with the figures). `validate_s_per_1k` is the
time tasks.contract.validate_sample alone takes per 1000 of these samples, the part of the gap the loader
cannot drop.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tasks import contract
from tests.training_shards import write_shards
from training.loader import LoaderConfig, ShardLoader, tar_samples


def np_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def plain_read(paths: list[Path], decode: Callable[[bytes], Any] = np_load) -> int:
    samples = set()
    for path in paths:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                key, _, ext = member.name.partition(".")
                if ext.endswith(".npy"):
                    decode(data)
                samples.add(key)
    return len(samples)


def validation_seconds(paths: list[Path], spec: contract.ContractSpec) -> tuple[float, int]:
    """Seconds spent in contract.validate_sample over every sample of the shards (decoding not timed)."""
    seconds, count = 0.0, 0
    for path in paths:
        with open(path, "rb") as fileobj:
            for sample in tar_samples(fileobj):
                for member in contract.FEATURE_MEMBERS:
                    sample[member] = contract.load_npy(sample[member])
                start = time.perf_counter()
                contract.validate_sample(sample, spec)
                seconds += time.perf_counter() - start
                count += 1
    return seconds, count


def loader_epoch(cfg: LoaderConfig) -> int:
    loader = ShardLoader(cfg)
    return sum(len(batch["sample_keys"]) for batch in loader.epoch_iter())


def best_rates(fns: dict[Any, Callable[[], int]], repeats: int) -> dict[Any, tuple[float, int]]:
    """Best samples/s of each function, the functions taking turns so load spikes hit them alike."""
    best = {name: (0.0, 0) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            count = fn()
            best[name] = (max(best[name][0], count / (time.perf_counter() - start)), count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--crop", type=int, default=256, help="crop size; latents are crop/8 square")
    parser.add_argument("--window-frames", type=int, default=contract.WINDOW_FRAMES, help="video frames per sample (4n+1)")
    parser.add_argument("--audio-dim", type=int, default=contract.HUBERT_LARGE_DIM)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(
            Path(tmp), args.shards, args.per_shard, window_frames=args.window_frames, crop=args.crop, audio_dim=args.audio_dim
        )
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        plain_read(paths)  # warm the page cache
        configs = {
            workers: LoaderConfig(
                shards=[str(p) for p in paths],
                window_frames=args.window_frames,
                crop_size=args.crop,
                audio_dim=args.audio_dim,
                batch_size=args.batch,
                num_workers=workers,
                partial_batches=True,
            )
            for workers in args.workers
        }
        fns = {"plain": lambda: plain_read(paths), "plain_fast": lambda: plain_read(paths, contract.load_npy)}
        fns.update({workers: (lambda c=cfg: loader_epoch(c)) for workers, cfg in configs.items()})
        rates = best_rates(fns, args.repeats)
        plain, n = rates["plain"]
        plain_fast, _ = rates["plain_fast"]
        spec = contract.ContractSpec(window_frames=args.window_frames, crop_size=args.crop, audio_dim=args.audio_dim)
        validate_s, _ = validation_seconds(paths, spec)
        result = {
            "shards": args.shards,
            "samples": n,
            "shard_mb": round(size_mb, 1),
            "sample_latents": [contract.LATENT_CHANNELS, contract.latent_frames(args.window_frames), args.crop // 8,
                               args.crop // 8],
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "plain_read_samples_per_s": round(plain, 1),
            "plain_read_fast_decode_samples_per_s": round(plain_fast, 1),
            "validate_s_per_1k": round(validate_s / n * 1000, 3),
            "loader": [],
        }
        for workers in args.workers:
            rate, m = rates[workers]
            if m != n:
                raise RuntimeError(f"loader yielded {m} samples, the plain read {n}")
            result["loader"].append(
                {"workers": workers, "samples_per_s": round(rate, 1), "ratio_to_plain": round(rate / plain, 3),
                 "ratio_to_plain_fast_decode": round(rate / plain_fast, 3)}
            )
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
