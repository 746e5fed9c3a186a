"""Step 7, shard: clips -> fixed-length 4n+1-frame training windows in webdataset tar shards.

Clips fall into shard groups by a stable hash of their id (`shard_group_of`), so which worker, runner or
batch handled a clip never changes where its samples go. Each group is written on its own (one task, any
worker) as `<out>/<split>/shard-<group>-%06d.tar`, bounded by sample count and bytes, and recorded in
`_groups/<group>.json` after its last shard; then one merge step writes the parquet index (sample key, shard,
clip id, window, split), `stats.json` (counts, window, config, the samples' profile) and, last, `_status.json`,
and removes every file the index does not list. Shards are finished under temp names and published atomically,
tar headers carry a fixed mtime, so the same inputs give the same names and bytes whether or not an earlier run
was killed. A set holds one sample profile (tasks/contract.py): talking-head samples carry the crop's audio.wav,
video-only ones (a centre crop: no wav) do not; each meta.json says which. `<out>` may be any
fsspec URL (local, file://, s3://, memory://); the inputs (crop dirs, feature files) are local paths.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import webdataset as wds

from datasets_manifest.schema import ClipRow, sanitize_clip_id
from tasks import contract, storage, windows
from tasks.media import VideoWriter, iter_frames, wav_bytes
from tasks.step_runner import ClipState, LedgerEntry
from tasks.steps.crop import CROP_AUDIO, CROP_VIDEO

INDEX_FILE = "index.parquet"
GROUPS_DIR = "_groups"
DEFAULT_SHARD_GROUPS = 16
STATS_FILE = "stats.json"
STATUS_FILE = "_status.json"


@dataclass(frozen=True)
class ShardConfig:
    window_frames: int = contract.WINDOW_FRAMES  # 4n+1 video frames per window -> n+1 latent frames
    stride: Optional[int] = None  # frames between window starts; None = window_frames (no overlap)
    max_samples_per_shard: int = 200
    max_bytes_per_shard: int = 512 << 20
    video_crf: int = 18

    def __post_init__(self) -> None:
        contract.latent_frames(self.window_frames)  # 4n+1, or a ValueError naming the count

    @property
    def step(self) -> int:
        return self.stride or self.window_frames


# A feature source adds members to a sample: (clip, start, end) -> {member name: bytes}.
FeatureSource = Callable[["ShardClip", int, int], dict[str, bytes]]


@dataclass
class ShardClip:
    row: ClipRow
    crop_dir: Path
    frames: int
    step_versions: dict[str, str]
    lineage: dict = field(default_factory=dict)
    feature_sources: list[FeatureSource] = field(default_factory=list)
    meta_extra: dict = field(default_factory=dict)
    segments: Optional[list[tuple[int, int]]] = None  # [start, end) spans windows stay inside; None = whole clip
    profile: str = contract.TALKING_HEAD  # contract.VIDEO_ONLY: no audio.wav (a centre crop has no wav)

    def __post_init__(self) -> None:
        if self.profile not in contract.PROFILES:
            raise ValueError(f"profile must be one of {contract.PROFILES}, got {self.profile!r}")


def window_starts(frames: int, cfg: ShardConfig, segments: Optional[list[tuple[int, int]]] = None) -> list[int]:
    return windows.window_starts(frames, cfg.window_frames, cfg.step, segments)


def sample_key(clip_id: str, start: int) -> str:
    """The tar key of a window; the training loader accepts exactly these (tasks.contract.SAMPLE_KEY)."""
    key = f"{sanitize_clip_id(clip_id)}_w{start:06d}"
    if not contract.SAMPLE_KEY.fullmatch(key):
        raise ValueError(f"sample key {key!r} is outside the contract's key form")
    return key


def _encode_window(frames: np.ndarray, crf: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.mp4"
        with VideoWriter(path, frames.shape[2], frames.shape[1], fps=contract.FPS, crf=crf) as w:
            w.write(frames)
        return path.read_bytes()


def _iter_windows(clip: ShardClip, cfg: ShardConfig, chunk: int = 32) -> Iterator[tuple[int, np.ndarray]]:
    """Windows of decoded crop frames, streaming (only one window plus one chunk in memory)."""
    starts = window_starts(clip.frames, cfg, clip.segments)
    if not starts:
        return
    yield from windows.iter_windows(iter_frames(clip.crop_dir / CROP_VIDEO, chunk=chunk), starts, cfg.window_frames)


def _sample(clip: ShardClip, start: int, frames: np.ndarray, audio: Optional[np.ndarray], cfg: ShardConfig) -> dict:
    """One window's members; `audio`: the crop's wav samples, None for a video-only clip (no audio member)."""
    end = start + cfg.window_frames
    row = clip.row
    meta = {
        "clip_id": row.clip_id,
        "dataset": row.dataset,
        "source": row.source,
        "identity": row.identity,
        "split": row.split,
        "attribution": row.attribution,
        "source_time_range_s": [row.start_s + start / contract.FPS, row.start_s + end / contract.FPS],
        "window": [start, end],
        "segment": next(([a, b] for a, b in (clip.segments or [(0, clip.frames)]) if a <= start and end <= b), None),
        "frames": cfg.window_frames,
        "fps": contract.FPS,
        "sample_rate": contract.SAMPLE_RATE,
        "profile": clip.profile,
        "steps": clip.step_versions,
        "lineage": clip.lineage,
        **clip.meta_extra,
    }
    a = contract.AUDIO_SAMPLES_PER_FRAME
    sample = {
        "__key__": sample_key(row.clip_id, start),
        contract.VIDEO: _encode_window(frames, cfg.video_crf),
    }
    if audio is not None:
        sample[contract.AUDIO] = wav_bytes(audio[start * a : end * a])
    for source in clip.feature_sources:
        sample.update(source(clip, start, end))
    sample[contract.META] = json.dumps(meta, sort_keys=True).encode()
    return sample


class _SplitWriter:
    """Rolls one group's tar shards for one split; each is finished under a temp name, then published."""

    def __init__(self, fs, root: str, split: str, group: str, cfg: ShardConfig, scratch: Path):
        self.fs, self.root, self.split, self.group, self.cfg, self.scratch = fs, root, split, group, cfg, scratch
        self.index = 0
        self.count = 0
        self.bytes = 0
        self._tar: Optional[wds.TarWriter] = None
        self._tmp: Optional[Path] = None
        self.shards: list[dict] = []

    def _name(self) -> str:
        return shard_name(self.split, self.group, self.index)

    def _open(self) -> None:
        final = storage.join(self.root, self._name())
        if storage.is_local(self.fs):  # build next to the final name: publishing is then a rename
            self.fs.makedirs(storage.join(self.root, self.split), exist_ok=True)
            self._tmp = Path(storage.tmp_name(final))
        else:
            self._tmp = self.scratch / Path(storage.tmp_name(final)).name
        self._tar = wds.TarWriter(str(self._tmp), mtime=0.0, user="dualforce", group="dualforce", mode=0o444)
        self.count = self.bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        size = self._tmp.stat().st_size
        storage.publish_file(self.fs, self._tmp, storage.join(self.root, self._name()))
        self.shards.append({"shard": self._name(), "samples": self.count, "bytes": size})
        self._tar = None
        self.index += 1

    def write(self, sample: dict) -> str:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._tar is not None and (
            self.count >= self.cfg.max_samples_per_shard or self.bytes + size > self.cfg.max_bytes_per_shard
        ):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self.count += 1
        self.bytes += size
        return self._name()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def close(self) -> None:
        self._close()


