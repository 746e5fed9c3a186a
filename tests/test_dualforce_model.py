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


def run(model, inp, **kw):
    return model(
        inp["noisy_video"], inp["sigma_video"], inp["noisy_struct"], inp["sigma_struct"],
        inp["reference_latent"], model.audio_windows(inp["audio"]), given=inp.get("given"), **kw,
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
    if "given" in out:
        out["given"][:, f] = ~out["given"][:, f]
    return out


@pytest.mark.parametrize("strategy,given,backend", [("full", False, "sdpa"), ("shallow_focus", False, "sdpa"),
                                                    ("none", False, "sdpa"), ("full", True, "sdpa"),
                                                    ("full", False, "flex"), ("full", True, "flex")])
def test_frame_causality(strategy, given, backend):
    model = build_model("tiny", bridge_strategy=strategy, attention_backend=backend).eval()
    activate_zero_paths(model)
    inp = make_inputs(model, seed=1)
    if given:  # given frames (mask channels) on: still frame-causal
        inp["given"] = torch.tensor([[True, True, False, False], [True, False, True, False]])
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


def test_fresh_model_is_identity_blocks_and_zero_velocity():
    """AdaLN-Zero and zero heads: every block returns its input, both velocities are exactly 0."""
    torch.manual_seed(0)
    model = build_model("tiny", bridge_strategy="full")
    zero = model.zero_init_parameters()
    assert zero and all((p == 0).all() for p in zero.values())
    assert {"video_head.proj.weight", "struct_head.proj.weight", "video_time.proj.1.weight",
            "video_blocks.0.modulation", "video_blocks.0.audio_gate", "bridges.0.video_gate"} <= set(zero)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out)))
             for blk in [*model.video_blocks, *model.struct_blocks]]
    with torch.no_grad():
        v, s = run(model, make_inputs(model, seed=3))
    for h in hooks:
        h.remove()
    assert len(seen) == 5 and all(seen)
    assert (v == 0).all() and (s == 0).all()


