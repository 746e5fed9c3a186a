"""Frame-causal visibility between query and key tokens, for both attention paths.

A query of frame t may attend a key of frame s iff s <= t. Frame ids are per token (the reference's tokens carry
frame -1: visible to every frame, seeing only themselves). SDPA gets the dense boolean mask [Nq, Nk] (the reference
path: every block is computed, then the masked half thrown away, and a mask rules out the flash kernels);
FlexAttention gets a `BlockMask`, so the kernel skips the key blocks above the frame diagonal altogether.

A BlockMask is built once per mask pattern and reused: the pattern is the order relation between the query and
key frames only (frames are replaced by their ranks), so the same layout at a later absolute frame -- a training
step's next batch, a bounded streaming cache past its window -- hits the same entry.

`count_attention()` tallies, per attention call, the dense work and the share of it in visible blocks: `model-info`
uses it to count only the blocks FlexAttention computes.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

REFERENCE_FRAME = -1  # the reference latent's tokens: before every frame, so visible to all
BLOCK_SIZE = 128  # FlexAttention's default tile; a `lite` 512² frame is 1024 tokens, 8 whole tiles
_MAX_BLOCK_MASKS = 64


class FrameMask:
    """Which keys each query may see, from per-token frame ids (CPU int64 tensors)."""

    def __init__(self, q_frames: torch.Tensor, k_frames: torch.Tensor, device=None):
        self.q_frames, self.k_frames = q_frames, k_frames  # [Nq], [Nk]
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._dense: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.q_frames), len(self.k_frames)

    def dense(self) -> torch.Tensor:
        """[Nq, Nk] bool on the device, True = may attend (SDPA's attn_mask)."""
        if self._dense is None:
            self._dense = (self.k_frames[None, :] <= self.q_frames[:, None]).to(self.device)
        return self._dense

    def block_mask(self) -> BlockMask:
        """The same visibility as a FlexAttention BlockMask on the device (cached per pattern)."""
        q_rank, k_rank = self._ranks()
        key = (q_rank.numpy().tobytes(), k_rank.numpy().tobytes(), str(self.device))
        hit = _BLOCK_MASKS.get(key)
        if hit is not None:
            _BLOCK_MASKS.move_to_end(key)
            return hit
        q_dev, k_dev = q_rank.to(self.device), k_rank.to(self.device)
        mask = create_block_mask(_causal_mod(q_dev, k_dev), None, None, len(q_rank), len(k_rank),
                                 device=self.device, BLOCK_SIZE=BLOCK_SIZE)
        _BLOCK_MASKS[key] = mask
        if len(_BLOCK_MASKS) > _MAX_BLOCK_MASKS:
            _BLOCK_MASKS.popitem(last=False)
        return mask

    def elementwise_from_block_mask(self) -> torch.Tensor:
        """[Nq, Nk] bool evaluated from the BlockMask's own mask_mod: what FlexAttention applies inside the blocks it
        computes. Used where FlexAttention cannot run (its backward on CPU) and to check the two masks agree."""
        block = self.block_mask()
        return create_mask(block.mask_mod, None, None, *self.shape, device=self.device)[0, 0]

    def visible_block_fraction(self, block_size: int = BLOCK_SIZE) -> float:
        """Share of the (query block, key block) tiles holding at least one visible pair: the work FlexAttention
        does, relative to dense attention (partial tiles count whole, as the kernel computes them whole)."""
        q_max = _block_reduce(self.q_frames, block_size, torch.amax)  # [Bq] latest query frame per tile
        k_min = _block_reduce(self.k_frames, block_size, torch.amin)  # [Bk] earliest key frame per tile
        return float((k_min[None, :] <= q_max[:, None]).float().mean())

    def _ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame ids replaced by their ranks among all ids present: the same order relation, position-free."""
        _, inverse = torch.unique(torch.cat([self.q_frames, self.k_frames]), return_inverse=True)
        return inverse[: len(self.q_frames)], inverse[len(self.q_frames):]


_BLOCK_MASKS: "OrderedDict[tuple, BlockMask]" = OrderedDict()


def _causal_mod(q_frames: torch.Tensor, k_frames: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return k_frames[kv_idx] <= q_frames[q_idx]
    return mask_mod


def _block_reduce(frames: torch.Tensor, block_size: int, reduce) -> torch.Tensor:
    pad = (-len(frames)) % block_size
    if pad:  # pad with a copy of the last id: changes no tile's max or min
        frames = torch.cat([frames, frames[-1:].expand(pad)])
    return reduce(frames.view(-1, block_size), dim=1)


def frame_causal_mask(q_frames: torch.Tensor, k_frames: torch.Tensor, device=None) -> Optional[FrameMask]:
    """The mask between [Nq] query and [Nk] key frame ids, or None if every key is visible to every query (then the
    attention runs unmasked, which lets SDPA pick the flash kernel)."""
    if int(k_frames.max()) <= int(q_frames.min()):
        return None
    return FrameMask(q_frames, k_frames, device)


@dataclass
class AttentionCall:
    """One attention call's dense work (multiply-adds of QK^T, per batch x heads) and the share FlexAttention does."""

    batch_heads: int
    q_tokens: int
    k_tokens: int
    head_dim: int
    visible_fraction: float  # 1.0 for an unmasked call

    @property
    def dense_macs(self) -> int:
        return self.batch_heads * self.q_tokens * self.k_tokens * self.head_dim


_TALLY: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("attention_tally", default=None)


@contextlib.contextmanager
def count_attention() -> Iterator[list[AttentionCall]]:
    """Collect an AttentionCall for every attention computed inside the block."""
    calls: list[AttentionCall] = []
    token = _TALLY.set(calls)
    try:
        yield calls
    finally:
        _TALLY.reset(token)


def record_attention(q: torch.Tensor, k: torch.Tensor, mask: Optional[FrameMask]) -> None:
    """q [B, H, Nq, d], k [B, H, Nk, d]: tally the call when count_attention() is active (else nothing)."""
    calls = _TALLY.get()
    if calls is not None:
        B, H, Nq, d = q.shape
        fraction = 1.0 if mask is None else mask.visible_block_fraction()
        calls.append(AttentionCall(B * H, Nq, k.shape[2], d, fraction))


def block_sparse_share(calls: list[AttentionCall]) -> float:
    """The share of all dense attention work that lies in visible tiles (1.0 with no calls)."""
    dense = sum(c.dense_macs for c in calls)
    return 1.0 if dense == 0 else sum(c.dense_macs * c.visible_fraction for c in calls) / dense