# ---- shard groups: written independently (one task each, any worker), then merged once -------------------

def shard_group_of(clip_id: str, groups: int) -> str:
    """The shard group of a clip: a stable hash of its id, so no runner, worker or batch size changes it."""
    if groups < 1:
        raise ValueError(f"shard groups must be >= 1, got {groups}")
    return f"g{int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) % groups:04d}"


def shard_name(split: str, group: str, index: int) -> str:
    return f"{split}/shard-{group}-{index:06d}.tar"


def plan_groups(clips: list, groups: int, clip_id: Callable = lambda c: c.row.clip_id) -> dict[str, list]:
    """group name -> its clips sorted by id (only non-empty groups)."""
    out: dict[str, list] = defaultdict(list)
    for c in sorted(clips, key=clip_id):
        out[shard_group_of(clip_id(c), groups)].append(c)
    return dict(sorted(out.items()))


@dataclass
class GroupResult:
    """What one shard group wrote; stored as `_groups/<group>.json`, written after its last shard."""

    group: str
    key: str
    shards: list[dict]  # {"shard": "<split>/shard-<group>-<i>.tar", "samples", "bytes"}
    index: list[dict]  # INDEX_SCHEMA rows in write order
    clips: dict[str, list]  # clip id -> [split, samples written]
    skipped: bool = False
    seconds: float = 0.0


def _group_record(root: str, group: str) -> str:
    return storage.join(root, GROUPS_DIR, f"{group}.json")


