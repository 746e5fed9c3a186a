"""Training loader over webdataset-layout shards: contract-checked, deterministic per epoch, exactly resumable.

Shards are tars (tasks/steps/shard.py) at local paths or any fsspec URL (`s3://b/p/shard-*.tar`,
`memory://x/shard-{000000..000003}.tar`, `file:///...`); globs and brace patterns expand once, up front.

Pipeline per (node rank, DataLoader worker):
    shard list (shuffled by seed+epoch, or resampled with replacement)
    -> split by node -> split by worker -> each shard opened with fsspec.open, its tar members grouped
       into samples by key (a shard that cannot be opened or read to its end is counted, never raised)
    -> decode npy without pickle + tasks.contract.validate_sample (bad samples are counted, never raised)
    -> optional crop to a shorter training window -> shuffle buffer (seeded) -> batches of torch tensors.

Every random choice is seeded from (seed, epoch, rank, worker), so an epoch is a pure function of those
numbers; that is what lets the trainer resume at (epoch, batches consumed) and see the same batches.
Webdataset still does the worker split, shuffle buffer and batching; the tar reading is ours (see
`tar_samples` for why).
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import random
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterator, Optional

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from tasks import contract
from tasks.contract import ContractError, ContractSpec

# Batch keys handed to the model (see models.dualforce.diffusion_forcing_loss), per sample profile.
TENSOR_KEYS = ("video_latents", "reference_latent", "struct", "audio_features", "keep_mask")
_MEMBER_OF_KEY = {
    "video_latents": contract.VIDEO_LATENTS,
    "reference_latent": contract.REFERENCE_LATENT,
    "struct": contract.STRUCT,
    "audio_features": contract.AUDIO_FEATURES,
    "keep_mask": contract.KEEP_MASK,
    "head_pose": contract.HEAD_POSE,
}
# Optional batch keys: stacked when any sample of the batch holds the member; a sample without it gets NaN rows
# (no estimate), so a batch mixing shard sets from before and after the member existed still collates.
OPTIONAL_TENSOR_KEYS = {profile: tuple(k for k in _MEMBER_OF_KEY if _MEMBER_OF_KEY[k] in optional)
                        for profile, optional in contract.OPTIONAL_MEMBERS.items()}
PROFILE_TENSOR_KEYS = {
    profile: tuple(k for k in TENSOR_KEYS if _MEMBER_OF_KEY[k] in features)
    for profile, (_, features) in contract.PROFILE_MEMBERS.items()
}
STATS_KEY = "__stats__"
# A shard that fails to open or read part-way: counted under this reason, its earlier samples are kept.
SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)


@dataclass
class LoaderConfig:
    shards: list[str]  # tar paths / fsspec URLs, with globs and brace patterns ("s3://b/shard-{000000..000009}.tar")
    window_frames: int  # video frames per shard sample (4n+1), as written by the shard writer
    crop_size: int = contract.CROP_SIZE
    audio_dim: Optional[int] = None  # None: take it from each sample's meta.json
    train_window_frames: Optional[int] = None  # shorter window (4m+1) cut from the start of each sample
    batch_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 64  # 0 disables sample shuffling
    shuffle_shards: bool = True
    resampled: bool = False  # draw shards with replacement; an epoch is then shards_per_epoch shards
    shards_per_epoch: Optional[int] = None  # per worker, resampled mode only (default: all shards)
    partial_batches: bool = False  # keep the short last batch of a worker's epoch
    seed: int = 0
    rank: Optional[int] = None  # node split; None: from torch.distributed / RANK env
    world_size: Optional[int] = None
    # contract.TALKING_HEAD, or contract.VIDEO_ONLY: batches of video_latents + reference_latent alone (any
    # shard set qualifies: a talking-head sample's other members are then left undecoded)
    profile: str = contract.TALKING_HEAD
    struct_dim: int = contract.STRUCT_DIM  # LivePortrait's 133, or the FLAME layout's width (models/flame_layout.py)


def _is_url(pattern: str) -> bool:
    return "://" in pattern


def _expand_url(chain: str, inner: str) -> list[str]:
    """One fsspec URL (glob or not; `chain` is any `cache::` prefix) -> canonical URLs: the protocol and chain
    kept, so the same object named two ways (`memory://x/a`, `memory:///x/a`) is listed once."""
    fs, path = fsspec.core.url_to_fs(inner)  # fsspec chaining: list with the innermost filesystem
    paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    return [chain + fs.unstrip_protocol(p) for p in paths]


def expand_shards(patterns: list[str]) -> list[str]:
    """Paths / fsspec URLs with brace patterns and globs -> a sorted, de-duplicated list of shards.

    Names without glob characters are kept (a missing one is counted as a rejection when it is read).
    """
    out: list[str] = []
    for pattern in patterns:
        if _is_url(pattern):  # "::" is fsspec's chaining there, not webdataset's url-list separator
            chain, sep, inner = pattern.rpartition("::")
            for expanded in wds.shardlists.expand_urls(inner):
                out.extend(_expand_url(chain + sep, expanded))
            continue
        for expanded in wds.shardlists.expand_urls(pattern):
            out.extend(sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded])
    if not out:
        raise ValueError(f"no shards match {patterns!r}")
    return sorted(dict.fromkeys(out))


# webdataset's member naming: key = path up to the first '.' of the file name, suffix = the rest.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped __meta__ members


class _BoundedReads:
    """A file whose single reads are capped: tarfile reads what a header declares (pax and GNU long-name
    blocks, member bodies) in one call, and Python allocates a read's full size before reading it."""

    def __init__(self, fileobj: Any, max_read: int):
        self._f, self.max_read = fileobj, max_read

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.max_read:
            raise tarfile.ReadError(f"a tar header declares {n} bytes, more than the loader reads at once "
                                    f"({self.max_read}); not a shard our writer made")
        return self._f.read(n)

    def __getattr__(self, name: str) -> Any:  # seek, tell, seekable, ...
        return getattr(self._f, name)


