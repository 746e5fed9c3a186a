"""KV cache of the clean context frames, unbounded or bounded to sink frames + a rolling window (StreamingLLM,
CausVid, Self-Forcing's rolling cache).

Layers are named "<stream>:<layer>" ("video:3", "struct:1", "struct:bridge0.s2v", "bridge_video:bridge0.v2s"): a
layer's keys are the tokens of its stream, in the stream's frame order (reference first, at frame -1, then frames
0, 1, ...), so one frame-id list per stream tells every layer of it which keys to keep.

A forward pass with `recording` on stages the keys/values it computes; `commit()` appends them. Denoising passes do
not record, so the cache only ever holds clean frames.

Bounded (`window=W`): after each commit only the sinks (the reference, always, and the first `sink_frames` frames)
and the last W frames stay, so memory is flat over any stream length. RoPE is relative (a query-key score depends
on the frame distance only), and the cached keys are stored rotated at their absolute frames; once frames between
the sinks and the window are gone, the sinks' keys are read rotated forward by the number of evicted frames, so
they sit right before the window, as the reference and the first frames sat in training. A query then sees frame
distances up to sink_frames + W + its chunk (the reference: one more), which the caller keeps within the trained
window (sampler.check_cache_fits). While nothing is evicted (W >= frames so far) this is the unbounded cache, exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

from .rope import apply_rope, rope_angles


class KVCache:
    def __init__(self, window: Optional[int] = None, sink_frames: int = 0, rope_theta: float = 10000.0) -> None:
        if window is not None and window < 1:
            raise ValueError(f"cache window must be >= 1 latent frame (or None: unbounded), got {window}")
        if sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
        self.window, self.sink_frames, self.rope_theta = window, sink_frames, rope_theta
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> k, v [B, H, N, d]
        self._frames: dict[str, torch.Tensor] = {}  # stream -> [N] frame id per cached token (CPU)
        self._staged_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._staged_frames: dict[str, torch.Tensor] = {}
        self.evicted_frames = 0  # frames dropped between the sinks and the window (the sinks' RoPE shift)
        self.recording = False

    @property
    def num_frames(self) -> int:
        """Latent frames written so far, evicted ones included (the reference, at frame -1, is not one of them)."""
        frames = self._frames.get("video")
        return 0 if frames is None else int(frames.max()) + 1

    @property
    def has_reference(self) -> bool:
        frames = self._frames.get("video")
        return frames is not None and bool((frames < 0).any())

    @property
    def nbytes(self) -> int:
        """Bytes of cached keys and values."""
        return sum(k.nbytes + v.nbytes for k, v in self._kv.values())

    def held_frames(self, stream: str = "video") -> list[int]:
        """The distinct frame ids a stream's cache holds now (the reference as -1)."""
        frames = self._frames.get(stream)
        return [] if frames is None else sorted(set(frames.tolist()))

    def key_frames(self, stream: str, current: torch.Tensor) -> torch.Tensor:
        """Absolute frame ids of the keys a layer over `stream` sees (cached tokens, then the current ones): what
        the causal mask compares."""
        if self.recording:
            self._staged_frames[stream] = current
        cached = self._frames.get(stream)
        return current if cached is None else torch.cat([cached, current])

    def extend(self, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, N, d] of the current tokens -> cached + current along N (sinks RoPE-shifted, see above)."""
        _stream_of(name)
        if self.recording:
            self._staged_kv[name] = (k, v)
        cached = self._kv.get(name)
        if cached is None:
            return k, v
        cached_k = self._shifted_sinks(name, cached[0])
        return torch.cat([cached_k, k], dim=2), torch.cat([cached[1], v], dim=2)

    def commit(self) -> None:
        for name, (k, v) in self._staged_kv.items():
            old = self._kv.get(name)
            self._kv[name] = (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))
        for stream, frames in self._staged_frames.items():
            old = self._frames.get(stream)
            self._frames[stream] = frames if old is None else torch.cat([old, frames])
        self._staged_kv.clear()
        self._staged_frames.clear()
        self.recording = False
        self._evict()

    def discard(self) -> None:
        self._staged_kv.clear()
        self._staged_frames.clear()
        self.recording = False

    def _evict(self) -> None:
        """Keep the sinks and the last `window` frames of every stream (no-op when unbounded)."""
        if self.window is None or not self.num_frames:
            return
        first_kept = max(self.sink_frames, self.num_frames - self.window)
        self.evicted_frames = first_kept - self.sink_frames
        for stream, frames in list(self._frames.items()):
            head = int((frames < self.sink_frames).sum())  # reference + sink tokens lead (frames ascend)
            tail = int((frames >= first_kept).sum())
            if head + tail == len(frames):
                continue
            self._frames[stream] = torch.cat([frames[:head], frames[len(frames) - tail:]])
            for name, (k, v) in self._kv.items():
                if _stream_of(name) == stream:
                    n = k.shape[2]
                    # torch.cat copies: the evicted tokens' storage is released, not kept alive by views
                    self._kv[name] = (torch.cat([k[:, :, :head], k[:, :, n - tail:]], 2),
                                      torch.cat([v[:, :, :head], v[:, :, n - tail:]], 2))

    def _shifted_sinks(self, name: str, cached_k: torch.Tensor) -> torch.Tensor:
        """The cached keys with the sink tokens' temporal RoPE advanced by the evicted frame count."""
        if not self.evicted_frames:
            return cached_k
        head = int((self._frames[_stream_of(name)] < self.sink_frames).sum())
        if not head:
            return cached_k
        shift = torch.tensor([[self.evicted_frames, 0, 0]], device=cached_k.device)
        rope = rope_angles(shift, cached_k.shape[-1], self.rope_theta)  # time axis only; rows/cols rotate by 0
        return torch.cat([apply_rope(cached_k[:, :, :head], rope), cached_k[:, :, head:]], dim=2)


def _stream_of(name: str) -> str:
    stream, sep, _ = name.partition(":")
    if not sep or not stream:
        raise ValueError(f"cache layer names are '<stream>:<layer>', got {name!r}")
    return stream
