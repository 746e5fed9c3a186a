"""The auxiliary losses: head-pose alignment against the pose check's estimate, lip-sync InfoNCE; each with a weight,
each without effect at weight 0, each reaching the struct stream's parameters."""
from __future__ import annotations

import math

import pytest
import torch

from models.dualforce import DiffusionForcingConfig, build_model, diffusion_forcing_loss
from models.dualforce.aux_losses import LIP_KEYPOINTS, info_nce, mouth_columns
from models.dualforce.frames import group_rows
from models.struct_layout import EXP, POSE, POSE_SCALE
from tests.test_dualforce_diffusion_forcing import make_batch
from tests.test_dualforce_model import activate_zero_paths

torch.set_num_threads(1)
CFG = dict(audio_drop_prob=0.0, reference_drop_prob=0.0)


def test_mouth_columns_per_struct_source():
    lp = mouth_columns(133)
    assert len(lp) == 18 and all(EXP.start <= c < EXP.stop for c in lp)
    assert lp[:3] == [3 * LIP_KEYPOINTS[0], 3 * LIP_KEYPOINTS[0] + 1, 3 * LIP_KEYPOINTS[0] + 2]
    assert mouth_columns(62) == list(range(53))  # FLAME, 50 expression coefficients + jaw
    with pytest.raises(ValueError, match="neither"):
        mouth_columns(8)


class _Exact(torch.nn.Module):
    """Predicts the exact velocity, so the clean-struct estimate x0_hat is the batch's struct exactly."""

    def __init__(self, batch, struct_dim=133):
        super().__init__()
        self.inner, self.batch = build_model("tiny", lipsync_embed_dim=8, struct_dim=struct_dim), batch
        self.lipsync_head = self.inner.lipsync_head

    def audio_windows(self, a):
        return self.inner.audio_windows(a)

    def forward(self, xv, sv, xs, ss, ref, aw, given=None):
        x0v, x0s = self.batch["video_latents"], group_rows(self.batch["struct"])
        sv_, ss_ = sv.clamp_min(1e-6)[:, None, :, None, None], ss.clamp_min(1e-6)[:, :, None, None]
        return (xv - x0v) / sv_, (xs - x0s) / ss_


def test_head_pose_loss_is_the_pose_error_on_counted_frames():
    batch = make_batch(B=2, L=3, seed=2)
    T = batch["struct"].shape[1]
    delta = torch.zeros(2, T, 3)
    delta[:, :, 1] = 4.0  # 4 degrees of yaw off on every frame ...
    delta[0, 5, 1] = 40.0  # ... except frame 5 of sample 0, which the pose check dropped
    batch["head_pose"] = batch["struct"][..., POSE] / POSE_SCALE + delta
    batch["head_pose"][1, 2] = float("nan")  # no independent estimate there
    batch["keep_mask"][0, 5] = False
    cfg = DiffusionForcingConfig.independent(pose_loss_weight=2.0, **CFG)
    out = diffusion_forcing_loss(_Exact(batch), batch, cfg, torch.Generator().manual_seed(0))
    expected = (4.0 * POSE_SCALE) ** 2 / 3  # mean over the 3 angles of the one that is off
    assert out["pose_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["loss"].item() == pytest.approx(2.0 * expected + out["video_loss"].item() + out["struct_loss"].item(),
                                               rel=1e-4)
    # context frames carry none: with every sample's prefix, only frames after it count (same value here)
    ctx_cfg = DiffusionForcingConfig(pose_loss_weight=1.0, clean_prefix_prob=1.0, **CFG)
    out = diffusion_forcing_loss(_Exact(batch), batch, ctx_cfg, torch.Generator().manual_seed(1))
    assert out["context"].any() and out["pose_loss"].item() == pytest.approx(expected, rel=1e-4)
    without = {k: v for k, v in batch.items() if k != "head_pose"}
    with pytest.raises(KeyError, match="head_pose.npy"):
        diffusion_forcing_loss(_Exact(without), without, cfg)


def test_weight_zero_changes_nothing_and_computes_nothing():
    batch = make_batch(B=2, L=3, seed=3)  # no head_pose member: weight 0 never asks for it
    torch.manual_seed(0)
    base = build_model("tiny", lipsync_embed_dim=8)
    activate_zero_paths(base)
    grads = []
    for cfg in (DiffusionForcingConfig(**CFG), DiffusionForcingConfig(pose_loss_weight=0.0, lipsync_loss_weight=0.0,
                                                                      **CFG)):
        base.zero_grad()
        out = diffusion_forcing_loss(base, batch, cfg, torch.Generator().manual_seed(4))
        out["loss"].backward()
        assert out["pose_loss"].item() == 0 and out["lipsync_loss"].item() == 0
        grads.append((out["loss"].item(), [p.grad.clone() for p in base.parameters() if p.grad is not None]))
        assert all(p.grad is None for p in base.lipsync_head.parameters())  # not even run
    assert grads[0][0] == grads[1][0] and all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


@pytest.mark.parametrize("which", ["pose", "lipsync"])
def test_each_aux_loss_reaches_the_struct_stream(which):
    batch = make_batch(B=2, L=3, seed=5)
    batch["head_pose"] = torch.randn(2, batch["struct"].shape[1], 3) * 10
    torch.manual_seed(0)
    model = build_model("tiny", lipsync_embed_dim=8)
    activate_zero_paths(model)
    weights = {"pose_loss_weight": 1.0} if which == "pose" else {"lipsync_loss_weight": 1.0}
    cfg = DiffusionForcingConfig.independent(video_loss_weight=0.0, struct_loss_weight=0.0, **weights, **CFG)
    out = diffusion_forcing_loss(model, batch, cfg, torch.Generator().manual_seed(6))
    assert out["loss"].item() > 0 and torch.equal(out["loss"], out[f"{which}_loss"] * 1.0)
    out["loss"].backward()
    for name in ("struct_head.proj.weight", "struct_blocks.0.ffn.0.weight", "struct_embed.proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    head_grads = [p.grad for p in model.lipsync_head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads) == (which == "lipsync")


def test_lipsync_infonce_prefers_the_true_pairing_and_needs_a_head():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    aligned = info_nce(z, z, 0.07)
    shuffled = info_nce(z, z[torch.randperm(12, generator=g)], 0.07)
    assert aligned < 0.1 < math.log(12) / 2 < shuffled
    batch = make_batch(B=2, L=3, seed=7)
    cfg = DiffusionForcingConfig.independent(lipsync_loss_weight=1.0, **CFG)
    with pytest.raises(ValueError, match="lip-sync head"):
        diffusion_forcing_loss(build_model("tiny"), batch, cfg)
    # audio dropped everywhere: no frame counts, the loss is 0 (and still differentiable)
    dropped = DiffusionForcingConfig.independent(lipsync_loss_weight=1.0, audio_drop_prob=1.0)
    out = diffusion_forcing_loss(build_model("tiny", lipsync_embed_dim=8), batch, dropped)
    assert out["lipsync_loss"].item() == 0.0 and out["loss"].requires_grad


def test_a_run_with_the_lipsync_loss_gets_its_head():
    from training.train_config import TrainConfig

    base = dict(shards=["x"], out_dir="y", window_frames=9)
    assert TrainConfig(**base).model_config().lipsync_embed_dim == 0
    assert TrainConfig(**base, loss_options={"lipsync_loss_weight": 0.1}).model_config().lipsync_embed_dim == 64
