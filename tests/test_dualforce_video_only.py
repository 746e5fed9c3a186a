"""The video-only DualForce (pretrain stage) and the hand-over of its weights to the full model (joint stage)."""
from __future__ import annotations

import pytest
import torch

from models.dualforce import DiffusionForcingConfig, build_model, diffusion_forcing_loss
from models.dualforce.kv_cache import KVCache
from models.dualforce.pretrained import WeightTransferError, load_video_dit
from tests.test_dualforce_model import B, H, L, W, activate_zero_paths, make_inputs

torch.set_num_threads(1)


def _pretrained_video_only(seed: int = 3):
    """A video-only model whose weights are all far from any initialisation (as after pretraining)."""
    torch.manual_seed(seed)
    model = build_model("tiny", video_only=True).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _video_only_out(model, inp, **kw):
    return model(inp["noisy_video"], inp["sigma_video"], None, None, inp["reference_latent"], None, **kw)[0]


def test_the_video_only_model_is_exactly_the_full_models_video_dit():
    full, video = build_model("tiny").state_dict(), build_model("tiny", video_only=True).state_dict()
    assert set(video) < set(full)
    assert all(video[k].shape == full[k].shape for k in video)
    extra = {k.split(".")[0] for k in set(full) - set(video)}
    assert extra == {"video_blocks", "video_audio_mod", "struct_embed", "struct_time", "struct_audio_mod",
                     "struct_blocks", "struct_head", "audio", "bridges"}
    block_extra = {k.split(".", 2)[2].split(".")[0] for k in set(full) - set(video) if k.startswith("video_blocks.")}
    assert block_extra == {"norm_audio", "audio_attn", "audio_gate"}  # only the audio path of each block


def test_joint_from_pretrain_has_the_pretrained_weights_and_zero_bridge_and_audio_contributions():
    pretrained = _pretrained_video_only()
    state = pretrained.state_dict()
    torch.manual_seed(11)
    joint = build_model("tiny").eval()
    copied = load_video_dit(joint, state)
    assert copied == sorted(state)
    own = joint.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in state)  # exactly, not approximately
    gates = {n: p for n, p in joint.zero_init_parameters().items() if n not in state}  # the new modules' zero inits
    assert any(n.endswith("audio_gate") for n in gates) and any(n.startswith("bridges.") for n in gates)
    assert all(torch.count_nonzero(p) == 0 for p in gates.values())
    # the struct stream, the bridge and the audio change nothing of the video velocity at step 0
    inp = make_inputs(joint, seed=5)
    with torch.no_grad():
        video_joint, struct = joint(inp["noisy_video"], inp["sigma_video"], inp["noisy_struct"], inp["sigma_struct"],
                                    inp["reference_latent"], joint.audio_windows(inp["audio"]))
        other = make_inputs(joint, seed=6)
        video_other_audio, _ = joint(inp["noisy_video"], inp["sigma_video"], other["noisy_struct"],
                                     other["sigma_struct"], inp["reference_latent"], joint.audio_windows(other["audio"]))
        video_pretrained = _video_only_out(pretrained, inp)
    assert struct is not None
    torch.testing.assert_close(video_joint, video_pretrained, rtol=0, atol=1e-6)
    torch.testing.assert_close(video_other_audio, video_pretrained, rtol=0, atol=1e-6)
    # once the gates open, audio does change the video (the test above is not vacuous)
    activate_zero_paths(joint)
    with torch.no_grad():
        moved, _ = joint(inp["noisy_video"], inp["sigma_video"], inp["noisy_struct"], inp["sigma_struct"],
                         inp["reference_latent"], joint.audio_windows(inp["audio"]))
    assert (moved - video_pretrained).abs().max() > 1e-3


def test_weights_that_do_not_fit_are_refused_with_every_problem():
    state = build_model("tiny", video_only=True, video_dim=96, video_ffn_dim=192).state_dict()
    state["video_blocks.9.self_attn.q.weight"] = torch.zeros(4, 4)
    with pytest.raises(WeightTransferError) as err:
        load_video_dit(build_model("tiny"), state)
    own = build_model("tiny").state_dict()
    differ = sum(1 for k, v in state.items() if k in own and own[k].shape != v.shape)
    assert differ > 8 and f"{differ} differ in shape: " in str(err.value)
    assert "1 not in the model: video_blocks.9.self_attn.q.weight;" in str(err.value)
    assert "video_blocks.0.ffn.0.weight: pretrained (192, 96), model (128, 64)" in str(err.value)


