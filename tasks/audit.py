"""Audit a shard set: re-derive a random fraction of its samples from the step outputs and compare *content*.

Shapes and dtypes are the contract validator's job (tasks/contract.py); this checks that each member holds
what its label says, member by member:

| check      | the sample's member                 | re-derived from                                          |
|------------|-------------------------------------|----------------------------------------------------------|
| lineage    | meta.json `lineage`                 | the step outputs' current checksums (else: stale shards)  |
| video      | video.mp4, every frame              | crop.mp4's frames at the window (PSNR >= min_psnr_db)     |
| audio      | audio.wav                           | the crop's audio.wav at the window (exact samples)        |
| latent     | video_latents.npy frame 0           | the VAE encode of the window's first crop frame           |
| reference  | reference_latent.npy                | the VAE encode of the clip's first crop frame             |
| struct     | struct.npy rows                     | the motion extractor on a few of the window's crop frames |
| features   | audio_features.npy, keep_mask.npy,  | the HuBERT and pose-check step outputs at the window      |
|            | head_pose.npy (when present)        |                                                          |

Everything is recomputed from the crop video, not read back from the feature files alone, so an error in how
windows are cut (the kind the shape checks cannot see) shows up as a mismatch. Sample choice is seeded.

A video-only sample (meta.json `profile` "video_only", the general preprocess profile) is checked against its
centre crop: lineage, video, latent and reference; it has no audio, struct or features to check. A sample whose
struct rows come from FLAME tracker files (meta.json `struct_source` "flame") has its struct rows and keep mask
checked against the FLAME struct step's outputs; the motion extractor has no say over them.
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from tasks import contract
from tasks.media import decode_video_bytes, iter_frames
from tasks.step_store import StepStore
from tasks.steps.crop import CROP_AUDIO, CROP_VIDEO
from tasks.windows import iter_windows

CHECKS = ("lineage", "video", "audio", "latent", "reference", "struct", "features")
AUDIT_FILE = "audit.json"


@dataclass(frozen=True)
class AuditConfig:
    fraction: float = 0.05  # of the set's samples
    min_samples: int = 1  # at least this many (all, when the set is smaller)
    seed: int = 0
    min_psnr_db: float = 35.0  # per frame, sample video vs crop (one H.264 re-encode at CRF 18 stays above ~40)
    struct_frames: int = 3  # window frames re-run through the motion extractor (first, middle, last, ...)
    latent_atol: float = 2e-2  # float16 storage plus a re-run of the encoder
    struct_atol: float = 1e-3

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")


@dataclass
class Mismatch:
    key: str
    clip_id: str
    window: list[int]
    check: str
    detail: str


@dataclass
class AuditReport:
    samples_total: int
    samples_checked: int
    checks: dict[str, dict] = field(default_factory=dict)  # check -> {"checked": n, "mismatched": m}
    mismatches: list[Mismatch] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.samples_checked > 0

    def table(self) -> list[dict]:
        return [{"check": c, **self.checks[c]} for c in CHECKS if c in self.checks]

    def summary(self) -> str:
        if not self.samples_checked:
            return f"no samples audited (the set has {self.samples_total})"
        bad = {m.check for m in self.mismatches}
        verdict = "content matches" if not bad else f"MISMATCH in {', '.join(sorted(bad))}"
        return (f"{self.samples_checked}/{self.samples_total} samples re-derived from the step outputs: {verdict} "
                f"({len(self.mismatches)} mismatching member(s))")

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok, "summary": self.summary()}


@dataclass
class AuditModels:
    """The extractors the set was made with; absent ones skip their check (said in the report)."""

    wan_vae: Optional[object] = None  # models.wan_vae.WanVae
    motion_extractor: Optional[object] = None  # models.motion_extractor.MotionExtractor


def pick_samples(index_rows: list[dict], cfg: AuditConfig) -> list[dict]:
    n = min(len(index_rows), max(cfg.min_samples, math.ceil(cfg.fraction * len(index_rows))))
    rows = sorted(index_rows, key=lambda r: r["key"])
    return sorted(random.Random(cfg.seed).sample(rows, n), key=lambda r: (r["shard"], r["key"]))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0 ** 2 / max(mse, 1e-10))


def _npy(sample: dict, name: str) -> np.ndarray:
    return np.load(io.BytesIO(sample[name]), allow_pickle=False)


class _ClipSource:
    """One clip's step outputs, read once per clip however many of its samples are audited."""

    def __init__(self, store: StepStore, clip_id: str, crop_step: str = "crop"):
        self.store, self.clip_id = store, clip_id
        self.crop = store.clip_dir(crop_step, clip_id)
        self._audio: Optional[np.ndarray] = None
        self._arrays: dict[str, np.ndarray] = {}
        self.frame0: Optional[np.ndarray] = None
        self.reference: Optional[np.ndarray] = None

    @property
    def audio(self) -> np.ndarray:
        """The crop's wav, int16 (read on first use: a centre crop has none, and its samples need none)."""
        if self._audio is None:
            self._audio, _ = sf.read(self.crop / CROP_AUDIO, dtype="int16")
        return self._audio

    def windows(self, starts: list[int], window: int):
        """(start, frames) of each window, ascending, from one decode of the crop (one window held at a time)."""
        def chunks():
            for chunk in iter_frames(self.crop / CROP_VIDEO):
                if self.frame0 is None and len(chunk):
                    self.frame0 = chunk[0].copy()
                yield chunk
        for start, frames in iter_windows(chunks(), starts, window):
            yield start, np.ascontiguousarray(frames)

    def array(self, step: str, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.store.clip_dir(step, self.clip_id) / name, allow_pickle=False)
        return self._arrays[name]


