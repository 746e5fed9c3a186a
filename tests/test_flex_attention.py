"""FlexAttention (BlockMask) against the SDPA reference: the same mask, the same outputs and gradients, the tiles it
skips counted by model-info."""
from __future__ import annotations

import pytest
import torch

from models.dualforce import build_model, measure
from models.dualforce.attention import attend
from models.dualforce.masking import REFERENCE_FRAME, FrameMask, frame_causal_mask
from tests.test_dualforce_model import activate_zero_paths, make_inputs, run

torch.set_num_threads(1)


def _frames(n_frames: int, tokens: int, offset: int = 0, reference: bool = False) -> torch.Tensor:
    ids = torch.arange(offset, offset + n_frames).repeat_interleave(tokens)
    return torch.cat([torch.full((tokens,), REFERENCE_FRAME), ids]) if reference else ids


# (query frames, key frames): training self-attention with the reference; a cached chunk of 2 frames after 3 cached
# frames and the reference; the bridge (struct queries, video keys of other token counts); frames past 128-token tiles
PATTERNS = {
    "self+reference": (_frames(4, 12, reference=True), _frames(4, 12, reference=True)),
    "cached chunk": (_frames(2, 12, offset=3), torch.cat([_frames(3, 12, reference=True), _frames(2, 12, offset=3)])),
    "bridge": (_frames(4, 4), _frames(4, 12)),
    "wide frames": (_frames(3, 150, reference=True), _frames(3, 150, reference=True)),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_block_mask_applies_exactly_the_dense_mask(name):
    q_frames, k_frames = PATTERNS[name]
    mask = frame_causal_mask(q_frames, k_frames)
    assert mask is not None
    expected = torch.tensor([[int(k) <= int(q) for k in k_frames] for q in q_frames])
    assert torch.equal(mask.dense(), expected)
    assert torch.equal(mask.elementwise_from_block_mask(), expected)


@pytest.mark.parametrize("name", PATTERNS)
def test_flex_forward_equals_sdpa(name):
    q_frames, k_frames = PATTERNS[name]
    mask = frame_causal_mask(q_frames, k_frames)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, len(q_frames), 16, generator=g)
    k, v = (torch.randn(2, 3, len(k_frames), 16, generator=g) for _ in range(2))
    sdpa, flex = attend(q, k, v, mask, "sdpa"), attend(q, k, v, mask, "flex")
    assert (flex - sdpa).abs().max() <= 1e-5
    # and the mask matters: unmasked attention differs
    assert (attend(q, k, v, None, "sdpa") - sdpa).abs().max() > 1e-2


def test_visible_tile_fraction_is_the_block_masks_own_tile_count():
    q_frames, k_frames = PATTERNS["wide frames"]  # 600 tokens: tiles straddle frame borders
    mask = frame_causal_mask(q_frames, k_frames)
    block = mask.block_mask()
    computed_tiles = int((block.kv_num_blocks + block.full_kv_num_blocks).sum())
    tiles = -(-len(q_frames) // 128) * -(-len(k_frames) // 128)
    assert mask.visible_block_fraction() == pytest.approx(computed_tiles / tiles)
    assert mask.visible_block_fraction() < 1.0


def test_block_mask_is_built_once_per_pattern():
    """The next frames of a stream (same layout, later absolute frames) reuse the mask built for the first."""
    first = FrameMask(_frames(2, 12, offset=3), _frames(5, 12, reference=False))
    later = FrameMask(_frames(2, 12, offset=40), _frames(5, 12, offset=37))
    other = FrameMask(_frames(2, 12, offset=3), _frames(4, 12))
    assert first.block_mask() is later.block_mask()
    assert other.block_mask() is not first.block_mask()


def _agree(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """fp32 agreement to `tol` relative to the reference's scale (activated paths reach values ~15)."""
    return float((got - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))


def _pair(strategy: str = "full"):
    torch.manual_seed(0)
    sdpa = build_model("tiny", bridge_strategy=strategy)
    activate_zero_paths(sdpa)
    flex = build_model("tiny", bridge_strategy=strategy, attention_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


@pytest.mark.parametrize("strategy", ["full", "shallow_focus"])
def test_model_flex_equals_sdpa_values(strategy):
    sdpa, flex = _pair(strategy)
    inp = make_inputs(sdpa, seed=3)
    with torch.no_grad():
        (v_ref, s_ref), (v_flex, s_flex) = run(sdpa.eval(), inp), run(flex.eval(), inp)
    assert _agree(v_flex, v_ref, 1e-5) and _agree(s_flex, s_ref, 1e-5)
    assert v_ref.abs().max() > 0.1  # the paths are active: not an all-zero comparison


def _grads(model, inp):
    model.train().zero_grad()
    v, s = run(model, inp)
    (v.square().mean() + s.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_flex_equals_sdpa_gradients():
    """On CPU FlexAttention has no backward (torch 2.13): the flex path applies its BlockMask's mask_mod through
    SDPA, so this checks the mask it trains with; the gpu test below checks the fused kernel's gradients."""
    sdpa, flex = _pair()
    inp = make_inputs(sdpa, seed=4)
    ref, got = _grads(sdpa, inp), _grads(flex, inp)
    assert ref.keys() == got.keys() and len(ref) > 50
    for name in ref:
        assert _agree(got[name], ref[name], 1e-5), name


@pytest.mark.gpu
def test_fused_flex_kernel_equals_sdpa_on_cuda():
    sdpa, flex = (m.cuda() for m in _pair())
    inp = {k: v.cuda() for k, v in make_inputs(sdpa, seed=5).items()}
    with torch.no_grad():
        (v_ref, s_ref), (v_flex, s_flex) = run(sdpa.eval(), inp), run(flex.eval(), inp)
    assert _agree(v_flex, v_ref, 1e-4) and _agree(s_flex, s_ref, 1e-4)  # TF32-free fp32, fused vs unfused order
    ref, got = _grads(sdpa, inp), _grads(flex, inp)
    for name in ref:
        assert _agree(got[name], ref[name], 1e-4), name


def test_model_info_counts_only_visible_tiles():
    one = measure("tiny", video_frames=1, latent_size=(16, 16))  # one latent frame: nothing is masked
    assert one.block_sparse_flops == one.train_step_flops
    # 6 latent frames of 32x32 = 1,024 tokens (8 whole tiles) + the reference's 1,024: in tiles of frames, the
    # reference sees itself (1), frame f sees the reference and frames 0..f (f + 2): 28 of 7 x 7
    video = _frames(6, 1024, reference=True)
    assert frame_causal_mask(video, video).visible_block_fraction() == pytest.approx(28 / 49)
    many = measure("tiny", video_frames=21, latent_size=(64, 64))
    assert many.block_sparse_flops < many.train_step_flops
    # only attention is discounted, and at most the video self-attention's masked 21/49 of it
    saved = many.train_step_flops - many.block_sparse_flops
    assert 0 < saved <= many.attention_flops * 21 / 49