def load_group(out_dir: str | Path, group: str) -> Optional[GroupResult]:
    fs, root = storage.filesystem(out_dir)
    raw = storage.read_bytes(fs, _group_record(root, group))
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return GroupResult(d["group"], d["key"], d["shards"], d["index"], d["clips"])
    except (ValueError, KeyError):
        return None  # damaged: not done


def _present(fs, root: str, shards: list[dict]) -> bool:
    for s in shards:
        try:
            if fs.size(storage.join(root, s["shard"])) != s["bytes"]:
                return False
        except FileNotFoundError:
            return False
    return True


def write_shard_group(
    clips: list[ShardClip],
    out_dir: str | Path,
    group: str,
    cfg: ShardConfig = ShardConfig(),
    key: str = "",
    on_clip: Optional[Callable[[ShardClip, int], None]] = None,
) -> GroupResult:
    """Write one group's shards (`<split>/shard-<group>-%06d.tar`) under `out_dir`; skip when `key` matches.

    The group's record is removed before and rewritten after its shards, so a writer killed half-way leaves a
    group that is simply not done (its temp files and stale shards go at the next merge).
    """
    fs, root = storage.filesystem(out_dir)
    done = load_group(out_dir, group)
    if key and done is not None and done.key == key and _present(fs, root, done.shards):
        done.skipped = True
        return done
    t0 = time.perf_counter()
    storage.remove(fs, _group_record(root, group))
    for stale in fs.glob(storage.join(root, "*", f"shard-{group}-*.tar")):
        storage.remove(fs, stale)
    writers: dict[str, _SplitWriter] = {}
    index_rows: list[dict] = []
    per_clip: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="dualforce-shard-") as scratch:
        try:
            for clip in sorted(clips, key=lambda c: c.row.clip_id):
                audio = _crop_audio(clip) if clip.profile == contract.TALKING_HEAD else None
                split = clip.row.split
                writer = writers.setdefault(split, _SplitWriter(fs, root, split, group, cfg, Path(scratch)))
                n = 0
                for start, frames in _iter_windows(clip, cfg):
                    sample = _sample(clip, start, frames, audio, cfg)
                    shard = writer.write(sample)
                    index_rows.append({
                        "key": sample["__key__"], "shard": shard, "clip_id": clip.row.clip_id,
                        "window_start": start, "window_end": start + cfg.window_frames, "split": split,
                    })
                    n += 1
                per_clip[clip.row.clip_id] = [split, n]
                if on_clip:
                    on_clip(clip, n)
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    result = GroupResult(group, key, [s for w in writers.values() for s in w.shards], index_rows, per_clip,
                         seconds=time.perf_counter() - t0)
    record = {k: v for k, v in asdict(result).items() if k not in ("skipped", "seconds")}
    storage.write_bytes(fs, _group_record(root, group), json.dumps(record, sort_keys=True).encode())
    return result


def _crop_audio(clip: ShardClip) -> np.ndarray:
    audio, sr = sf.read(clip.crop_dir / CROP_AUDIO, dtype="float32")
    if sr != contract.SAMPLE_RATE:
        raise ValueError(f"{clip.row.clip_id}: wav at {sr} Hz, expected {contract.SAMPLE_RATE}")
    return audio


INDEX_SCHEMA = pa.schema(
    [("key", pa.string()), ("shard", pa.string()), ("clip_id", pa.string()),
     ("window_start", pa.int64()), ("window_end", pa.int64()), ("split", pa.string())]
)


@dataclass
class ShardSetStats:
    out_dir: str | Path
    samples: int
    shards: int
    bytes: int
    clips: int
    per_split: dict
    skipped: bool = False
    groups: list[GroupResult] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # garbage the merge collected


def _stats_from(out_dir, s: dict, skipped: bool, groups: list[GroupResult]) -> ShardSetStats:
    return ShardSetStats(out_dir, s["samples"], s["shards"], s["bytes"], s["clips"], s["per_split"], skipped, groups)


def completed_set(out_dir: str | Path, key: str) -> Optional[dict]:
    """The merged set's stats when `out_dir` holds a complete set for `key` (every listed shard present)."""
    fs, root = storage.filesystem(out_dir)
    raw = storage.read_bytes(fs, storage.join(root, STATUS_FILE))
    if not key or raw is None:
        return None
    try:
        done = json.loads(raw)
    except ValueError:
        return None
    if done.get("key") != key or not _present(fs, root, done["stats"]["shard_files"]):
        return None
    return done["stats"]