def _check_sample(sample: dict, crop_frames: np.ndarray, src: _ClipSource, models: AuditModels, cfg: AuditConfig,
                  record: Callable[[str, Optional[str]], None]) -> None:
    """Every check of one sample; `crop_frames`: the crop's frames at its window [T, 512, 512, 3] uint8."""
    from tasks.steps.audio_features import AUDIO_FEATURES_FILE
    from tasks.steps.motion import STRUCT_FILE
    from tasks.steps.pose_check import HEAD_POSE_FILE, KEEP_MASK_FILE

    meta = json.loads(sample[contract.META])
    start, end = meta["window"]
    window = end - start
    video_only = meta.get("profile", contract.TALKING_HEAD) == contract.VIDEO_ONLY
    stale = [s for s, checksum in meta.get("lineage", {}).items()
             if (rec := src.store.load(s, src.clip_id)) is None or rec.checksum != checksum]
    record("lineage", f"step outputs changed since sharding: {stale}" if stale else None)

    video = decode_video_bytes(sample[contract.VIDEO])
    if video.shape != crop_frames.shape:
        record("video", f"{video.shape} frames, the crop window has {crop_frames.shape}")
    else:
        psnr = [_psnr(a, b) for a, b in zip(video, crop_frames)]
        worst = int(np.argmin(psnr))
        record("video", None if psnr[worst] >= cfg.min_psnr_db else
               f"frame {start + worst}: PSNR {psnr[worst]:.1f} dB against the crop (< {cfg.min_psnr_db})")

    if not video_only:
        wav, _ = sf.read(io.BytesIO(sample[contract.AUDIO]), dtype="int16")
        a = contract.AUDIO_SAMPLES_PER_FRAME
        want = src.audio[start * a: end * a]
        record("audio", None if np.array_equal(wav, want) else
               f"wav differs from the crop's audio at [{start * a}, {end * a}) "
               f"(max |diff| {np.abs(wav.astype(np.int32)[:len(want)] - want[:len(wav)]).max() if len(wav) else 'n/a'})")

    if contract.VIDEO_LATENTS not in sample:
        return  # a crop-only set: no feature members
    if models.wan_vae is not None:
        from tasks.steps.vae_latents import encode_reference

        latent0 = _npy(sample, contract.VIDEO_LATENTS)[:, :1].astype(np.float32)
        redone = encode_reference(models.wan_vae, crop_frames[0]).astype(np.float32)
        err = float(np.abs(latent0 - redone).max())
        record("latent", None if err <= cfg.latent_atol else
               f"latent frame 0 differs from the VAE encode of frame {start} by {err:.3g}")
        if src.reference is None:
            src.reference = encode_reference(models.wan_vae, src.frame0).astype(np.float32)
        err = float(np.abs(_npy(sample, contract.REFERENCE_LATENT).astype(np.float32) - src.reference).max())
        record("reference", None if err <= cfg.latent_atol else
               f"reference latent differs from the VAE encode of frame 0 by {err:.3g}")
    if video_only:
        return  # no struct, audio features or keep mask

    struct = _npy(sample, contract.STRUCT)
    # struct rows from the FLAME fallback (tasks/steps/flame_struct.py) are the tracker's, not the motion extractor's:
    # they and their keep mask are compared with the FLAME struct step's outputs
    flame = meta.get("struct_source") == "flame"
    if models.motion_extractor is not None and not flame:
        from models.struct_layout import to_struct
        from tasks.steps.motion import extract_motion

        picks = sorted({round(i * (window - 1) / max(1, cfg.struct_frames - 1)) for i in range(cfg.struct_frames)})
        device = next(models.motion_extractor.parameters()).device  # where the run keeps it
        redone = to_struct(extract_motion(crop_frames[picks], models.motion_extractor, device=device))
        err = float(np.abs(struct[picks] - redone).max())
        record("struct", None if err <= cfg.struct_atol else
               f"struct rows {[start + p for p in picks]} differ from the motion extractor by {err:.3g}")
    problems = []
    struct_step, keep_step = ("flame_struct", "flame_struct") if flame else ("motion", "pose_check")
    for name, member, step, file in (("struct", contract.STRUCT, struct_step, STRUCT_FILE),
                                     ("audio_features", contract.AUDIO_FEATURES, "audio_features", AUDIO_FEATURES_FILE),
                                     ("keep_mask", contract.KEEP_MASK, keep_step, KEEP_MASK_FILE)):
        stored = _npy(sample, member)
        if not np.array_equal(stored, src.array(step, file)[start:end].astype(stored.dtype)):
            problems.append(name)
    if contract.HEAD_POSE in sample:  # NaN rows (no independent pose) must stay NaN where they were
        stored = _npy(sample, contract.HEAD_POSE)
        if not np.array_equal(stored, src.array("pose_check", HEAD_POSE_FILE)[start:end], equal_nan=True):
            problems.append("head_pose")
    record("features", f"{problems} differ from the step outputs at [{start}, {end})" if problems else None)