def tar_samples(fileobj: Any, limits: Optional[dict[str, contract.MemberLimit]] = None) -> Iterator[dict[str, Any]]:
    """Consecutive tar members sharing a key -> {"__key__": key, suffix: bytes, ...}, in tar order.

    Kept instead of webdataset's tar expander (`tar_file_expander` + `group_by_keys` fed by `fsspec.open`) for
    what that cannot do: it reads every member whole before anything can look at it, so a shard whose header
    claims a huge member would be read into memory; here nothing is read past the contract's member limits
    (below), the trust boundary tests/test_loader_hostile.py holds. Speed is not the reason: at `lite` sample
    sizes (benchmarks/tar_reader.py: 128 samples of 1.74 MB, warm cache, 2 cores) this reads 3.1 GB/s and the
    expander 1.6 GB/s, 0.56 vs 1.1 ms a sample, both immaterial beside a training step. With a seekable file
    (local, fsspec's buffered remote files, memory://)
    each member is one seek + read of its bytes and tarfile only parses the headers; non-seekable streams
    fall back to stream mode. A key repeating a suffix is passed on with "__error__" set (rejected by the
    caller); open/read errors propagate, after the samples before them and the one being read (complete
    or not: the caller's contract check judges it).

    With `limits` (tasks.contract.member_limits), nothing is read that a valid sample cannot hold: a key
    the writer does not produce, a member name it does not write, or a member larger than its limit marks
    the sample "__error__", and the rest of that sample is skipped unread. Every single read
    is then capped at the largest limit, so memory stays within one sample's bound whatever the headers say.
    """
    if limits is not None:
        fileobj = _BoundedReads(fileobj, max(64 * 1024, max(m.max_bytes for m in limits.values())))
    seekable = fileobj.seekable()
    sample: Optional[dict[str, Any]] = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|") as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # keep no member index (a shard can hold many thousands)
                if not info.isreg() or _META_MEMBER.match(info.name):
                    continue
                named = _MEMBER_NAME.match(info.name)
                if named is None:
                    continue
                key, suffix = named.group(1), named.group(2).lower()
                if sample is None or sample["__key__"] != key:  # before reading: a cut here keeps the last sample
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                    if limits is not None and not contract.SAMPLE_KEY.fullmatch(key):
                        sample["__error__"] = f"key {key[:80]!r} is not one the shard writer produces"
                if limits is not None:
                    if "__error__" in sample:
                        continue  # rejected already: read nothing more of it
                    if suffix not in limits:
                        sample["__error__"] = f"member {suffix[:40]!r} is not one the shard writer produces"
                        continue
                    if info.size > limits[suffix].max_bytes:
                        sample["__error__"] = (f"member {suffix!r} declares {info.size} bytes, more than a valid "
                                               f"sample's {limits[suffix].max_bytes}")
                        continue
                if seekable and not info.issparse():
                    fileobj.seek(info.offset_data)
                    data = fileobj.read(info.size)
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"unexpected end of data in member {info.name!r}")
                else:
                    data = tar.extractfile(info).read()
                if suffix in sample:
                    sample["__error__"] = f"duplicate member {info.name!r}"
                sample[suffix] = data
    except Exception:
        if sample is not None:  # the sample being read when the shard broke: complete or not, it is judged
            yield sample
        raise
    if sample is not None:
        yield sample


