"""Warm start of the video DiT from public Wan 2.1 transformer weights (the planning review's P0 option a).

DualForce lite's video DiT has the Wan 2.1 1.3B dimensions (dim 1536, 12 heads of 128, FFN 8960, freq_dim 256,
(1,2,2) patches) and Wan's i2v input layout (36 = 16 noisy + 4 mask + 16 given channels). Wan's block is ours minus
the audio path plus a text cross-attention, so the transfer is a renaming:

    Wan (diffusers / original key names)                         -> DualForce
    patch_embedding.{weight,bias}                                 -> video_embed.proj.*   (16-ch source: noisy channels
                                                                      only; mask/given channels start at zero)
    condition_embedder.time_embedder.linear_1 / time_embedding.0  -> video_time.mlp.0
    condition_embedder.time_embedder.linear_2 / time_embedding.2  -> video_time.mlp.2
    condition_embedder.time_proj / time_projection.1              -> video_time.proj.1
    blocks.S.attn1.to_{q,k,v,out.0} / blocks.S.self_attn.{q,k,v,o} -> video_blocks.T.self_attn.{q,k,v,o}
    blocks.S.attn1.norm_{q,k} / blocks.S.self_attn.norm_{q,k}     -> video_blocks.T.self_attn.norm_{q,k}
    blocks.S.ffn.net.0.proj, ffn.net.2 / blocks.S.ffn.0, ffn.2    -> video_blocks.T.ffn.0, ffn.2
    blocks.S.scale_shift_table / blocks.S.modulation  [1, 6, D]   -> video_blocks.T.modulation [6, D]
    proj_out / head.head                                          -> video_head.proj
    scale_shift_table / head.modulation  [1, 2, D]                -> video_head.modulation [2, D]

Dropped, with the reason recorded: the text embedding and every block's text cross-attention with its norm (we
condition on audio; there is no text encoder), the CLIP image embedding and its k/v (identity comes from the
reference latent), and the source blocks not selected. Every other tensor of ours keeps its initialisation; the
audio path, audio AdaLN, reference embedding, struct stream and bridge are zero-gated there, so the warm-started
model's video velocity is the transferred Wan blocks' at step 0. Source block S for target block T is chosen by
`layers`: "even" (default: T * S_total // T_total, the spacing our struct schedule uses), "first", or a list.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn as nn

from models.weights import WeightsError

from .config import DualForceConfig
from .wan_checkpoint import DIFFUSERS, ORIGINAL, WanCheckpoint, open_wan_checkpoint

LayerChoice = Union[str, Sequence[int]]  # "even" | "first" | explicit source block per target block
LAYER_RULES = ("even", "first")
PATCH_EMBED = "video_embed.proj.weight"
TEXT = "text conditioning: DualForce conditions on audio and has no text encoder"
TEXT_CROSS = "text cross-attention (and its norm): no counterpart, DualForce's blocks attend to audio instead"
IMAGE = "CLIP image embedding: identity comes from the reference latent, not CLIP features"

# (source name -> our name) outside the blocks, per layout
_GLOBAL = {
    DIFFUSERS: {
        "patch_embedding": "video_embed.proj",
        "condition_embedder.time_embedder.linear_1": "video_time.mlp.0",
        "condition_embedder.time_embedder.linear_2": "video_time.mlp.2",
        "condition_embedder.time_proj": "video_time.proj.1",
        "proj_out": "video_head.proj",
        "scale_shift_table": "video_head.modulation",
    },
    ORIGINAL: {
        "patch_embedding": "video_embed.proj",
        "time_embedding.0": "video_time.mlp.0",
        "time_embedding.2": "video_time.mlp.2",
        "time_projection.1": "video_time.proj.1",
        "head.head": "video_head.proj",
        "head.modulation": "video_head.modulation",
    },
}
# inside blocks.S., per layout (the module path before .weight / .bias, or the parameter itself)
_BLOCK = {
    DIFFUSERS: {
        "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
        "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
    },
    ORIGINAL: {
        "self_attn.q": "self_attn.q", "self_attn.k": "self_attn.k", "self_attn.v": "self_attn.v",
        "self_attn.o": "self_attn.o", "self_attn.norm_q": "self_attn.norm_q", "self_attn.norm_k": "self_attn.norm_k",
        "ffn.0": "ffn.0", "ffn.2": "ffn.2", "modulation": "modulation",
    },
}
_DROP_GLOBAL = {
    DIFFUSERS: {"condition_embedder.text_embedder.": TEXT, "condition_embedder.image_embedder.": IMAGE},
    ORIGINAL: {"text_embedding.": TEXT, "img_emb.": IMAGE},
}
_DROP_BLOCK = {DIFFUSERS: ("attn2.", "norm2."), ORIGINAL: ("cross_attn.", "norm3.")}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """`name` (module path + .weight/.bias, or a bare parameter) through `table`, or None."""
    if name in table:
        return table[name]
    module, _, leaf = name.rpartition(".")
    return f"{table[module]}.{leaf}" if module in table else None


def select_layers(source_blocks: int, target_blocks: int, layers: LayerChoice = "even") -> list[int]:
    """The source block each target block copies (ValueError naming the rule when it cannot be met)."""
    if isinstance(layers, str):
        if layers not in LAYER_RULES:
            raise ValueError(f"layers must be one of {LAYER_RULES} or a list of block indices, got {layers!r}")
        if target_blocks > source_blocks:
            raise ValueError(f"the source has {source_blocks} blocks, fewer than the target's {target_blocks}: "
                             "give an explicit layers list")
        if layers == "first":
            return list(range(target_blocks))
        return [t * source_blocks // target_blocks for t in range(target_blocks)]
    chosen = [int(i) for i in layers]
    if len(chosen) != target_blocks:
        raise ValueError(f"layers lists {len(chosen)} source blocks for a target of {target_blocks} blocks")
    bad = [i for i in chosen if not 0 <= i < source_blocks]
    if bad:
        raise ValueError(f"layers {bad} are not blocks of the {source_blocks}-block source")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {chosen} repeat a source block")
    return chosen


def parse_layers(text: str) -> LayerChoice:
    """"even" | "first" | "0,2,4" (a command-line value) -> a layer choice."""
    text = text.strip()
    if text in LAYER_RULES:
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"layers must be even, first or comma-separated block indices, got {text!r}") from None


def _pattern(name: str) -> str:
    return re.sub(r"(blocks)\.\d+\.", r"\1.{i}.", name)


@dataclass
class WanTransfer:
    """What a transfer does (or did): every source tensor copied or dropped with its reason, every target tensor
    filled or kept at init, and every problem that stops it."""

    source: str
    layout: str
    source_blocks: int
    target_blocks: int
    layers: list[int]
    layer_rule: str
    source_in_channels: int
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source, target)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    kept_at_init: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def source_tensors(self) -> int:
        return len(self.copies) + len(self.dropped)

    def summary(self) -> str:
        blocks = ", ".join(map(str, self.layers))
        return f"from wan ({len(self.copies)} of {self.source_tensors} tensors, blocks {blocks})"

    def raise_if_unfit(self) -> None:
        if self.problems:
            raise WeightsError(f"{self.source} does not fit the video DiT ({len(self.problems)} problems): "
                               + "; ".join(self.problems))

    def rows(self) -> list[dict[str, Any]]:
        """One row per name pattern (blocks.{i}.): the table artifact and `model-info --init-from`."""
        groups: dict[tuple[str, str, str], int] = {}
        for src, dst in self.copies:
            key = ("transferred", _pattern(src), _pattern(dst))
            groups[key] = groups.get(key, 0) + 1
        for src, reason in self.dropped:
            key = ("dropped", _pattern(src), reason)
            groups[key] = groups.get(key, 0) + 1
        for dst in self.kept_at_init:
            key = ("kept at init", _pattern(dst), "new in DualForce (zero-gated where it feeds the stream)")
            groups[key] = groups.get(key, 0) + 1
        return [{"status": status, "name": name, "into / why": what, "tensors": n}
                for (status, name, what), n in groups.items()]

    def markdown(self) -> str:
        lines = [f"### Wan warm start: {self.summary()}", "",
                 f"Source `{self.source}` ({self.layout} layout, {self.source_blocks} blocks, "
                 f"{self.source_in_channels}-channel input); target blocks <- source blocks "
                 f"{self.layers} (rule: {self.layer_rule}).", ""]
        lines += [f"- {n}" for n in self.notes]
        lines += ["", "| status | name | into / why | tensors |", "|---|---|---|---|"]
        lines += [f"| {r['status']} | `{r['name']}` | {r['into / why']} | {r['tensors']} |" for r in self.rows()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "layout": self.layout, "source_blocks": self.source_blocks,
                "target_blocks": self.target_blocks, "layers": self.layers, "layer_rule": self.layer_rule,
                "source_in_channels": self.source_in_channels, "summary": self.summary(),
                "transferred": [{"source": s, "target": t} for s, t in self.copies],
                "dropped": [{"source": s, "reason": r} for s, r in self.dropped],
                "kept_at_init": self.kept_at_init, "notes": self.notes}


def _check_config(ckpt: WanCheckpoint, config: DualForceConfig) -> tuple[list[str], list[str]]:
    """(problems, notes) from the checkpoint's config.json: what the tensors' shapes cannot show (head count, eps,
    the q/k norm kind)."""
    c = ckpt.config
    if not c:
        return [], ["no config.json beside the weights: the head count and eps were not checked against the file"]
    if ckpt.layout == DIFFUSERS:
        found = {"heads": c.get("num_attention_heads"), "dim": (c.get("num_attention_heads") or 0)
                 * (c.get("attention_head_dim") or 0) or None, "eps": c.get("eps"),
                 "patch": tuple(c["patch_size"]) if c.get("patch_size") else None,
                 "qk_norm": None if "qk_norm" not in c else c["qk_norm"] == "rms_norm_across_heads"}
    else:
        found = {"heads": c.get("num_heads"), "dim": c.get("dim"), "eps": c.get("eps"),
                 "patch": tuple(c["patch_size"]) if c.get("patch_size") else None,
                 "qk_norm": c.get("qk_norm")}
    want = {"heads": config.video_heads, "dim": config.video_dim, "eps": config.eps, "patch": config.patch_size,
            "qk_norm": config.qk_norm}
    problems = [f"config.json {k} {found[k]!r} != ours {want[k]!r}" for k in want
                if found[k] is not None and found[k] != want[k]]
    return problems, []


def _fits(target: str, src_shape: tuple[int, ...], dst_shape: tuple[int, ...], config: DualForceConfig) -> bool:
    if target == PATCH_EMBED:  # [D, C_in, 1, 2, 2]: a 16-channel T2V source fills the noisy channels only
        return (src_shape[:1] + src_shape[2:] == dst_shape[:1] + dst_shape[2:]
                and src_shape[1] in (config.latent_channels, dst_shape[1]))
    if target.endswith("modulation"):  # Wan's [1, k, D] tables are our [k, D]
        return src_shape == (1,) + tuple(dst_shape)
    return src_shape == tuple(dst_shape)


def plan_wan_transfer(target_shapes: Mapping[str, Sequence[int]], config: DualForceConfig, ckpt: WanCheckpoint,
                      layers: LayerChoice = "even") -> WanTransfer:
    """The transfer of `ckpt` into a model with these state-dict shapes (a meta-device model's will do): nothing is
    read but names and shapes; every problem is collected, none raised."""
    rule = layers if isinstance(layers, str) else "explicit"
    problems, notes = _check_config(ckpt, config)
    try:
        chosen = select_layers(ckpt.num_blocks, config.video_blocks, layers)
    except ValueError as exc:
        problems.append(str(exc))
        chosen = []
    target_of = {s: t for t, s in enumerate(chosen)}
    in_channels = ckpt.shapes.get("patch_embedding.weight", (0, 0))[1]
    plan = WanTransfer(str(ckpt.path), ckpt.layout, ckpt.num_blocks, config.video_blocks, chosen, rule, in_channels,
                       problems=problems, notes=notes)
    filled: set[str] = set()
    misfit: set[str] = set()  # reported as misshapen already
    for name, shape in sorted(ckpt.shapes.items()):
        target, reason = None, None
        m = _BLOCK_KEY.match(name)
        if m:
            block, rest = int(m.group(1)), m.group(2)
            ours = _rename(rest, _BLOCK[ckpt.layout])
            known = ours is not None or rest.startswith(_DROP_BLOCK[ckpt.layout])
            if known and block not in target_of:
                reason = f"source block {block} not selected (layers {chosen})"
            elif rest.startswith(_DROP_BLOCK[ckpt.layout]):
                reason = TEXT_CROSS
            elif ours is not None:
                target = f"video_blocks.{target_of[block]}.{ours}"
        else:
            reason = next((r for p, r in _DROP_GLOBAL[ckpt.layout].items() if name.startswith(p)), None)
            if reason is None:
                target = _rename(name, _GLOBAL[ckpt.layout])
        if reason is not None:
            plan.dropped.append((name, reason))
        elif target is None:
            problems.append(f"{name} {shape}: not a tensor of a Wan 2.1 transformer that this transfer knows")
        elif target not in target_shapes:
            problems.append(f"{name} -> {target}: the target model has no such tensor")
        elif not _fits(target, tuple(shape), tuple(target_shapes[target]), config):
            problems.append(f"{name} {tuple(shape)} does not fit {target} {tuple(target_shapes[target])}")
            misfit.add(target)
        else:
            plan.copies.append((name, target))
            filled.add(target)
    if in_channels == config.latent_channels and in_channels != config.in_channels:
        notes.append(f"{in_channels}-channel (T2V) source: the {config.in_channels - in_channels} mask / given-frame "
                     "input channels start at zero, so the given-frame path starts neutral")
    # every tensor the Wan layout defines for the video DiT must come from the source: a gap would start a block
    # half-initialised without a word
    expected = set(_GLOBAL[ckpt.layout].values())
    expected = {f"{m}.{leaf}" for m in expected if m != "video_head.modulation" for leaf in ("weight", "bias")}
    expected |= {"video_head.modulation"}
    for t in range(len(chosen)):
        for ours in _BLOCK[ckpt.layout].values():
            leaves = ("weight",) if "norm_" in ours else ("weight", "bias")
            expected |= ({f"video_blocks.{t}.modulation"} if ours == "modulation"
                         else {f"video_blocks.{t}.{ours}.{leaf}" for leaf in leaves})
    absent = sorted(expected & set(target_shapes) - filled - misfit)
    problems += [f"{t}: the source has no tensor for it" for t in absent]
    plan.kept_at_init = sorted(set(target_shapes) - filled)
    return plan


def transfer_wan(model: nn.Module, path: str | Path, layers: LayerChoice = "even") -> WanTransfer:
    """Copy a Wan 2.1 checkpoint's video-DiT tensors into `model` (a DualForce, video-only or full); WeightsError
    listing every problem, before anything is copied, when it does not fit."""
    ckpt = open_wan_checkpoint(path)
    own = model.state_dict()
    plan = plan_wan_transfer({k: tuple(v.shape) for k, v in own.items()}, model.config, ckpt, layers)
    plan.raise_if_unfit()
    tensors = ckpt.tensors([s for s, _ in plan.copies])
    with torch.no_grad():
        for src, dst in plan.copies:
            value = tensors[src].to(own[dst].dtype)
            if dst == PATCH_EMBED and value.shape[1] != own[dst].shape[1]:
                own[dst].zero_()
                own[dst][:, : value.shape[1]].copy_(value)
            else:
                own[dst].copy_(value.reshape(own[dst].shape))
    return plan


def plan_from_path(config: DualForceConfig, path: str | Path, layers: LayerChoice = "even") -> WanTransfer:
    """The plan for a model of `config` (built on the meta device: no memory), from the file's headers only."""
    from .model import DualForce

    with torch.device("meta"):
        model = DualForce(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return plan_wan_transfer(shapes, config, open_wan_checkpoint(path), layers)