def begin_shard_set(out_dir: str | Path, key: str) -> Optional[dict]:
    """Before any group is written: the finished set's stats if `key` is already done, else mark it unfinished.

    Removing the set's status first means a consumer never takes a half-rewritten directory for a finished one.
    """
    done = completed_set(out_dir, key)
    if done is None:
        fs, root = storage.filesystem(out_dir)
        storage.remove(fs, storage.join(root, STATUS_FILE))
    return done


def merge_shard_groups(
    out_dir: str | Path, groups: list[GroupResult], cfg: ShardConfig, key: str, group_count: int,
    profile: str = contract.TALKING_HEAD, extra_stats: Optional[dict] = None,
) -> ShardSetStats:
    """The one merge step: index + stats over every group, then remove the shards and group records of ours that the
    index does not list (collect_garbage: files we did not write are left alone).
    `extra_stats`: more facts of the set for stats.json (the struct source and width of a talking-head set).

    `profile`: what the set's samples hold (contract.TALKING_HEAD or VIDEO_ONLY), recorded in stats.json so a
    trainer knows which model the set can train without opening a shard.

    Garbage: temp files of killed writers, shards of groups that were rewritten smaller or no longer exist,
    stale group records. `_status.json` is written last; its presence with the run's key means "complete".
    """
    fs, root = storage.filesystem(out_dir)
    groups = sorted(groups, key=lambda g: g.group)
    if len({g.group for g in groups}) != len(groups):
        raise ValueError("a shard group was given twice to the merge")
    shards = [s for g in groups for s in g.shards]
    missing = [s["shard"] for s in shards if not _present(fs, root, [s])]
    if missing:
        raise FileNotFoundError(f"shards listed by their group records are missing or truncated: {missing[:5]}")
    index_rows = [r for g in groups for r in g.index]
    keys = [r["key"] for r in index_rows]
    if len(set(keys)) != len(keys):
        raise ValueError("a sample key appears in two shard groups (the same clip planned twice?)")
    removed = collect_garbage(out_dir, {s["shard"] for s in shards}, {g.group for g in groups})
    per_split: dict = defaultdict(lambda: {"samples": 0, "shards": 0, "clips": 0})
    for s in shards:
        per_split[s["shard"].split("/")[0]]["samples"] += s["samples"]
        per_split[s["shard"].split("/")[0]]["shards"] += 1
    for g in groups:
        for split, _n in g.clips.values():
            if split in per_split:
                per_split[split]["clips"] += 1
    stats = {
        "samples": len(index_rows),
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "clips": len({r["clip_id"] for r in index_rows}),
        "per_split": dict(sorted(per_split.items())),
        "window_frames": cfg.window_frames,
        "latent_frames": contract.latent_frames(cfg.window_frames),
        "config": asdict(cfg),
        "shard_groups": group_count,
        "shard_files": shards,
        "profile": profile,
        **(extra_stats or {}),
    }
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(index_rows, schema=INDEX_SCHEMA), buf)
    storage.write_bytes(fs, storage.join(root, INDEX_FILE), buf.getvalue())
    storage.write_bytes(fs, storage.join(root, STATS_FILE), json.dumps(stats, indent=1, sort_keys=True).encode())
    storage.write_bytes(fs, storage.join(root, STATUS_FILE), json.dumps({"key": key, "stats": stats}, sort_keys=True).encode())
    out = _stats_from(out_dir, stats, False, groups)
    out.removed = removed
    return out


def _ours(rel: str) -> bool:
    """A name the shard writer makes: `<split>/shard-*.tar`, `_groups/*.json`, or a temp file (storage.tmp_name)."""
    parts = rel.split("/")
    if storage.is_tmp(rel):
        return True
    if len(parts) != 2:
        return False
    if parts[0] == GROUPS_DIR:
        return parts[1].endswith(".json")
    return parts[1].startswith("shard-") and parts[1].endswith(".tar")


def collect_garbage(out_dir: str | Path, keep_shards: set[str], keep_groups: set[str]) -> list[str]:
    """Remove every file of ours under `out_dir` (shards, group records, temp files) that is not a kept shard or
    group record. What we did not write (audit.json, a user's notes) is left as it is."""
    fs, root = storage.filesystem(out_dir)
    if not fs.exists(root):
        return []
    keep = {INDEX_FILE, STATS_FILE, STATUS_FILE} | keep_shards | {f"{GROUPS_DIR}/{g}.json" for g in keep_groups}
    prefix = root.rstrip("/") + "/"
    removed = []
    for path in sorted(fs.find(root)):
        rel = path[len(prefix):] if path.startswith(prefix) else path
        if _ours(rel) and (rel not in keep or storage.is_tmp(rel)):
            storage.remove(fs, path)
            removed.append(rel)
    return removed


