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

FPS = 25
SAMPLE_RATE = 16_000
AUDIO_SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
CROP_SIZE = 512
LATENT_CHANNELS = 16
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
# Flat per-frame struct vector from LivePortrait motion (layout: models/struct_layout.py).
STRUCT_DIM = 133

# Shard member names (webdataset extensions). A sample holds the ones its pipeline produced.
VIDEO = "video.mp4"
AUDIO = "audio.wav"
VIDEO_LATENTS = "video_latents.npy"
REFERENCE_LATENT = "reference_latent.npy"
STRUCT = "struct.npy"
AUDIO_FEATURES = "audio_features.npy"
KEEP_MASK = "keep_mask.npy"
META = "meta.json"

BASE_MEMBERS = (VIDEO, AUDIO, META)
FEATURE_MEMBERS = (VIDEO_LATENTS, REFERENCE_LATENT, STRUCT, AUDIO_FEATURES, KEEP_MASK)


def window_frames(n: int) -> int:
    """Video frames in a window whose VAE latent has n+1 frames."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return VAE_TIME_STRIDE * n + 1


def latent_frames(video_frames: int) -> int:
    """Latent frames the causal Wan VAE makes from 4n+1 video frames."""
    if video_frames < 1 or (video_frames - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"video frame count must be 4n+1, got {video_frames}")
    return (video_frames - 1) // VAE_TIME_STRIDE + 1


class ContractError(ValueError):
    """A sample that breaks the contract; the message names the sample, the member and what is wrong."""


@dataclass(frozen=True)
class ContractSpec:
    window: int  # video frames per sample, 4n+1
    crop_size: int = CROP_SIZE
    struct_dim: int = STRUCT_DIM
    audio_dim: Optional[int] = None  # HuBERT width; None: take it from meta.json
    require_features: bool = True


# The header np.save writes (format 1.0) for a C-order array of a plain numeric dtype.
_NPY_PLAIN_HEADER = re.compile(
    rb"\{'descr': '([<>|][iuf][1248]|\|[iub]1)', 'fortran_order': False, 'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n")


def load_npy(data: bytes) -> np.ndarray:
    """npy without pickle: object arrays are refused.

    np.save's own headers for plain numeric arrays are read with one regex; np.load parses every header
    with ast.literal_eval (~60 us, a quarter of the training loader's time on small samples). Any other
    header (object or structured dtypes, Fortran order, format 2.0+, a truncated body) goes to np.load,
    which decodes it or raises.
    """
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        body = 10 + int.from_bytes(data[8:10], "little")
        header = _NPY_PLAIN_HEADER.fullmatch(data, 10, body)
        if header is not None:
            dtype = np.dtype(header.group(1).decode())
            shape = tuple(int(n) for n in header.group(2).split(b",") if n.strip())
            count = math.prod(shape)
            if len(data) - body == count * dtype.itemsize:  # a writable copy, as np.load gives
                return np.frombuffer(data, dtype, count, offset=body).reshape(shape).copy()
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
    for member in BASE_MEMBERS:
        _expect(member in sample, key, member, "missing")
    meta_raw = sample[META]
    meta = json.loads(meta_raw) if isinstance(meta_raw, (bytes, str)) else dict(meta_raw)
    for field in ("clip_id", "dataset", "split", "window", "frames", "steps"):
        _expect(field in meta, key, META, f"field {field!r} missing")
    T = spec.window
    _expect(meta["frames"] == T, key, META, f"frames {meta['frames']}, expected window {T}")
    start, end = meta["window"]
    _expect(end - start == T, key, META, f"window {meta['window']} is not {T} frames")
    if not spec.require_features:
        return meta
    for member in FEATURE_MEMBERS:
        _expect(member in sample, key, member, "missing")
    arrays = {m: sample[m] if isinstance(sample[m], np.ndarray) else load_npy(sample[m]) for m in FEATURE_MEMBERS}
    L = latent_frames(T)
    hw = spec.crop_size // VAE_SPACE_STRIDE
    _check_array(key, VIDEO_LATENTS, arrays[VIDEO_LATENTS], (LATENT_CHANNELS, L, hw, hw), np.float16)
    _check_array(key, REFERENCE_LATENT, arrays[REFERENCE_LATENT], (LATENT_CHANNELS, 1, hw, hw), np.float16)
    _check_array(key, STRUCT, arrays[STRUCT], (T, spec.struct_dim), np.float32)
    audio_dim = spec.audio_dim or meta.get("audio_dim")
    _check_array(key, AUDIO_FEATURES, arrays[AUDIO_FEATURES], (T, audio_dim), np.float16)
    _check_array(key, KEEP_MASK, arrays[KEEP_MASK], (T,), np.bool_)
    return meta