def crop_window(arrays: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
    """Cut the first `window` (4m+1) video frames; the causal VAE's first m+1 latents belong to exactly them."""
    latents = contract.latent_frames(window)
    out = dict(arrays)
    out["video_latents"] = arrays["video_latents"][:, :latents]
    for key in ("struct", "audio_features", "keep_mask", "head_pose"):
        if key in arrays:  # absent from video-only samples (head_pose: optional)
            out[key] = arrays[key][:window]
    return out


def _seed(*parts: int) -> int:
    return int.from_bytes(json.dumps(parts).encode(), "little") % (2**63)


class ShardDataset(IterableDataset):
    """One epoch of contract-valid samples, batched inside the worker; the epoch is set before iterating."""

    def __init__(self, cfg: LoaderConfig):
        super().__init__()
        self.cfg = cfg
        self.urls = expand_shards(cfg.shards)
        in_memory = [u for u in self.urls if "memory://" in u]
        if in_memory and cfg.num_workers > 0:  # each worker process has its own, empty, memory filesystem
            raise ValueError(f"memory:// shards ({in_memory[0]}, ...) are only readable with num_workers=0")
        self.spec = ContractSpec(window_frames=cfg.window_frames, crop_size=cfg.crop_size, audio_dim=cfg.audio_dim,
                                 profile=cfg.profile, struct_dim=cfg.struct_dim)
        self.tensor_keys = PROFILE_TENSOR_KEYS[cfg.profile]
        self.limits = contract.member_limits(self.spec)  # what a member may declare before it is read
        if cfg.train_window_frames is not None:
            contract.latent_frames(cfg.train_window_frames)  # 4m+1 check
            if cfg.train_window_frames > cfg.window_frames:
                raise ValueError(f"train_window_frames {cfg.train_window_frames} is longer than the shard window "
                                 f"{cfg.window_frames}")
        self.epoch = 0
        # Per-worker counters (live in the worker process; reported through STATS_KEY records).
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.last_rejections: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _node(self) -> tuple[int, int]:
        if self.cfg.rank is not None and self.cfg.world_size is not None:
            return self.cfg.rank, self.cfg.world_size
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return rank, world

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def shard_urls(self) -> list[str]:
        """This (rank, worker)'s shards for the current epoch, in reading order."""
        rank, world = self._node()
        worker, workers = self._worker()
        if self.cfg.resampled:
            rng = random.Random(_seed(self.cfg.seed, self.epoch, rank, worker))
            count = self.cfg.shards_per_epoch or len(self.urls)
            urls = [rng.choice(self.urls) for _ in range(count)]
        else:
            urls = list(self.urls)
            if self.cfg.shuffle_shards:
                random.Random(_seed(self.cfg.seed, self.epoch)).shuffle(urls)
            urls = list(islice(urls, rank, None, world))  # split by node
            urls = list(wds.split_by_worker(urls))  # split by DataLoader worker
        return urls

    def samples(self) -> Iterator[dict[str, Any]]:
        """Raw samples of this (rank, worker)'s shards; a shard failing to open or read is counted, not raised."""
        for url in self.shard_urls():
            read = 0
            try:
                with fsspec.open(url, "rb") as fileobj:
                    for sample in tar_samples(fileobj, self.limits):
                        read += 1
                        yield sample
            except SHARD_ERRORS as exc:
                self._reject("shard", f"shard {url} (after {read} samples): {type(exc).__name__}: {exc}")

    def decode(self, sample: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Raw tar members -> arrays, or None (counted) when the sample breaks the contract."""
        key = str(sample.get("__key__", "?"))
        if "__error__" in sample:
            return self._reject("decode", f"sample {key[:80]!r}: {sample['__error__']}")
        try:
            decoded = dict(sample)
            for member in (*self.spec.feature_members, *self.spec.optional_members):
                if member in sample:
                    try:
                        decoded[member] = contract.load_npy(sample[member], self.limits[member], member)
                    except ContractError as exc:  # its message names the member; the sample's key goes first
                        raise ContractError(f"sample {key!r}, {exc}") from None
            meta = contract.validate_sample(decoded, self.spec)
        except ContractError as exc:
            return self._reject("contract", f"{exc}")
        except Exception as exc:  # a member no check above foresaw: counted, never raised into training
            return self._reject("decode", f"sample {key!r}: {type(exc).__name__}: {exc}"[:500])
        arrays = {name: decoded[_MEMBER_OF_KEY[name]] for name in self.tensor_keys}
        arrays.update({name: decoded[_MEMBER_OF_KEY[name]] for name in OPTIONAL_TENSOR_KEYS[self.cfg.profile]
                       if _MEMBER_OF_KEY[name] in decoded})
        if self.cfg.train_window_frames is not None:
            arrays = crop_window(arrays, self.cfg.train_window_frames)
        self.accepted += 1
        return {"__key__": key, "meta": meta, **arrays}

    def _reject(self, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        self.last_rejections = (self.last_rejections + [message])[-5:]
        return None

    def stats(self) -> dict[str, Any]:
        worker, _ = self._worker()
        return {
            "worker": worker,
            "epoch": self.epoch,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "last_rejections": list(self.last_rejections),
        }

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in self.tensor_keys:  # stored dtypes (f16 latents/audio, f32 struct): half the copies and IPC
            batch[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
        for key in OPTIONAL_TENSOR_KEYS[self.cfg.profile]:
            held = [s[key] for s in samples if key in s]
            if held:
                blank = np.full_like(held[0], np.nan)
                batch[key] = torch.from_numpy(np.stack([s.get(key, blank) for s in samples]))
        batch["sample_keys"] = [s["__key__"] for s in samples]
        batch[STATS_KEY] = self.stats()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _ = self._node()
        worker, _ = self._worker()
        self.accepted = 0
        self.rejected = Counter()
        decoded = (d for d in map(self.decode, self.samples()) if d is not None)
        if self.cfg.shuffle_buffer > 0:
            rng = random.Random(_seed(self.cfg.seed, self.epoch, rank, worker, 1))
            decoded = wds.filters.shuffle(self.cfg.shuffle_buffer, self.cfg.shuffle_buffer, rng=rng)(decoded)
        yield from wds.filters.batched(self.cfg.batch_size, collation_fn=self.collate,
                                       partial=self.cfg.partial_batches)(decoded)
        yield {STATS_KEY: self.stats(), "end_of_epoch": True}  # counts for samples after the last batch


@dataclass
class LoaderStats:
    samples: int = 0
    batches: int = 0
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)
    last_rejections: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _worker_context() -> multiprocessing.context.BaseContext:
    """DataLoader workers start from the forkserver: a clean process, not a fork of one that already runs
    threads (Prefect's, a tokenizer's), which can leave a forked worker deadlocked or dead on arrival.

    The server preloads this module (torch, numpy, fsspec: imports start no threads), so every epoch's
    workers fork from a process that has them already: on the 2-core dev machine the first batch of an
    epoch with 2 workers came after ~0.35 s instead of ~2 s. The preload only takes effect if this is
    the first use of the forkserver in the process.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


class ShardLoader:
    """Epoch-aware iterator over batches; keeps (epoch, batches consumed) so training can resume exactly.

    Iterating never ends: after an epoch it starts the next one (ranks run a fixed number of steps, so an
    uneven split between ranks cannot leave one rank waiting on another). Resuming mid-epoch rebuilds the
    epoch and drops the batches already consumed (they are read and decoded again: at most one epoch of
    reading; use resampled epochs with shards_per_epoch to bound it on large datasets).
    `stats.samples_per_s` is samples over the time the caller spent waiting for batches.
    """

    def __init__(self, cfg: LoaderConfig, epoch: int = 0, batches_done: int = 0):
        self.cfg = cfg
        self.dataset = ShardDataset(cfg)
        self.epoch = epoch
        self.batches_done = batches_done  # in the current epoch
        self.stats = LoaderStats()
        self._worker_rejected: dict[int, Counter] = {}
        self._epoch_rejected = Counter()  # from finished epochs

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        # Its own generator: a DataLoader otherwise draws its worker base seed from the global torch RNG,
        # which would make the trainer's dropout stream depend on when epochs start (and break exact resume).
        generator = torch.Generator().manual_seed(_seed(self.cfg.seed, self.epoch, 2))
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
            generator=generator,
            multiprocessing_context=_worker_context() if self.cfg.num_workers > 0 else None,
        )
        yield from loader

    def _note_stats(self, stats: dict[str, Any]) -> None:
        worker = stats["worker"]
        before = sum(self._worker_rejected.get(worker, Counter()).values())
        self._worker_rejected[worker] = Counter(stats["rejected"])
        self.stats.rejected = self._epoch_rejected + sum(self._worker_rejected.values(), Counter())
        new = sum(self._worker_rejected[worker].values()) - before  # every batch repeats the worker's last 5
        if new > 0:
            self.stats.last_rejections = (self.stats.last_rejections + stats["last_rejections"][-new:])[-5:]

    def epoch_iter(self) -> Iterator[dict[str, Any]]:
        """Batches of the current epoch from the current position (skipping batches already consumed)."""
        skip = self.batches_done
        seen = 0
        empty = True
        start = time.perf_counter()
        for batch in self._epoch_batches():
            self._note_stats(batch.pop(STATS_KEY))
            if batch.get("end_of_epoch"):
                continue
            empty = False
            seen += 1
            if seen <= skip:
                continue
            n = len(batch["sample_keys"])
            self.stats.samples += n
            self.stats.batches += 1
            self.stats.seconds += time.perf_counter() - start
            self.batches_done += 1
            yield batch
            start = time.perf_counter()
        self._epoch_rejected = self.stats.rejected.copy()
        self._worker_rejected = {}
        if empty:
            raise RuntimeError(
                f"epoch {self.epoch} yielded no batch of {self.cfg.batch_size} valid samples on this rank "
                f"(shards {len(self.dataset.urls)}, rejected {dict(self.stats.rejected)}; "
                f"last: {self.stats.last_rejections[-1:] or 'none'})"
            )
        self.epoch += 1
        self.batches_done = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.epoch_iter()
