"""Training schedules that match streaming: the clean-prefix mix, non-decreasing sigma, condition dropout, and
what of them reaches the model and the loss."""
from __future__ import annotations

import pytest
import torch

from models.dualforce import DiffusionForcingConfig, build_model, diffusion_forcing_loss, sample_sigmas
from models.dualforce.diffusion_forcing import condition_dropout
from models.dualforce.frames import group_rows
from tests.test_dualforce_diffusion_forcing import make_batch

torch.set_num_threads(1)
N, L = 40_000, 6


def _cdf_shifted_uniform(x: float, shift: float = 3.0) -> float:
    return x / (shift - (shift - 1) * x)  # P(shift(u) <= x), u ~ U[0, 1]


def test_default_schedule_draws_the_intended_distribution():
    cfg = DiffusionForcingConfig()
    assert (cfg.sigma_order, cfg.clean_prefix_prob, cfg.given_prefix_prob, cfg.context_sigma_max) == (
        "non_decreasing", 0.5, 0.5, 0.05)
    d = sample_sigmas(cfg, N, L, torch.Generator().manual_seed(0))
    has_prefix = d.context.any(1)
    assert abs(has_prefix.float().mean() - 0.5) < 0.01
    # a prefix is leading and its length is uniform over 1..L-1
    lengths = d.context.sum(1)
    assert torch.equal(d.context, torch.arange(L)[None] < lengths[:, None])
    counts = torch.bincount(lengths[has_prefix], minlength=L)[1:]
    assert counts.shape == (L - 1,) and (counts.float() / has_prefix.sum() - 1 / (L - 1)).abs().max() < 0.01
    assert not d.context[:, -1].any()  # at least one frame is always left to learn
    # half the prefixes are given (sigma exactly 0 in both streams), the rest is context noise ~ U[0, 0.05]
    given_samples = d.given.any(1)
    assert torch.equal(d.given, d.context & given_samples[:, None])
    assert abs(given_samples[has_prefix].float().mean() - 0.5) < 0.015
    assert (d.video[d.given] == 0).all() and (d.struct[d.given] == 0).all()
    noisy_ctx = d.context & ~d.given
    levels = d.video[noisy_ctx]
    assert levels.max() <= 0.05 and abs(levels.mean() - 0.025) < 0.001 and abs((levels < 0.0125).float().mean() - 0.25) < 0.01
    assert torch.equal(d.struct[noisy_ctx], levels)  # both streams' context at the same level
    # the frames to learn: non-decreasing in time, with the shifted-uniform marginal
    free = ~d.context
    diffs = d.video[:, 1:] - d.video[:, :-1]
    assert (diffs[free[:, :-1]] >= 0).all() and (d.struct[:, 1:] - d.struct[:, :-1])[free[:, :-1]].min() >= 0
    no_prefix = d.video[~has_prefix]
    for x in (0.2, 0.5, 0.8):
        assert abs((no_prefix <= x).float().mean() - _cdf_shifted_uniform(x)) < 0.01
    # the situation streaming creates, now common: the first three frames all at sigma <= 0.05
    clean3 = (d.video[:, :3] <= 0.05).all(1).float().mean()
    assert clean3 > 0.5 * 3 / 5 - 0.02  # P(prefix) * P(k >= 3) = 0.5 * 3/5


def test_independent_schedule_keeps_the_old_draws():
    d = sample_sigmas(DiffusionForcingConfig.independent(), N, L, torch.Generator().manual_seed(0))
    assert not d.context.any()
    assert (d.video[:, 1:] < d.video[:, :-1]).float().mean() > 0.45  # unordered
    assert (d.video[:, :3] <= 0.05).all(1).float().mean() < 1e-3


def test_condition_dropout_rates_hold_and_are_independent():
    cfg = DiffusionForcingConfig(audio_drop_prob=0.1, reference_drop_prob=0.2)
    audio, ref = condition_dropout(cfg, 100_000, torch.Generator().manual_seed(1))
    assert abs(audio.float().mean() - 0.1) < 0.004 and abs(ref.float().mean() - 0.2) < 0.004
    assert abs((audio & ref).float().mean() - 0.02) < 0.002
    none = condition_dropout(DiffusionForcingConfig(audio_drop_prob=0.0, reference_drop_prob=0.0), 1000)
    assert not none[0].any() and not none[1].any()


class _Spy(torch.nn.Module):
    """Predicts the exact target, with an error of 1 on every frame; records what it was given."""

    def __init__(self, batch):
        super().__init__()
        self.inner, self.batch, self.calls = build_model("tiny"), batch, []

    def audio_windows(self, a):
        return self.inner.audio_windows(a)

    def forward(self, xv, sv, xs, ss, ref, aw, given=None):
        self.calls.append(dict(sv=sv, ref=ref, aw=aw, given=given, xs=xs))
        x0v, x0s = self.batch["video_latents"], group_rows(self.batch["struct"])
        safe_v, safe_s = sv.clamp_min(1e-6)[:, None, :, None, None], ss.clamp_min(1e-6)[:, :, None, None]
        pv = (xv - (1 - safe_v) * x0v) / safe_v - x0v + 1.0
        ps = (xs - (1 - safe_s) * x0s) / safe_s - x0s + 1.0
        return pv, ps


def test_context_frames_carry_no_loss_and_reach_the_model_as_drawn():
    batch = make_batch(B=64, L=4, seed=3)
    spy = _Spy(batch)
    cfg = DiffusionForcingConfig(audio_drop_prob=0.5, reference_drop_prob=0.5)
    out = diffusion_forcing_loss(spy, batch, cfg, torch.Generator().manual_seed(4))
    call = spy.calls[-1]
    ctx, given = out["context"], out["given"]
    assert ctx.any() and given.any() and (ctx & ~given).any()
    assert torch.equal(call["given"], given) and torch.equal(call["sv"], out["sigma_video"])
    # every counted frame has error exactly 1, so each loss is 1 over the counted elements only
    assert out["video_loss"].item() == pytest.approx(1.0, abs=1e-4)
    assert out["struct_loss"].item() == pytest.approx(1.0, abs=1e-3)
    assert out["video_frames_counted"].item() == (~ctx).sum().item()
    # the dropped conditions reach the model as zeros; the kept ones unchanged
    drop_a, drop_r = out["drop_audio"], out["drop_reference"]
    assert drop_a.any() and (~drop_a).any() and drop_r.any() and (~drop_r).any()
    assert (call["ref"][drop_r] == 0).all() and torch.equal(call["ref"][~drop_r], batch["reference_latent"][~drop_r])
    assert (call["aw"][drop_a] == 0).all()
    assert torch.equal(call["aw"][~drop_a], spy.inner.audio_windows(batch["audio_features"])[~drop_a])
    # frame 0's struct pad rows are noised with the real row's noise: tied to it in the model's input
    assert torch.equal(call["xs"][:, 0, :3], call["xs"][:, 0, 3:4].expand_as(call["xs"][:, 0, :3]))


def test_no_dropout_and_no_prefix_count_every_frame():
    batch = make_batch(B=8, L=4, seed=5)
    spy = _Spy(batch)
    cfg = DiffusionForcingConfig.independent(audio_drop_prob=0.0, reference_drop_prob=0.0)
    out = diffusion_forcing_loss(spy, batch, cfg, torch.Generator().manual_seed(4))
    assert out["video_frames_counted"].item() == 8 * 4 and not out["given"].any()
    assert torch.equal(spy.calls[-1]["ref"], batch["reference_latent"])