def test_video_only_forward_is_frame_causal_and_cache_equals_no_cache():
    model = _pretrained_video_only()
    inp = make_inputs(model)
    with torch.no_grad():
        full = _video_only_out(model, inp)
        later = dict(inp, noisy_video=inp["noisy_video"].clone())
        later["noisy_video"][:, :, 2:] += torch.randn_like(later["noisy_video"][:, :, 2:])
        changed = _video_only_out(model, later)
        assert torch.equal(full[:, :, :2], changed[:, :, :2]) and not torch.equal(full[:, :, 2:], changed[:, :, 2:])
        cache = KVCache()
        first = model(inp["noisy_video"][:, :, :2], inp["sigma_video"][:, :2], None, None, inp["reference_latent"],
                      None, frame_offset=0, cache=cache, update_cache=True)[0]
        assert cache.has_reference  # the first pass cached the reference with its frames
        rest = model(inp["noisy_video"][:, :, 2:], inp["sigma_video"][:, 2:], None, None, None,
                     None, frame_offset=2, cache=cache)[0]
    torch.testing.assert_close(torch.cat([first, rest], dim=2), full, rtol=0, atol=2e-5)


def test_video_only_inputs_are_checked():
    model = build_model("tiny", video_only=True)
    inp = make_inputs(model)
    with pytest.raises(ValueError, match="takes no struct rows and no audio"):
        model(inp["noisy_video"], inp["sigma_video"], inp["noisy_struct"], inp["sigma_struct"],
              inp["reference_latent"], None)
    with pytest.raises(ValueError, match="no audio path"):
        model.audio_windows(inp["audio"])
    with pytest.raises(ValueError, match="sigma_struct is required by the full DualForce model"):
        build_model("tiny")(inp["noisy_video"], inp["sigma_video"], None, None, inp["reference_latent"], None)


def test_the_video_only_loss_trains_the_video_dit_alone():
    """A video-only batch: gradients reach every video-DiT parameter, struct_loss is 0, and a few steps on a
    fixed batch lower the loss (the objective is the real one, not a constant)."""
    torch.manual_seed(0)
    model = build_model("tiny", video_only=True)
    gen = torch.Generator().manual_seed(1)
    batch = {"video_latents": torch.randn(B, 16, L, H, W, generator=gen),
             "reference_latent": torch.randn(B, 16, 1, H, W, generator=gen)}
    cfg = DiffusionForcingConfig()
    out = diffusion_forcing_loss(model, batch, cfg, torch.Generator().manual_seed(2))
    out["loss"].backward()
    assert out["struct_loss"].item() == 0.0 and out["video_frames_counted"].item() == (~out["context"]).sum()
    assert all(p.grad is not None for p in model.parameters())
    # the same draws: the loss equals the hand-computed flow-matching error over the non-context frames, with the
    # reference zeroed where it was dropped and the given frames marked
    g = torch.Generator().manual_seed(2)
    from models.dualforce.diffusion_forcing import condition_dropout, sample_sigmas
    draw = sample_sigmas(cfg, B, L, g)
    _, drop_reference = condition_dropout(cfg, B, g)
    eps = torch.randn(batch["video_latents"].shape, generator=g)
    s = draw.video[:, None, :, None, None]
    reference = batch["reference_latent"] * (~drop_reference).float()[:, None, None, None, None]
    with torch.no_grad():
        pred = model((1 - s) * batch["video_latents"] + s * eps, draw.video, None, None, reference, None,
                     given=draw.given)[0]
    err = (pred - (eps - batch["video_latents"])).pow(2).mean(dim=(1, 3, 4))  # [B, L]
    torch.testing.assert_close(out["video_loss"], err[~draw.context].mean())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = diffusion_forcing_loss(model, batch, cfg, torch.Generator().manual_seed(100 + step % 3))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
