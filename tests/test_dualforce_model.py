"""DualForce forward pass: shapes, frame causality of both streams and the audio, zero-initialised paths."""
from __future__ import annotations

import copy

import pytest
import torch

from models.dualforce import DualForceConfig, build_model, get_config
from models.dualforce.frames import video_frames_of

torch.set_num_threads(1)
B, L, H, W = 2, 4, 4, 4
T = 4 * (L - 1) + 1


def activate_zero_paths(model) -> None:
    """Give the zero-initialised gates/projections random values so their paths actually do something."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.zero_init_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def make_inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return {
        "noisy_video": torch.randn(B, c.latent_channels, L, H, W, generator=g),
        "sigma_video": torch.rand(B, L, generator=g),
        "noisy_struct": torch.randn(B, L, c.frames_per_latent, c.struct_dim, generator=g),
        "sigma_struct": torch.rand(B, L, generator=g) * 0.7,
        "reference_latent": torch.randn(B, c.latent_channels, 1, H, W, generator=g),
        "audio": torch.randn(B, T, c.audio_dim, generator=g),
    }


def run(model, inp):
    return model(
        inp["noisy_video"], inp["sigma_video"], inp["noisy_struct"], inp["sigma_struct"],
        inp["reference_latent"], model.audio_windows(inp["audio"]),
    )


def test_shapes_and_config_errors():
    model = build_model("tiny").eval()
    v, s = run(model, make_inputs(model))
    assert v.shape == (B, 16, L, H, W) and s.shape == (B, L, 4, 133)
    assert torch.isfinite(v).all() and torch.isfinite(s).all()
    assert get_config("tiny").in_channels == 36 and get_config("lite").video_dim == 1536
    with pytest.raises(ValueError, match="bridge_strategy"):
        get_config("tiny", bridge_strategy="sideways")
    with pytest.raises(ValueError, match="unknown DualForce config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown DualForceConfig field"):
        get_config("tiny", video_dimm=3)
    with pytest.raises(ValueError, match="struct_blocks"):
        DualForceConfig(video_blocks=2, struct_blocks=3)
    inp = make_inputs(model)
    inp["noisy_struct"] = inp["noisy_struct"][:, :, :3]
    with pytest.raises(ValueError, match="noisy_struct must have shape"):
        run(model, inp)


def test_bridge_strategies_place_layers():
    assert get_config("tiny", bridge_strategy="full").bridge_blocks() == (0, 1, 2)
    assert get_config("tiny", bridge_strategy="shallow_focus", bridge_shallow_blocks=1).bridge_blocks() == (0,)
    assert len(build_model("tiny", bridge_strategy="none").bridges) == 0
    lite = get_config("lite")
    assert lite.bridge_blocks() == tuple(range(8)) and len(lite.struct_schedule()) == lite.struct_blocks
    assert lite.struct_schedule() == tuple(sorted(lite.struct_schedule()))


def _perturb_frame(inp, c, f):
    out = {k: v.clone() for k, v in inp.items()}
    out["noisy_video"][:, :, f] += 1.0
    out["sigma_video"][:, f] = 1.0 - out["sigma_video"][:, f]
    out["noisy_struct"][:, f] += 1.0
    out["sigma_struct"][:, f] = 0.7 - out["sigma_struct"][:, f]
    for vf in video_frames_of(f):  # random, not constant: the projector layer-norms each row
        out["audio"][:, vf] += torch.randn(out["audio"][:, vf].shape, generator=torch.Generator().manual_seed(vf))
    return out


@pytest.mark.parametrize("strategy", ["full", "shallow_focus", "none"])
def test_frame_causality(strategy):
    model = build_model("tiny", bridge_strategy=strategy).eval()
    activate_zero_paths(model)
    inp = make_inputs(model, seed=1)
    with torch.no_grad():
        v0, s0 = run(model, inp)
        for t in range(L - 1):
            v1, s1 = run(model, _perturb_frame(inp, model.config, t + 1))
            assert (v1[:, :, : t + 1] - v0[:, :, : t + 1]).abs().max() <= 1e-6
            assert (s1[:, : t + 1] - s0[:, : t + 1]).abs().max() <= 1e-6
            assert (v1[:, :, t + 1] - v0[:, :, t + 1]).abs().max() > 1e-3  # the perturbation does reach frame t+1
            assert (s1[:, t + 1] - s0[:, t + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["video", "struct", "audio"])
def test_each_input_stream_is_causal_and_used(which):
    """Perturb one input of the last-but-one frame alone: earlier frames stay put, that frame moves."""
    model = build_model("tiny", bridge_strategy="full").eval()
    activate_zero_paths(model)
    inp = make_inputs(model, seed=2)
    f = 2
    pert = {k: v.clone() for k, v in inp.items()}
    if which == "video":
        pert["noisy_video"][:, :, f] += 1.0
    elif which == "struct":
        pert["noisy_struct"][:, f] += 1.0
    else:
        pert["audio"][:, video_frames_of(f).stop - 1] += torch.randn(B, model.config.audio_dim)
    with torch.no_grad():
        v0, s0 = run(model, inp)
        v1, s1 = run(model, pert)
    assert (v1[:, :, :f] - v0[:, :, :f]).abs().max() <= 1e-6 and (s1[:, :f] - s0[:, :f]).abs().max() <= 1e-6
    # the bridge carries struct -> video and video -> struct; audio reaches both
    assert (v1[:, :, f] - v0[:, :, f]).abs().max() > 1e-4
    assert (s1[:, f] - s0[:, f]).abs().max() > 1e-4


def test_zero_init_paths_are_noops_and_get_gradients():
    torch.manual_seed(0)
    model = build_model("tiny", bridge_strategy="full")
    zero = model.zero_init_parameters()
    assert zero and all((p == 0).all() for p in zero.values())
    inp = make_inputs(model, seed=3)
    other_audio = dict(inp, audio=torch.randn_like(inp["audio"]))
    with torch.no_grad():
        v0, s0 = run(model, inp)
        v1, s1 = run(model, other_audio)
        no_bridge = build_model("tiny", bridge_strategy="none")
        missing, unexpected = no_bridge.load_state_dict(model.state_dict(), strict=False)
        assert not missing and all(k.startswith("bridges.") for k in unexpected)
        v2, s2 = run(no_bridge, inp)
    assert torch.equal(v0, v1) and torch.equal(s0, s1)  # audio changes nothing at init
    assert torch.allclose(v0, v2, atol=1e-6) and torch.allclose(s0, s2, atol=1e-6)  # nor does the bridge

    # gradients: the zero-init parameters get them at once; after one step the rest of each path does too
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        v, s = run(model, inp)
        (v.square().mean() + s.square().mean()).backward()
        if step == 0:
            for name, p in zero.items():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            opt.step()
    for prefix in ("audio.", "bridges."):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        assert params
        for name, p in params:
            if "norm" in name and name.endswith("bias"):
                continue  # LayerNorm shifts right before an RMS-normed projection can be gradient-free
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_matches_plain():
    torch.manual_seed(0)
    model = build_model("tiny", bridge_strategy="full")
    activate_zero_paths(model)
    ckpt = copy.deepcopy(model)
    ckpt.config.grad_checkpointing = True
    inp = make_inputs(model, seed=4)
    grads = []
    for m in (model, ckpt):
        m.train()
        v, s = run(m, inp)
        (v.square().mean() + s.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
