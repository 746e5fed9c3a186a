"""Warm start from Wan 2.1: our video DiT, given a Wan transformer's weights, computes what diffusers' Wan computes.

The reference is diffusers' WanTransformer3DModel itself, at the tiny width with random weights (every norm and
bias perturbed too, so no tensor is trivially at its init). Wan takes the reference frame as its leading frame at
timestep 0, with per-token timesteps (Wan 2.2's per-token modulation path), so one comparison covers the patch
embedding, the timestep MLPs, RoPE, every block and the head. Its text cross-attention's output projection is made
exactly zero (we have no text); our block-causal mask is swapped for full attention, the one intended difference.
Tolerance: float32, 1e-5 absolute on velocities of order 1 (the two compute RoPE tables in float64 vs float32 and
sum the same products in different orders; measured max |diff| ~1e-6).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import models.dualforce.model as model_module
from models.dryrun_models import tiny_wan_transformer, write_dryrun_wan_transformer
from models.dualforce import build_model, get_config
from models.dualforce.rope import grid_positions, rope_angles
from models.dualforce.wan_transfer import plan_from_path, select_layers, transfer_wan
from models.weights import WeightsError

TOL = 1e-5
H = W = 4  # latent grid: 2x2 patches


def _perturbed(wan, seed=1):
    """Every parameter moved off its init (RMSNorm weights off 1, biases off their init); text cross-attention
    output exactly zero: the reference then computes the function our video DiT is meant to."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wan.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if ".attn2.to_out.0." in name:
                p.zero_()
    return wan


def _save_diffusers(wan, folder, **kw):
    wan.save_pretrained(folder, safe_serialization=True, **kw)
    return folder


# diffusers -> original Wan names (the reverse of diffusers' conversion table; test-only)
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."), ("attn1.", "self_attn."), ("attn2.", "cross_attn."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("norm2.", "norm3."),
]


def _original_name(key: str) -> str:
    if key == "proj_out.weight" or key == "proj_out.bias":
        return key.replace("proj_out", "head.head")
    if key == "scale_shift_table":
        return "head.modulation"
    if key.endswith(".scale_shift_table"):
        return key.replace("scale_shift_table", "modulation")
    for a, b in _TO_ORIGINAL:
        if a in key:
            return key.replace(a, b, 1)
    return key


def _wan_velocity(wan, noisy, sigma, reference, text, given=None):
    """Wan on [reference, frames] (in_channels 16: latents only; 36: + mask + given latent), per-token timesteps."""
    B, C, n, h, w = noisy.shape
    frames = torch.cat([reference, noisy], dim=2)  # [B, 16, n+1, h, w]
    if wan.config.in_channels == 36:
        mask = torch.zeros(B, 4, n + 1, h, w)
        mask[:, :, 0] = 1
        if given is not None:
            mask[:, :, 1:] = given.float()[:, None, :, None, None]
        frames = torch.cat([frames, mask, frames * mask[:, :1]], dim=1)
    tokens = (h // 2) * (w // 2)
    t = torch.cat([torch.zeros(B, 1), sigma], dim=1) * 1000.0  # the reference is a clean frame
    out = wan(frames, t.repeat_interleave(tokens, dim=1), text, return_dict=False)[0]
    return out[:, :, 1:]


def _ours(monkeypatch, model, noisy, sigma, reference, given=None, full_attention=True):
    if full_attention:
        monkeypatch.setattr(model_module, "frame_causal_mask", lambda *a, **k: None)
    with torch.no_grad():
        return model(noisy, sigma, None, None, reference, None, given=given)[0]


def _inputs(seed=0, n=3, B=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, n, H, W, generator=g), torch.rand(B, n, generator=g),
            torch.randn(B, 16, 1, H, W, generator=g), torch.randn(B, 5, 32, generator=g))


