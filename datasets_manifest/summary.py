"""What a manifest holds (clips, hours, identities, per split) and how much disk each pipeline step needs.

Storage is estimated per second of clip from named constants; each says how it was derived. The figures
are for planning disks, not promises: real source bitrates vary 2-3x between uploads.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from datasets_manifest.schema import SPLITS, ClipRow
from models.sample_shape import HUBERT_LARGE_DIM, WINDOW_FRAMES

VIDEO_FPS = 25  # the alignment contract's video rate

# 1 download: YouTube's 1080p H.264 (avc1) streams run about 4-5 Mbit/s for interview footage; audio is AAC
# at 128 kbit/s (format 140). Clips are trimmed to [start, end] on download, so only clip seconds count.
SOURCE_VIDEO_BITRATE_BPS = 4_500_000
SOURCE_AUDIO_BITRATE_BPS = 128_000
DOWNLOAD_BYTES_PER_S = (SOURCE_VIDEO_BITRATE_BPS + SOURCE_AUDIO_BITRATE_BPS) / 8  # 578,500

# 2 crop: 512x512 25 fps H.264 at CRF ~18 for a mostly static face is about 2 Mbit/s; plus the 16 kHz mono
# 16-bit PCM wav (16,000 samples/s x 2 bytes).
CROP_VIDEO_BITRATE_BPS = 2_000_000
WAV_BYTES_PER_S = 16_000 * 2
CROP_BYTES_PER_S = CROP_VIDEO_BITRATE_BPS / 8 + WAV_BYTES_PER_S  # 282,000

# 3 LivePortrait motion, float16 per video frame: canonical kp 21x3 + exp 21x3 + pitch/yaw/roll 3 + scale 1
# + t 3 = 133 values.
MOTION_VALUES_PER_FRAME = 21 * 3 + 21 * 3 + 3 + 1 + 3
MOTION_BYTES_PER_S = MOTION_VALUES_PER_FRAME * 2 * VIDEO_FPS  # 6,650

# 4 FLAME cross-check: per frame a keep flag (uint8) and an agreement score (float16).
FLAME_BYTES_PER_S = (1 + 2) * VIDEO_FPS  # 75

# 5 HuBERT, float16, pooled 50 Hz -> 25 fps: base 768-d, large 1024-d per video frame (HUBERT_LARGE_DIM).


def hubert_bytes_per_s(dim: int = HUBERT_LARGE_DIM) -> float:
    return dim * 2 * VIDEO_FPS  # 38,400 (base) / 51,200 (large)


# 6 Wan VAE latents, float16: 16 channels x (T/4) latent frames x 64x64 (512/8) per clip second.
VAE_CHANNELS = 16
VAE_LATENT_HW = 512 // 8
VAE_BYTES_PER_S = VAE_CHANNELS * (VIDEO_FPS / 4) * VAE_LATENT_HW * VAE_LATENT_HW * 2  # 819,200

# 7 shards: each training window of 4n+1 frames stores its latent (n+1 latent frames), struct and audio rows,
# keep mask, one reference latent, meta.json, each as a tar member (512-byte header, padding to 512: ~1 KiB
# per member on average). Windows are assumed not to overlap.
SHARD_MEMBERS_PER_SAMPLE = 6
TAR_BYTES_PER_MEMBER = 1024
META_JSON_BYTES = 1024


def shard_bytes_per_window(window_frames: int = WINDOW_FRAMES, hubert_dim: int = HUBERT_LARGE_DIM) -> int:
    if window_frames < 1 or (window_frames - 1) % 4:
        raise ValueError(f"window_frames must be 4n+1, got {window_frames}")
    latent_frames = (window_frames - 1) // 4 + 1
    latent = VAE_CHANNELS * latent_frames * VAE_LATENT_HW * VAE_LATENT_HW * 2
    reference = VAE_CHANNELS * 1 * VAE_LATENT_HW * VAE_LATENT_HW * 2
    struct = MOTION_VALUES_PER_FRAME * 2 * window_frames
    audio = hubert_dim * 2 * window_frames
    keep = window_frames
    return latent + reference + struct + audio + keep + META_JSON_BYTES + SHARD_MEMBERS_PER_SAMPLE * TAR_BYTES_PER_MEMBER


def storage_bytes_per_second(window_frames: int = WINDOW_FRAMES, hubert_dim: int = HUBERT_LARGE_DIM) -> dict[str, float]:
    """Bytes each step writes per second of clip (steps in pipeline order)."""
    return {
        "download": DOWNLOAD_BYTES_PER_S,
        "crop": CROP_BYTES_PER_S,
        "motion": MOTION_BYTES_PER_S,
        "flame": FLAME_BYTES_PER_S,
        "hubert": hubert_bytes_per_s(hubert_dim),
        "vae": VAE_BYTES_PER_S,
        "shards": shard_bytes_per_window(window_frames, hubert_dim) / (window_frames / VIDEO_FPS),
    }


@dataclass(frozen=True)
class SplitStats:
    clips: int
    hours: float
    identities: int


@dataclass(frozen=True)
class ManifestSummary:
    dataset: str
    clips: int
    hours: float
    identities: int
    unknown_duration_clips: int  # end_s None: not in hours or storage
    per_split: dict[str, SplitStats]
    storage_bytes: dict[str, float]  # step -> bytes for the clips of known duration; "total" = sum
    storage_bytes_per_s: dict[str, float]  # step -> the rate used
    errors: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def summarize(
    rows: Iterable[ClipRow],
    *,
    dataset: str = "",
    errors: int = 0,
    notes: Iterable[str] = (),
    window_frames: int = WINDOW_FRAMES,
    hubert_dim: int = HUBERT_LARGE_DIM,
) -> ManifestSummary:
    rows = list(rows)
    seconds: dict[str, float] = defaultdict(float)
    clips: dict[str, int] = defaultdict(int)
    people: dict[str, set[str]] = defaultdict(set)
    unknown = 0
    for row in rows:
        clips[row.split] += 1
        people[row.split].add(row.identity)
        if row.end_s is None:
            unknown += 1
        else:
            seconds[row.split] += row.end_s - row.start_s
    total_s = sum(seconds.values())
    per_split = {s: SplitStats(clips[s], seconds[s] / 3600.0, len(people[s])) for s in SPLITS}
    rates = storage_bytes_per_second(window_frames, hubert_dim)
    storage = {step: rate * total_s for step, rate in rates.items()}
    storage["total"] = sum(storage.values())
    datasets = sorted({r.dataset for r in rows})
    return ManifestSummary(
        dataset=dataset or ",".join(datasets),
        clips=len(rows),
        hours=total_s / 3600.0,
        identities=len({r.identity for r in rows}),
        unknown_duration_clips=unknown,
        per_split=per_split,
        storage_bytes=storage,
        storage_bytes_per_s=rates,
        errors=errors,
        notes=tuple(notes),
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def format_summary(s: ManifestSummary) -> str:
    """A plain-text table for the CLI."""
    rates = dict(s.storage_bytes_per_s, total=sum(s.storage_bytes_per_s.values()))
    lines = [
        f"manifest: {s.dataset or '(empty)'}  clips {s.clips:,}  hours {s.hours:,.3f}  identities {s.identities:,}"
        f"  skipped records {s.errors:,}",
        "",
        f"{'split':<8}{'clips':>10}{'hours':>12}{'identities':>12}",
    ]
    for name, st in s.per_split.items():
        lines.append(f"{name:<8}{st.clips:>10,}{st.hours:>12,.3f}{st.identities:>12,}")
    if s.unknown_duration_clips:
        lines.append(f"{s.unknown_duration_clips:,} clips have no known duration (whole local files): "
                     "they are not in hours or storage")
    lines += ["", f"storage estimate for {s.hours:,.3f} h of clips", f"{'step':<10}{'bytes/s':>12}{'total':>16}"]
    for step, total in s.storage_bytes.items():
        lines.append(f"{step:<10}{rates[step]:>12,.0f}{format_bytes(total):>16}")
    for note in s.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
