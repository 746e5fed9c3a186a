"""The alignment contract every shard sample satisfies (DESIGN.md, "Alignment contract").

One place for the numbers and the check, so the shard writer, the reader and the training loader agree.
A window is 4n+1 video frames at 25 fps; the Wan VAE turns it into n+1 latent frames.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

# The model's facts the contract checks samples against live with the models (the VAE's channels and strides, the
# width of LivePortrait's flat struct vector, the default window and HuBERT width); they are part of this module's
# names for its readers.
from models.latent_geometry import LATENT_CHANNELS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE  # noqa: F401
from models.sample_shape import HUBERT_LARGE_DIM, WINDOW_FRAMES  # noqa: F401
from models.struct_layout import STRUCT_DIM  # noqa: F401

FPS = 25
SAMPLE_RATE = 16_000
AUDIO_SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
CROP_SIZE = 512

# Shard member names (webdataset extensions). A sample holds the ones its pipeline produced.
VIDEO = "video.mp4"
AUDIO = "audio.wav"
VIDEO_LATENTS = "video_latents.npy"
REFERENCE_LATENT = "reference_latent.npy"
STRUCT = "struct.npy"
AUDIO_FEATURES = "audio_features.npy"
KEEP_MASK = "keep_mask.npy"
HEAD_POSE = "head_pose.npy"  # optional: the pose check's aligned independent pitch/yaw/roll [T, 3] deg, NaN: none
META = "meta.json"

BASE_MEMBERS = (VIDEO, AUDIO, META)
FEATURE_MEMBERS = (VIDEO_LATENTS, REFERENCE_LATENT, STRUCT, AUDIO_FEATURES, KEEP_MASK)

# Sample profiles (meta.json "profile"). A talking-head sample holds every member above. A video-only sample
# (general video for the pretrain stage: Panda-70M, VoxCeleb2 through the general profile) is a centre crop
# with no face, speech or motion: video.mp4, meta.json, video_latents.npy and reference_latent.npy only.
TALKING_HEAD = "talking_head"
VIDEO_ONLY = "video_only"
PROFILES = (TALKING_HEAD, VIDEO_ONLY)
PROFILE_MEMBERS = {
    TALKING_HEAD: (BASE_MEMBERS, FEATURE_MEMBERS),
    VIDEO_ONLY: ((VIDEO, META), (VIDEO_LATENTS, REFERENCE_LATENT)),
}
# Members a sample may hold besides its profile's: checked when present, never required (sets written before a
# member existed stay valid). head_pose.npy: pose check v2 on LivePortrait motion (the head-pose alignment loss).
OPTIONAL_MEMBERS = {TALKING_HEAD: (HEAD_POSE,), VIDEO_ONLY: ()}


def video_frames(latent_frames: int) -> int:
    """Video frames (4n+1) whose causal VAE latent has `latent_frames` (n+1) frames: latent_frames' inverse."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    return VAE_TIME_STRIDE * (latent_frames - 1) + 1


def latent_frames(video_frames: int) -> int:
    """Latent frames the causal Wan VAE makes from 4n+1 video frames."""
    if video_frames < 1 or (video_frames - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"video frame count must be 4n+1, got {video_frames}")
    return (video_frames - 1) // VAE_TIME_STRIDE + 1


class ContractError(ValueError):
    """A sample that breaks the contract; the message names the sample, the member and what is wrong."""


# Keys the shard writer produces (tasks.steps.shard.sample_key): a sanitised clip id, "_w", the window's first frame.
SAMPLE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,239}_w\d{6,9}")
MAX_META_BYTES = 64 * 1024  # the writer's meta.json is ~1-2 KiB
MAX_META_DEPTH = 6  # the writer nests 3 levels (steps -> step -> fields)
MAX_AUDIO_DIM = 4096  # audio_dim comes from meta.json: the widest HuBERT is 1280
_NPY_MAX_HEADER = 4096  # np.save's header for these arrays is 128 bytes
_CONTAINER_SLACK = 64 * 1024  # mp4 / wav headers beyond the raw payload


@dataclass(frozen=True)
class MemberLimit:
    """What a reader may accept for one member before reading or decoding it."""

    max_bytes: int
    dtype: Optional[np.dtype] = None  # npy members: the dtype and shape the header must declare
    shape: tuple[Optional[int], ...] = ()  # None: any length up to max_free
    max_free: int = 0