def _video_dit(blocks):
    torch.manual_seed(3)
    return build_model("tiny", video_only=True, video_blocks=blocks, struct_blocks=1, bridge_shallow_blocks=1).eval()


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_layout_16_channel_source_computes_what_wan_computes(tmp_path, monkeypatch, sharded):
    wan = _perturbed(tiny_wan_transformer(num_layers=3))
    folder = _save_diffusers(wan, tmp_path / "wan", **({"max_shard_size": "200KB"} if sharded else {}))
    if sharded:
        assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = _video_dit(3)
    report = transfer_wan(ours, folder, layers="first")
    noisy, sigma, reference, text = _inputs()
    expected = _wan_velocity(wan, noisy, sigma, reference, text)
    got = _ours(monkeypatch, ours, noisy, sigma, reference)
    assert expected.abs().mean() > 0.1  # a real signal, not two zeros
    assert (got - expected).abs().max() < TOL
    # the mask/given channels of a 16-channel source start at zero; the noisy channels hold Wan's weights
    w = ours.video_embed.proj.weight
    assert torch.equal(w[:, :16], wan.patch_embedding.weight) and not w[:, 16:].any()
    assert report.summary() == f"from wan ({len(report.copies)} of {report.source_tensors} tensors, blocks 0, 1, 2)"
    assert any("text cross-attention" in r for _, r in report.dropped)


def test_36_channel_source_fills_mask_and_given_channels(tmp_path, monkeypatch):
    wan = _perturbed(tiny_wan_transformer(num_layers=3, in_channels=36, image_dim=24))
    ours = _video_dit(3)
    report = transfer_wan(ours, _save_diffusers(wan, tmp_path / "wan"), layers="first")
    assert torch.equal(ours.video_embed.proj.weight, wan.patch_embedding.weight)
    noisy, sigma, reference, text = _inputs(seed=1)
    given = torch.tensor([[True, False, False], [False, False, False]])
    sigma = torch.where(given, torch.zeros_like(sigma), sigma)
    # the i2v reference's CLIP image tokens go through the (zeroed) cross-attention: their content cannot matter
    image = torch.randn(2, 257, 24)
    with torch.no_grad():
        B, _, n, h, w = noisy.shape
        frames = torch.cat([reference, noisy], dim=2)
        mask = torch.zeros(B, 4, n + 1, h, w)
        mask[:, :, 0] = 1
        mask[:, :, 1:] = given.float()[:, None, :, None, None]
        wan_in = torch.cat([frames, mask, frames * mask[:, :1]], dim=1)
        t = (torch.cat([torch.zeros(B, 1), sigma], 1) * 1000).repeat_interleave(4, dim=1)
        text = torch.randn(B, 512, 32)  # diffusers' i2v cross-attention splits off 512 text tokens
        expected = wan(wan_in, t, text, encoder_hidden_states_image=image, return_dict=False)[0][:, :, 1:]
    got = _ours(monkeypatch, ours, noisy, sigma, reference, given=given)
    assert (got - expected).abs().max() < TOL
    reasons = {r for _, r in report.dropped}
    assert any("CLIP image embedding" in r for r in reasons)
    assert any(s.endswith("add_k_proj.weight") for s, _ in report.dropped)  # the image k/v of the cross-attention


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_layout_computes_what_wan_computes(tmp_path, monkeypatch, suffix):
    wan = _perturbed(tiny_wan_transformer(num_layers=3))
    state = {_original_name(k): v.contiguous() for k, v in wan.state_dict().items()}
    assert "blocks.0.self_attn.q.weight" in state and "head.head.weight" in state and "blocks.1.norm3.weight" in state
    folder = tmp_path / "wan-original"
    folder.mkdir()
    file = folder / f"diffusion_pytorch_model{suffix}"
    save_file(state, file) if suffix == ".safetensors" else torch.save(state, file)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 64, "num_heads": 2,
                                                    "num_layers": 3, "in_dim": 16, "eps": 1e-6}))
    ours = _video_dit(3)
    report = transfer_wan(ours, folder, layers="first")
    assert report.layout == "wan"
    noisy, sigma, reference, text = _inputs(seed=2)
    expected = _wan_velocity(wan, noisy, sigma, reference, text)
    assert (_ours(monkeypatch, ours, noisy, sigma, reference) - expected).abs().max() < TOL


