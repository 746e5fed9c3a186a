"""Training loader throughput against a plain sequential read of the same shard tars (same run, same files).

    python -m benchmarks.loader_throughput [--shards 16 --per-shard 32 --crop 256 --window 33 --workers 0 2]

The plain read opens each tar in order and decodes every npy member (no validation, no shuffle, no
tensors): the floor cost of getting the bytes into arrays. The loader adds contract validation, the
shuffle buffer, collation to torch tensors and (with workers) process hand-off. Files are read once before
timing so both see a warm page cache; each figure is the best of --repeats.
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

from tasks import contract
from tests.training_shards import write_shards
from training.loader import LoaderConfig, ShardLoader


def plain_read(paths: list[Path]) -> int:
    samples = set()
    for path in paths:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                key, _, ext = member.name.partition(".")
                if ext.endswith(".npy"):
                    contract.load_npy(data)
                samples.add(key)
    return len(samples)


def loader_epoch(cfg: LoaderConfig) -> int:
    loader = ShardLoader(cfg)
    return sum(len(batch["sample_keys"]) for batch in loader.epoch_iter())


def best_rate(fn, repeats: int) -> tuple[float, int]:
    best = 0.0
    count = 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        best = max(best, count / (time.perf_counter() - start))
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--crop", type=int, default=256, help="crop size; latents are crop/8 square")
    parser.add_argument("--window", type=int, default=33, help="video frames per sample (4n+1)")
    parser.add_argument("--audio-dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(
            Path(tmp), args.shards, args.per_shard, window=args.window, crop=args.crop, audio_dim=args.audio_dim
        )
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        plain_read(paths)  # warm the page cache
        plain, n = best_rate(lambda: plain_read(paths), args.repeats)
        result = {
            "shards": args.shards,
            "samples": n,
            "shard_mb": round(size_mb, 1),
            "sample_latents": [contract.LATENT_CHANNELS, contract.latent_frames(args.window), args.crop // 8, args.crop // 8],
            "plain_read_samples_per_s": round(plain, 1),
            "loader": [],
        }
        for workers in args.workers:
            cfg = LoaderConfig(
                shards=[str(p) for p in paths],
                window=args.window,
                crop_size=args.crop,
                audio_dim=args.audio_dim,
                batch_size=args.batch,
                num_workers=workers,
                partial_batches=True,
            )
            rate, m = best_rate(lambda: loader_epoch(cfg), args.repeats)
            if m != n:
                raise RuntimeError(f"loader yielded {m} samples, the plain read {n}")
            result["loader"].append(
                {"workers": workers, "samples_per_s": round(rate, 1), "ratio_to_plain": round(rate / plain, 3)}
            )
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