def member_limits(spec: "ContractSpec") -> dict[str, MemberLimit]:
    """Per member, the largest size (and for npy the exact header) a valid sample of `spec` can have.

    Compressed video never needs more than the raw frames (yuv420: 1.5 bytes a pixel); wav at most 4 bytes
    a sample. A sample in memory is bounded by the sum of these (`sample_bound`)."""
    T, hw = spec.window_frames, spec.crop_size // VAE_SPACE_STRIDE
    L = latent_frames(T)
    free_dim = spec.audio_dim or MAX_AUDIO_DIM

    def npy(dtype, *shape, free=0):
        items = math.prod(free_dim if d is None else d for d in shape)
        return MemberLimit(_NPY_MAX_HEADER + items * np.dtype(dtype).itemsize, np.dtype(dtype), shape, free)

    return {
        VIDEO: MemberLimit(T * spec.crop_size * spec.crop_size * 3 // 2 + _CONTAINER_SLACK),
        AUDIO: MemberLimit(T * AUDIO_SAMPLES_PER_FRAME * 4 + _CONTAINER_SLACK),
        META: MemberLimit(MAX_META_BYTES),
        VIDEO_LATENTS: npy(np.float16, LATENT_CHANNELS, L, hw, hw),
        REFERENCE_LATENT: npy(np.float16, LATENT_CHANNELS, 1, hw, hw),
        STRUCT: npy(np.float32, T, spec.struct_dim),
        AUDIO_FEATURES: npy(np.float16, T, spec.audio_dim, free=free_dim),
        KEEP_MASK: npy(np.bool_, T),
        HEAD_POSE: npy(np.float32, T, 3),
    }


def sample_bound(spec: "ContractSpec") -> int:
    """Bytes of one raw sample at most (every member at its limit)."""
    return sum(m.max_bytes for m in member_limits(spec).values())


def _check_header(dtype: np.dtype, shape: tuple, limit: MemberLimit, member: str) -> None:
    """The npy header's declared dtype and shape against the member's limit, before any array exists."""
    if dtype != limit.dtype:
        raise ContractError(f"{member}: header declares dtype {dtype}, expected {limit.dtype}")
    if len(shape) != len(limit.shape) or any(
            (want is None and not 0 <= got <= limit.max_free) or (want is not None and got != want)
            for got, want in zip(shape, limit.shape)):
        want = tuple(f"<={limit.max_free}" if d is None else d for d in limit.shape)
        raise ContractError(f"{member}: header declares shape {shape}, expected {want}")


def load_meta(raw: Any) -> dict:
    """meta.json bytes -> dict, refusing oversized or deeply nested documents and non-objects."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if len(raw) > MAX_META_BYTES:
        raise ContractError(f"{META}: {len(raw)} bytes, more than {MAX_META_BYTES}")
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise ContractError(f"{META}: nested deeper than the JSON parser allows") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"{META}: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ContractError(f"{META}: a JSON {type(meta).__name__}, expected an object")
    stack = [(meta, 1)]
    while stack:  # iterative: a depth check that cannot itself recurse
        node, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise ContractError(f"{META}: nested deeper than {MAX_META_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return meta


@dataclass(frozen=True)
class ContractSpec:
    window_frames: int  # video frames per sample, 4n+1
    crop_size: int = CROP_SIZE
    struct_dim: int = STRUCT_DIM
    audio_dim: Optional[int] = None  # HuBERT width; None: take it from meta.json
    require_features: bool = True
    profile: str = TALKING_HEAD  # which members a sample must hold (PROFILE_MEMBERS); extra known members are allowed

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")

    @property
    def base_members(self) -> tuple[str, ...]:
        return PROFILE_MEMBERS[self.profile][0]

    @property
    def feature_members(self) -> tuple[str, ...]:
        return PROFILE_MEMBERS[self.profile][1]

    @property
    def optional_members(self) -> tuple[str, ...]:
        return OPTIONAL_MEMBERS[self.profile]


# The header np.save writes (format 1.0) for a C-order array of a plain numeric dtype.
_NPY_PLAIN_HEADER = re.compile(
    rb"\{'descr': '([<>|][iuf][1248]|\|[iub]1)', 'fortran_order': False, 'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n")


def load_npy(data: bytes, limit: Optional[MemberLimit] = None, member: str = "npy") -> np.ndarray:
    """npy without pickle: object arrays are refused.

    np.save's own headers for plain numeric arrays are read with one regex; np.load parses every header
    with ast.literal_eval (~60 us, a quarter of the training loader's time on small samples). Any other
    header (object or structured dtypes, Fortran order, format 2.0+, a truncated body) goes to np.load,
    which decodes it or raises. With `limit`, the declared dtype and shape are checked first (ContractError):
    np.load allocates what a header declares before it reads the body ("Unable to allocate 18.2 TiB").
    """
    if limit is not None and len(data) > limit.max_bytes:
        raise ContractError(f"{member}: {len(data)} bytes, more than {limit.max_bytes}")
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        body = 10 + int.from_bytes(data[8:10], "little")
        header = _NPY_PLAIN_HEADER.fullmatch(data, 10, body)
        if header is not None:
            dtype = np.dtype(header.group(1).decode())
            shape = tuple(int(n) for n in header.group(2).split(b",") if n.strip())
            if limit is not None:
                _check_header(dtype, shape, limit, member)
            count = math.prod(shape)
            if len(data) - body == count * dtype.itemsize:  # a writable copy, as np.load gives
                return np.frombuffer(data, dtype, count, offset=body).reshape(shape).copy()
    if limit is not None:  # any other header: parsed (no array made) and checked before np.load
        fp = io.BytesIO(data)
        version = np.lib.format.read_magic(fp)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fp, max_header_size=_NPY_MAX_HEADER)
        _check_header(dtype, tuple(shape), limit, member)
        if fortran:
            raise ContractError(f"{member}: Fortran-order array, the writer stores C order")
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _expect(cond: bool, key: str, member: str, msg: str) -> None:
    if not cond:
        raise ContractError(f"sample {key!r}, {member}: {msg}")


def _check_array(key: str, member: str, arr: np.ndarray, shape: tuple, dtype: Any) -> None:
    # Messages are formatted only on failure: the loader runs this for every member of every sample.
    if arr.dtype != np.dtype(dtype):
        _expect(False, key, member, f"dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        _expect(False, key, member, f"shape {tuple(arr.shape)}, expected {tuple('*' if s is None else s for s in shape)}")
    if arr.dtype.kind == "f" and not all_finite(arr):
        _expect(False, key, member, "holds NaN or inf")


_F16_EXPONENT = np.uint16(0x7C00)


def all_finite(arr: np.ndarray) -> bool:
    """np.isfinite(arr).all(), ~13x faster for float16: NaN and inf are exactly the values whose 5 exponent
    bits are all set (np.isfinite on float16 converts every element first; the loader runs this per sample)."""
    if arr.dtype == np.float16:  # |x| bits >= the all-ones exponent: inf or NaN
        return bool((arr.view(np.uint16) & np.uint16(0x7FFF)).max(initial=0) < _F16_EXPONENT)
    return bool(np.isfinite(arr).all())


def validate_sample(sample: Mapping[str, Any], spec: ContractSpec) -> dict:
    """Check one decoded sample (member name -> bytes or array); returns the parsed meta.

    Raises ContractError naming the first violation.
    """
    key = str(sample.get("__key__", "?"))
    for member in spec.base_members:
        _expect(member in sample, key, member, "missing")
    try:
        meta = load_meta(sample[META])
    except ContractError as exc:
        raise ContractError(f"sample {key!r}, {exc}") from None
    for field in ("clip_id", "dataset", "split", "window", "frames", "steps"):
        _expect(field in meta, key, META, f"field {field!r} missing")
    T = spec.window_frames
    _expect(meta["frames"] == T, key, META, f"frames {meta['frames']!r}, expected window {T}")
    window = meta["window"]
    _expect(isinstance(window, list) and len(window) == 2 and all(type(v) is int for v in window), key, META,
            f"window {window!r} is not [start, end]")
    _expect(window[1] - window[0] == T, key, META, f"window {window} is not {T} frames")
    _expect(isinstance(meta["steps"], dict), key, META, "steps is not an object")
    for field in ("clip_id", "dataset", "split"):
        _expect(isinstance(meta[field], str), key, META, f"{field} is not a string")
    if not spec.require_features:
        return meta
    for member in spec.feature_members:
        _expect(member in sample, key, member, "missing")
    arrays = {m: sample[m] if isinstance(sample[m], np.ndarray) else load_npy(sample[m]) for m in spec.feature_members}
    L = latent_frames(T)
    hw = spec.crop_size // VAE_SPACE_STRIDE
    _check_array(key, VIDEO_LATENTS, arrays[VIDEO_LATENTS], (LATENT_CHANNELS, L, hw, hw), np.float16)
    _check_array(key, REFERENCE_LATENT, arrays[REFERENCE_LATENT], (LATENT_CHANNELS, 1, hw, hw), np.float16)
    if spec.profile == VIDEO_ONLY:
        return meta
    _check_array(key, STRUCT, arrays[STRUCT], (T, spec.struct_dim), np.float32)
    audio_dim = spec.audio_dim or meta.get("audio_dim")
    _expect(type(audio_dim) is int and 0 < audio_dim <= MAX_AUDIO_DIM, key, META, f"audio_dim {audio_dim!r}")
    _check_array(key, AUDIO_FEATURES, arrays[AUDIO_FEATURES], (T, audio_dim), np.float16)
    _check_array(key, KEEP_MASK, arrays[KEEP_MASK], (T,), np.bool_)
    if HEAD_POSE in sample:
        head_pose = sample[HEAD_POSE] if isinstance(sample[HEAD_POSE], np.ndarray) else load_npy(sample[HEAD_POSE])
        _check_array(key, HEAD_POSE, head_pose, (T, 3), np.float32)
    return meta