def test_zero_init_parameters_learn():
    """Starting at zero is not being stuck at zero: within three SGD steps every zero-initialised parameter has had
    a gradient (the heads first, then the gates and modulation tables behind them)."""
    torch.manual_seed(0)
    model = build_model("tiny", bridge_strategy="full")
    zero = model.zero_init_parameters()
    inp = make_inputs(model, seed=3)
    target_v, target_s = torch.randn(B, 16, L, H, W), torch.randn(B, L, 4, 133)
    had_grad = set()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        v, s = run(model, inp)
        ((v - target_v).square().mean() + (s - target_s).square().mean()).backward()
        had_grad |= {n for n, p in zero.items() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    assert had_grad == set(zero), sorted(set(zero) - had_grad)


def test_audio_and_bridge_gates_are_noops_at_init():
    """With the blocks and heads trained (randomised) but the audio and bridge gates at their zero init, the audio
    changes nothing and the bridge is as if absent."""
    torch.manual_seed(0)
    model = build_model("tiny", bridge_strategy="full")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.zero_init_parameters().items():
            if not (name.endswith("audio_gate") or name.startswith(("bridges.", "video_audio_mod.", "struct_audio_mod."))):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    inp = make_inputs(model, seed=3)
    other_audio = dict(inp, audio=torch.randn_like(inp["audio"]))
    with torch.no_grad():
        v0, s0 = run(model, inp)
        v1, s1 = run(model, other_audio)
        no_bridge = build_model("tiny", bridge_strategy="none")
        missing, unexpected = no_bridge.load_state_dict(model.state_dict(), strict=False)
        assert not missing and all(k.startswith("bridges.") for k in unexpected)
        v2, s2 = run(no_bridge, inp)
    assert v0.abs().max() > 0.1 and s0.abs().max() > 0.1
    assert torch.equal(v0, v1) and torch.equal(s0, s1)  # audio changes nothing at init
    assert torch.allclose(v0, v2, atol=1e-6) and torch.allclose(s0, s2, atol=1e-6)  # nor does the bridge


def test_reference_is_its_own_frame_visible_to_every_frame_and_never_a_given_frame():
    model = build_model("tiny", bridge_strategy="full").eval()
    activate_zero_paths(model)
    inp = make_inputs(model, seed=5)
    embeds = []
    hook = model.video_embed.register_forward_hook(lambda m, args, out: embeds.append(args[0]))
    with torch.no_grad():
        v0, s0 = run(model, inp)
        other_ref = dict(inp, reference_latent=torch.randn_like(inp["reference_latent"]))
        v1, s1 = run(model, other_ref)
    hook.remove()
    # every frame sees the reference: the last one as much as the first
    for f in range(L):
        assert (v1[:, :, f] - v0[:, :, f]).abs().max() > 1e-3 and (s1[:, f] - s0[:, f]).abs().max() > 1e-3
    # the frames' conditioning channels hold no reference and no "given" mark (no frame was given)
    frames_in = [x for x in embeds if x.shape[2] == L]
    assert frames_in and all((x[:, 16:] == 0).all() for x in frames_in)
    ref_in = [x for x in embeds if x.shape[2] == 1]  # the reference's own tokens: a clean given frame of its own
    assert torch.equal(ref_in[0][:, :16], inp["reference_latent"]) and (ref_in[0][:, 16:20] == 1).all()
    # a given frame is marked and carries its own latent, not the reference
    embeds.clear()
    hook = model.video_embed.register_forward_hook(lambda m, args, out: embeds.append(args[0]))
    given = torch.zeros(B, L, dtype=torch.bool)
    given[:, 1] = True
    with torch.no_grad():
        run(model, dict(inp, given=given))
    hook.remove()
    x = next(x for x in embeds if x.shape[2] == L)
    assert (x[:, 16:20, 1] == 1).all() and torch.equal(x[:, 20:, 1], inp["noisy_video"][:, :, 1])
    assert (x[:, 16:, [0, 2, 3]] == 0).all()


def test_cached_reference_equals_prepended_reference():
    from models.dualforce.kv_cache import KVCache

    model = build_model("tiny", bridge_strategy="full").eval()
    activate_zero_paths(model)
    inp = make_inputs(model, seed=6)
    win = model.audio_windows(inp["audio"])
    with torch.no_grad():
        v_full, s_full = run(model, inp)
        cache = KVCache()
        model.cache_reference(inp["reference_latent"], cache)
        assert cache.has_reference and cache.num_frames == 0
        parts = []
        for f in range(L):
            sl = slice(f, f + 1)
            args = (inp["noisy_video"][:, :, sl], inp["sigma_video"][:, sl], inp["noisy_struct"][:, sl],
                    inp["sigma_struct"][:, sl], None, win[:, sl])
            parts.append(model(*args, frame_offset=f, cache=cache))
            model(*args, frame_offset=f, cache=cache, update_cache=True)  # the frame joins the context as it was
        with pytest.raises(ValueError, match="empty cache"):
            model.cache_reference(inp["reference_latent"], cache)
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 2), v_full, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), s_full, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("weights_bf16", [False, True])
def test_modulation_gates_and_residuals_stay_fp32_under_bf16(weights_bf16):
    """Under bf16 autocast (and with bf16 weights, as DeepSpeed's bf16 mode holds them) the timestep embedding, the
    modulation, the residual stream and the block outputs are float32, while the attention matmuls run in bf16."""
    model = build_model("tiny", bridge_strategy="full")
    activate_zero_paths(model)
    if weights_bf16:
        model = model.to(torch.bfloat16)
    seen: dict[str, set] = {}

    def record(name):
        def hook(m, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            seen.setdefault(name, set()).update(o.dtype for o in outs if torch.is_tensor(o))
        return hook

    hooks = [model.video_time.register_forward_hook(record("time")),
             model.video_audio_mod.register_forward_hook(record("audio_mod")),
             model.bridges["0"].register_forward_hook(record("bridge"))]
    hooks += [b.register_forward_hook(record("block")) for b in [*model.video_blocks, *model.struct_blocks]]
    hooks.append(model.video_blocks[0].self_attn.q.register_forward_hook(record("q_proj")))
    inp = make_inputs(model, seed=7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v, s = run(model, inp)
    for h in hooks:
        h.remove()
    assert seen["time"] == seen["audio_mod"] == seen["bridge"] == seen["block"] == {torch.float32}
    assert seen["q_proj"] == {torch.bfloat16}
    assert torch.isfinite(v).all() and torch.isfinite(s).all()
    # and the result stays close to the fp32 model's
    ref = build_model("tiny", bridge_strategy="full")
    ref.load_state_dict({k: t.float() for k, t in model.state_dict().items()})
    with torch.no_grad():
        v32, _ = run(ref.eval(), inp)
    assert (v.float() - v32).abs().max() / v32.abs().max() < 0.05


@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
def test_struct_rows_share_one_embedding_and_start_as_an_assignment(tokens):
    from models.dualforce.struct_dit import StructEmbed, StructHead

    embed, head = StructEmbed(4, 133, tokens, 16), StructHead(4, 133, tokens, 16)
    rows = torch.randn(2, 3, 4, 133)
    with torch.no_grad():
        out = embed(rows) - embed.token_embed  # [2, 3, tokens, 16]
        per_row = embed.proj(rows)  # the same projection for every row
    if tokens == 4:
        torch.testing.assert_close(out, per_row)
    elif tokens < 4:  # a token averages its rows
        torch.testing.assert_close(out, per_row.unflatten(2, (tokens, 4 // tokens)).mean(3))
    else:  # a row is copied into its tokens
        torch.testing.assert_close(out, per_row.repeat_interleave(tokens // 4, dim=2))
    nn_init = torch.nn.init
    nn_init.normal_(head.proj.weight)
    x = torch.randn(2, 3, tokens, 16)
    v = head(x, torch.zeros(2, 3, 16))
    assert v.shape == (2, 3, 4, 133)
    if tokens == 4:  # row g reads token g through the shared projection
        h = head.norm(x) * (1 + head.modulation[1]) + head.modulation[0]
        torch.testing.assert_close(v, head.proj(h), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("two_way", [True, False])
def test_one_way_bridge_keeps_struct_blind_to_video(two_way):
    """The review's bridge ablation: one way, struct predictions do not depend on the video at all (no
    video_to_struct weights exist); both ways, they do. Video reads struct either way."""
    torch.manual_seed(0)
    model = build_model("tiny", bridge_two_way=two_way).eval()
    activate_zero_paths(model)
    inp = make_inputs(model)
    other_video = dict(inp, noisy_video=torch.randn_like(inp["noisy_video"]))
    other_struct = dict(inp, noisy_struct=torch.randn_like(inp["noisy_struct"]))
    with torch.no_grad():
        v, s = run(model, inp)
        _, s_video_changed = run(model, other_video)
        v_struct_changed, _ = run(model, other_struct)
    assert not torch.allclose(v, v_struct_changed)  # video reads struct in both settings
    assert torch.allclose(s, s_video_changed) is (not two_way)
    assert any("video_to_struct" in k for k in model.state_dict()) is two_way