def write_shards(
    clips: list[ShardClip],
    out_dir: str | Path,
    cfg: ShardConfig = ShardConfig(),
    key: str = "",
    on_clip: Optional[Callable[[ShardClip, int], None]] = None,
    groups: int = DEFAULT_SHARD_GROUPS,
) -> ShardSetStats:
    """Every group in turn, then the merge: the whole shard set for `clips` in one call; skip when `key` matches."""
    profile = set_profile(clips)
    done = begin_shard_set(out_dir, key)
    if done is not None:
        return _stats_from(out_dir, done, True, [])
    results = []
    for name, members in plan_groups(clips, groups).items():
        gkey = group_key(key, name, [c.row.clip_id for c in members]) if key else ""
        results.append(write_shard_group(members, out_dir, name, cfg, gkey, on_clip))
    return merge_shard_groups(out_dir, results, cfg, key, groups, profile)


def set_profile(clips: list[ShardClip]) -> str:
    """The one sample profile of a shard set's clips (talking-head when it has none): a set is one or the other."""
    profiles = {c.profile for c in clips} or {contract.TALKING_HEAD}
    if len(profiles) > 1:
        raise ValueError(f"a shard set holds one sample profile, these clips have {sorted(profiles)}")
    return profiles.pop()


def group_key(*parts) -> str:
    """Cache key of one group: anything that changes its clips, their inputs or the config changes it."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shard_files(shard_dir: str | Path, split: Optional[str] = None) -> list[Path]:
    root = Path(shard_dir)
    pattern = f"{split}/shard-*.tar" if split else "*/shard-*.tar"
    return sorted(root.glob(pattern))


def iter_samples(
    shard_dir: str | Path, spec: Optional[contract.ContractSpec] = None, split: Optional[str] = None
) -> Iterator[dict]:
    """Every sample (member name -> bytes, plus __key__ and parsed `meta`), validated when `spec` is given."""
    files = shard_files(shard_dir, split)
    if not files:
        return
    # every shard, whichever rank of a training run asks (validation reads held-out clips on rank 0 alone)
    for sample in wds.WebDataset([str(f) for f in files], shardshuffle=False, empty_check=False, nodesplitter=None):
        sample = {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}
        if spec is not None:
            sample["meta"] = contract.validate_sample(sample, spec)
        else:
            sample["meta"] = json.loads(sample[contract.META])
        yield sample



def iter_samples_of(shard_dir: str | Path, shards: list[str], keys: Optional[set[str]] = None) -> Iterator[dict]:
    """The samples of some of a set's shards (paths relative to `shard_dir`, as the index lists them), only
    those whose key is in `keys` when given; members as bytes plus `__key__`."""
    files = [str(Path(shard_dir) / s) for s in shards]
    if not files:
        return
    for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False):
        if keys is None or sample["__key__"] in keys:
            yield {k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}


SHARD_VERSION = "3"  # 3: windows hold their own frames (stride > decode chunk), inside the crop's segments


@dataclass
class ShardStep:
    """Step 7, once per dataset rather than per clip: every ready clip's windows into the shard set, written in
    groups (one task each, any worker) and merged once (the flow's shard phase drives it); one ledger row per clip."""

    config: ShardConfig = field(default_factory=ShardConfig)
    requires: tuple[str, ...] = ()  # the steps whose outputs its samples carry: the crop, and the features when any
    name: ClassVar[str] = "shard"
    version: ClassVar[str] = SHARD_VERSION

    def ready(self, states: list[ClipState]) -> list[ClipState]:
        """The clips every required step finished."""
        return [s for s in states if s.alive and all(n in s.records for n in self.requires)]

    def ledger_entries(self, results: list[GroupResult], planned: dict[str, list[ClipState]],
                       run_id: str) -> list[LedgerEntry]:
        """A row per clip: ok with its samples, or rejected `too_short` when none of its windows fit."""
        now = time.time()
        entries = []
        for r in results:
            for s in planned[r.group]:
                n = r.clips[s.row.clip_id][1]
                entries.append(LedgerEntry(
                    clip_id=s.row.clip_id, dataset=s.row.dataset, step=self.name, status="ok" if n else "rejected",
                    action="skipped" if r.skipped else "ran", reason="" if n else "too_short",
                    detail="" if n else f"no {self.config.window_frames}-frame window in its stable segments",
                    version=self.version, key=r.key, checksum="",
                    seconds=0.0 if r.skipped else r.seconds / max(1, len(r.clips)), run_id=run_id, finished_at=now))
        return entries
