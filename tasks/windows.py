"""Training windows of a clip: where they start, and their frames cut from a streamed decode.

The VAE step and the shard step both cut 4n+1-frame windows from the same crop video; they share these two
functions so a window's latent and its video can never disagree about which frames it holds. Windows never
cross a segment boundary (a static-crop segment, a shot cut): starts are laid out inside each segment.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np


def iter_window_starts(window_frames: int, stride: Optional[int] = None, frames: Optional[int] = None,
                       segments: Optional[Sequence[tuple[int, int]]] = None) -> Iterator[int]:
    """First frame of every whole window, ascending: every `stride` frames (default: back to back) inside
    each `[start, end)` segment (default: the whole clip, of `frames` frames or, when None, unbounded)."""
    step = stride or window_frames
    if step < 1 or window_frames < 1:
        raise ValueError(f"window_frames and stride must be >= 1, got {window_frames}, {step}")
    if segments is None:
        if frames is None:
            yield from itertools.count(0, step)
            return
        segments = [(0, frames)]
    for seg_start, seg_end in segments:
        if frames is not None:
            seg_end = min(int(seg_end), frames)
        yield from range(int(seg_start), int(seg_end) - window_frames + 1, step)


def window_starts(frames: int, window_frames: int, stride: Optional[int] = None,
                  segments: Optional[Sequence[tuple[int, int]]] = None) -> list[int]:
    """`iter_window_starts` of a clip of known length, as a list."""
    return list(iter_window_starts(window_frames, stride, frames, segments))


def iter_windows(chunks: Iterable[np.ndarray], starts: Iterable[int],
                 window_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, frames[start:start+window_frames]) for each of `starts` (ascending, may be unbounded) while the
    stream of frame chunks lasts; the stream is not read past the last window.

    Holds at most one window plus one chunk: frames before the next start are dropped as soon as they have
    been read, and never counted as read before they arrive (windows far apart skip whole chunks).
    """
    pending = iter(starts)
    nxt = next(pending, None)
    if nxt is None:
        return
    buf: Optional[np.ndarray] = None
    buf_start = 0  # clip index of buf[0]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        buf = chunk if buf is None or len(buf) == 0 else np.concatenate([buf, chunk])
        while nxt is not None and nxt + window_frames <= buf_start + len(buf):
            off = nxt - buf_start
            yield nxt, buf[off: off + window_frames]
            following = next(pending, None)
            if following is not None and following < nxt:
                raise ValueError(f"window starts must be ascending: {following} after {nxt}")
            nxt = following
        if nxt is None:
            return
        drop = min(max(0, nxt - buf_start), len(buf))  # only frames already read can be dropped
        buf, buf_start = buf[drop:], buf_start + drop