def audit_shards(shard_dir: str | Path, steps_root: str | Path, models: AuditModels = AuditModels(),
                 cfg: AuditConfig = AuditConfig(), on_sample: Optional[Callable[[str], None]] = None,
                 keys: Optional[list[str]] = None) -> AuditReport:
    """Audit a fraction of the local shard set at `shard_dir` (or exactly the samples `keys`) against the step
    outputs under `steps_root`."""
    from tasks.steps.shard import INDEX_FILE, iter_samples_of

    shard_dir = Path(shard_dir)
    index = pq.read_table(shard_dir / INDEX_FILE).to_pylist()
    if keys is not None:
        unknown = set(keys) - {r["key"] for r in index}
        if unknown:
            raise KeyError(f"not in the shard index: {sorted(unknown)[:5]}")
        chosen = [r for r in index if r["key"] in set(keys)]
    else:
        chosen = pick_samples(index, cfg)
    report = AuditReport(samples_total=len(index), samples_checked=0, keys=[r["key"] for r in chosen])
    store = StepStore(steps_root)

    def record_for(sample: dict, meta: dict):
        def record(check: str, problem: Optional[str]) -> None:
            c = report.checks.setdefault(check, {"checked": 0, "mismatched": 0})
            c["checked"] += 1
            if problem:
                c["mismatched"] += 1
                report.mismatches.append(Mismatch(sample["__key__"], meta["clip_id"], meta["window"], check, problem))
        return record

    def audit_clip(clip_id: str, samples: list[dict]) -> None:
        """The samples of one clip, against one decode of its crop (the face crop or the centre crop: the
        samples' profile says which step made it)."""
        from tasks.steps.pipeline import profile_of_samples

        metas = {s["__key__"]: json.loads(s[contract.META]) for s in samples}
        sample_profile = metas[samples[0]["__key__"]].get("profile", contract.TALKING_HEAD)
        src = _ClipSource(store, clip_id, profile_of_samples(sample_profile).crop_step)
        by_start = sorted(samples, key=lambda s: metas[s["__key__"]]["window"][0])
        starts = sorted({metas[s["__key__"]]["window"][0] for s in samples})
        window = metas[by_start[0]["__key__"]]["frames"]
        frames_at = src.windows(starts, window)
        current = next(frames_at, None)
        for sample in by_start:
            meta = metas[sample["__key__"]]
            while current is not None and current[0] < meta["window"][0]:
                current = next(frames_at, None)
            if current is None or current[0] != meta["window"][0]:
                record_for(sample, meta)("video", f"the crop has no frames {meta['window']}")
            else:
                _check_sample(sample, current[1], src, models, cfg, record_for(sample, meta))
            report.samples_checked += 1
            if on_sample:
                on_sample(sample["__key__"])
        frames_at.close()

    # Samples come clip by clip (a group's shards hold its clips in id order): hold one clip's samples at a time.
    pending: list[dict] = []
    pending_clip: Optional[str] = None
    for sample in iter_samples_of(shard_dir, sorted({r["shard"] for r in chosen}), {r["key"] for r in chosen}):
        clip_id = json.loads(sample[contract.META])["clip_id"]
        if pending and clip_id != pending_clip:
            audit_clip(pending_clip, pending)
            pending = []
        pending.append(sample)
        pending_clip = clip_id
    if pending:
        audit_clip(pending_clip, pending)
    return report


def audit_models_for(shard_dir: str | Path, choice: str, liveportrait_root: Optional[str] = None,
                     wan_vae: Optional[str] = None, wan_vae_subfolder: Optional[str] = None) -> AuditModels:
    """The extractors to audit with: `dryrun` (the same seeded random models the dry-run used), `real` (the
    weights given), `none`, or `auto` (dry-run ones when the set's samples say they were made with them)."""
    from tasks import feature_models

    if choice == "auto":
        from tasks.steps.shard import iter_samples

        first = next(iter_samples(shard_dir), None)
        dryrun = bool(first and first["meta"].get("untrained_dryrun_models"))
        choice = "dryrun" if dryrun else ("real" if liveportrait_root or wan_vae else "none")
    if choice == "none":
        return AuditModels()
    if choice == "dryrun":
        models = feature_models.dryrun_models()
    else:
        models = feature_models.FeatureModels(liveportrait_root or "", "", wan_vae or "", wan_vae_subfolder)
    return AuditModels(feature_models.wan_vae(models) if models.wan_vae else None,
                       feature_models.motion_extractor(models) if models.liveportrait_root else None)