def test_even_layer_choice_copies_blocks_0_2_4_and_matches_a_wan_of_those_blocks(tmp_path, monkeypatch):
    assert select_layers(6, 3) == [0, 2, 4]
    assert select_layers(30, 20)[:4] == [0, 1, 3, 4] and select_layers(30, 20)[-1] == 28
    assert select_layers(6, 3, "first") == [0, 1, 2] and select_layers(6, 3, [5, 0, 3]) == [5, 0, 3]
    for bad in ([0, 1], [0, 0, 1], [0, 1, 6], "every"):
        with pytest.raises(ValueError):
            select_layers(6, 3, bad)
    wan6 = _perturbed(tiny_wan_transformer(num_layers=6))
    ours = _video_dit(3)
    report = transfer_wan(ours, _save_diffusers(wan6, tmp_path / "wan6"))
    assert report.layers == [0, 2, 4] and report.layer_rule == "even"
    assert sum("not selected" in r for _, r in report.dropped) == 3 * len(
        [k for k in wan6.state_dict() if k.startswith("blocks.1.")])
    wan3 = tiny_wan_transformer(num_layers=3)  # the reference built from exactly blocks 0, 2, 4
    picked = {}
    for k, v in wan6.state_dict().items():
        parts = k.split(".")
        if parts[0] != "blocks":
            picked[k] = v
        elif int(parts[1]) in (0, 2, 4):
            picked[".".join(["blocks", str(int(parts[1]) // 2)] + parts[2:])] = v
    wan3.load_state_dict(picked, strict=True)
    noisy, sigma, reference, text = _inputs(seed=3)
    expected = _wan_velocity(wan3, noisy, sigma, reference, text)
    assert (_ours(monkeypatch, ours, noisy, sigma, reference) - expected).abs().max() < TOL
    # and not what the first three blocks compute: the choice mattered
    wan_first = tiny_wan_transformer(num_layers=3)
    wan_first.load_state_dict({k: v for k, v in wan6.state_dict().items()
                               if not k.startswith("blocks.") or int(k.split(".")[1]) < 3}, strict=True)
    assert (_wan_velocity(wan_first, noisy, sigma, reference, text) - expected).abs().max() > 1e-3


def test_per_frame_modulation_at_one_sigma_equals_wans_global_modulation(tmp_path):
    """Our block with every frame at one sigma (per-frame mods broadcast) = Wan's block with its global temb."""
    wan = _perturbed(tiny_wan_transformer(num_layers=1))
    ours = _video_dit(1)
    transfer_wan(ours, _save_diffusers(wan, tmp_path / "wan"), layers="first")
    B, n, hp, wp = 2, 3, 2, 2
    x = torch.randn(B, n * hp * wp, 64)
    sigma = torch.full((B,), 0.37)
    with torch.no_grad():
        temb, proj, text, _ = wan.condition_embedder(sigma * 1000, torch.randn(B, 5, 32))
        expected = wan.blocks[0](x, text, proj.unflatten(1, (6, -1)), wan.rope(torch.zeros(B, 16, n, 2 * hp, 2 * wp)))
        e, mods = ours.video_time(sigma[:, None].expand(B, n))  # [B, n, 6, D] per frame, all equal
        rope = rope_angles(grid_positions(torch.arange(n), hp, wp), 32)
        got = ours.video_blocks[0](x.view(B, n, hp * wp, 64), mods, None, rope, None)
    assert torch.allclose(e[:, 0], temb, atol=1e-6)
    assert (got.flatten(1, 2) - expected).abs().max() < TOL


def test_causal_mask_is_the_only_difference(tmp_path, monkeypatch):
    """With our block-causal mask the outputs differ from Wan's full attention (frames no longer see the future);
    the last frame, which sees everything either way in one block, still matches a one-block model."""
    wan = _perturbed(tiny_wan_transformer(num_layers=1))
    ours = _video_dit(1)
    transfer_wan(ours, _save_diffusers(wan, tmp_path / "wan"), layers="first")
    noisy, sigma, reference, text = _inputs(seed=4)
    expected = _wan_velocity(wan, noisy, sigma, reference, text)
    with torch.no_grad():
        causal = ours(noisy, sigma, None, None, reference, None)[0]
    assert (causal[:, :, :-1] - expected[:, :, :-1]).abs().max() > 1e-3
    # the reference sees only itself under our mask but everything under Wan's, so even the last frame differs
    # through the keys it attends to only in a multi-block model; in one block the last frame's keys are the same
    assert (causal[:, :, -1] - expected[:, :, -1]).abs().max() < TOL


def test_misfits_are_all_listed_in_one_error_and_nothing_is_copied(tmp_path):
    wan = tiny_wan_transformer(num_layers=6)
    state = dict(wan.state_dict())
    state["blocks.0.mystery.weight"] = torch.zeros(3)
    state["blocks.2.ffn.net.0.proj.weight"] = torch.zeros(96, 64)
    del state["blocks.4.attn1.to_q.bias"]
    folder = tmp_path / "broken"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                    "num_attention_heads": 4, "attention_head_dim": 16}))
    ours = _video_dit(3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        transfer_wan(ours, folder)
    message = str(err.value)
    for expected in ("blocks.0.mystery.weight", "blocks.2.ffn.net.0.proj.weight", "video_blocks.2.self_attn.q.bias",
                     "heads 4 != ours 2", "4 problems"):
        assert expected in message, expected
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    with pytest.raises(WeightsError, match="neither|not a Wan 2.1 transformer"):
        save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
        transfer_wan(ours, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="cannot read"):
        (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
        transfer_wan(ours, tmp_path / "junk.safetensors")


def test_warm_started_full_model_ignores_audio_and_struct_until_their_gates_open(tmp_path):
    folder = write_dryrun_wan_transformer(tmp_path / "wan")
    torch.manual_seed(5)
    full = build_model("tiny").eval()
    report = transfer_wan(full, folder)
    assert any(k.startswith("video_blocks.0.audio_attn.") for k in report.kept_at_init)
    assert "bridges.0.video_gate" in report.kept_at_init or any(k.startswith("bridges.") for k in report.kept_at_init)
    video_only = _video_dit(3)
    transfer_wan(video_only, folder)
    c = full.config
    g = torch.Generator().manual_seed(6)
    noisy, sigma, reference = torch.randn(1, 16, 3, H, W, generator=g), torch.rand(1, 3, generator=g), \
        torch.randn(1, 16, 1, H, W, generator=g)

    def velocity(audio_seed, struct_seed):
        a = torch.randn(1, 3, c.audio_window, c.audio_dim, generator=torch.Generator().manual_seed(audio_seed))
        s = torch.randn(1, 3, c.frames_per_latent, c.struct_dim, generator=torch.Generator().manual_seed(struct_seed))
        with torch.no_grad():
            return full(noisy, sigma, s, torch.rand(1, 3), reference, a)[0]

    v = velocity(0, 0)
    assert torch.equal(v, velocity(1, 2))  # audio and struct cannot reach the video stream at step 0
    with torch.no_grad():  # the same velocity as the video DiT alone, which is Wan's
        assert torch.allclose(v, video_only(noisy, sigma, None, None, reference, None)[0], atol=1e-6)
        for blk in full.video_blocks:
            blk.audio_gate.fill_(1.0)
    assert (velocity(0, 0) - velocity(1, 0)).abs().max() > 1e-4  # opened: now the speech matters


def test_plan_reads_headers_only_and_model_info_prints_it(tmp_path, capsys):
    from flows.cli import main

    folder = write_dryrun_wan_transformer(tmp_path / "wan")
    plan = plan_from_path(get_config("tiny"), folder)
    assert plan.layers == [0, 2, 4] and not plan.problems
    assert main(["model-info", "tiny", "--init-from", f"wan:{folder}"]) == 0
    out = capsys.readouterr().out
    assert plan.summary() in out and "kept at init" in out and "text cross-attention" in out
    assert main(["model-info", "tiny", "--init-from", f"wan:{tmp_path / 'absent'}"]) == 7
    assert "Wan weights not found" in capsys.readouterr().err
