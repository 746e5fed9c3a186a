"""HuBERT (transformers HubertModel) loaded from a local directory or the HF cache, never downloaded (step 5).

The conv front end has a 400-sample receptive field and a 320-sample hop: 16 kHz in, 50 Hz out. For L input
samples it yields floor((L - 400) / 320) + 1 frames (exactly, through all seven conv layers).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models.precision import extractor_autocast
from models.weights import HF_DRYRUN_MARKER, WeightsError, check_loading_info

# HubertForCTC checkpoints (hubert-large-ls960-ft) carry a CTC head the base model does not use.
CTC_HEAD_PREFIXES = ("lm_head.",)

SAMPLE_RATE = 16_000
HOP = 320  # samples per 50 Hz feature
RECEPTIVE_FIELD = 400  # samples seen by one feature


def num_features(num_samples: int) -> int:
    """50 Hz frames HuBERT's front end makes from num_samples (0 when shorter than one receptive field)."""
    return 0 if num_samples < RECEPTIVE_FIELD else (num_samples - RECEPTIVE_FIELD) // HOP + 1


@dataclass(frozen=True)
class HubertLayers:
    """Which hidden states to use, averaged. Index i in [-(N+1), N] for N encoder layers:

    0 = input to layer 1 (`hidden_states[0]`); 1..N-1 = output of layer i (`hidden_states[i]`);
    N (= -1) = the model's normalised output, `last_hidden_state`. Why: with the stable-layer-norm encoder
    (HuBERT large) the encoder's final LayerNorm follows the last layer, and transformers 5.x does not fold it
    into `hidden_states[-1]` (4.x did); HuBERT base normalises inside each layer, so both agree there.
    """

    indexes: tuple[int, ...] = (-1,)

    def __post_init__(self):
        if not self.indexes:
            raise ValueError("choose at least one hidden_states index")


@dataclass
class HubertFeatureModel:
    model: torch.nn.Module
    do_normalize: bool  # zero-mean unit-variance per utterance, as the checkpoint's feature extractor says
    source: str
    untrained_dryrun: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def resolve(self, layers: HubertLayers) -> list[int]:
        n = self.num_layers + 1  # hidden_states holds the encoder input plus every layer's output
        out = []
        for i in layers.indexes:
            if not -n <= i < n:
                raise ValueError(f"hidden_states index {i} out of range for {self.num_layers} layers")
            out.append(i % n)
        return out

    @contextmanager
    def utterance_front_end_norm(self, audio: np.ndarray, device: torch.device):
        """While active, a GroupNorm front end (HuBERT base) uses statistics of the WHOLE `audio`.

        HuBERT base normalises its first conv layer over time; run on a chunk it would use the chunk's
        statistics instead. With this, chunked conv features equal the unchunked ones exactly; front ends
        with per-frame LayerNorm (HuBERT large) need nothing and are left as they are.
        """
        layer0 = self.model.feature_extractor.conv_layers[0]
        norm = getattr(layer0, "layer_norm", None)
        if not isinstance(norm, nn.GroupNorm):
            yield
            return
        mean, var = _front_end_group_stats(layer0, audio, device)
        layer0.layer_norm = _FixedGroupNorm(norm, mean, var)
        try:
            yield
        finally:
            layer0.layer_norm = norm

    @torch.inference_mode()
    def hidden_states(self, audio: np.ndarray, layers: HubertLayers, device: torch.device,
                      bf16: bool = True) -> np.ndarray:
        """audio float32 [L] (already normalised if needed) -> [num_features(L), D] float32, mean of the chosen layers;
        a batch of equal-length pieces [N, L] -> [N, num_features(L), D] (no padding, so no attention mask: each
        piece is computed as it would be alone). On CUDA under bf16 autocast unless `bf16=False` (precision.py).

        The last index always reads `last_hidden_state` (see HubertLayers), whatever this transformers version puts
        in `hidden_states[-1]`.
        """
        idx = self.resolve(layers)
        x = torch.from_numpy(np.ascontiguousarray(audio, np.float32)).to(device)
        single = x.ndim == 1
        with extractor_autocast(device, bf16):
            out = self.model(x[None] if single else x, output_hidden_states=True, return_dict=True)
        hs = list(out.hidden_states)
        if len(hs) != self.num_layers + 1:
            raise RuntimeError(f"expected {self.num_layers + 1} hidden states, got {len(hs)}")
        hs[self.num_layers] = out.last_hidden_state  # after the encoder's final LayerNorm (HuBERT large)
        stacked = torch.stack([hs[i].float() for i in idx]).mean(0)  # [N, F, D]
        return stacked[0].cpu().numpy() if single else stacked.cpu().numpy()


class _FixedGroupNorm(nn.Module):
    """GroupNorm whose statistics were computed beforehand over the whole utterance."""

    def __init__(self, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.norm, self.mean, self.var = norm, mean, var  # mean/var [C] per channel (group stats broadcast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, n]
        y = (x - self.mean[None, :, None]) / torch.sqrt(self.var[None, :, None] + self.norm.eps)
        if self.norm.affine:
            y = y * self.norm.weight[None, :, None] + self.norm.bias[None, :, None]
        return y


@torch.inference_mode()
def _front_end_group_stats(layer0: nn.Module, audio: np.ndarray, device: torch.device, block: int = 32_000):
    """Per-channel mean/var of the first conv's output over the whole audio, computed in bounded blocks."""
    conv, norm = layer0.conv, layer0.layer_norm
    k, s = conv.kernel_size[0], conv.stride[0]
    n_out = (len(audio) - k) // s + 1
    C, G = conv.out_channels, norm.num_groups
    total = torch.zeros(C, dtype=torch.float64, device=device)
    total_sq = torch.zeros(C, dtype=torch.float64, device=device)
    for a in range(0, n_out, block):
        b = min(a + block, n_out)
        seg = torch.from_numpy(np.ascontiguousarray(audio[a * s: (b - 1) * s + k], np.float32)).to(device)
        y = conv(seg[None, None]).double()[0]  # [C, b - a]
        total += y.sum(-1)
        total_sq += (y * y).sum(-1)
    per_group = lambda v: v.reshape(G, C // G).sum(-1).repeat_interleave(C // G)  # noqa: E731
    count = n_out * (C // G)
    mean = per_group(total) / count
    var = per_group(total_sq) / count - mean * mean
    return mean.float(), var.clamp_min(0).float()


def _preprocessor_normalises(path: Path | None) -> bool:
    if path is None:
        return False
    cfg = path / "preprocessor_config.json"
    if not cfg.is_file():
        return False
    return bool(json.loads(cfg.read_text()).get("do_normalize", False))


def load_hubert(name_or_dir: str | Path, device: str | torch.device = "cpu") -> HubertFeatureModel:
    """HubertModel from a local `save_pretrained` directory, or a repo id already in the HF cache.

    local_files_only=True: a missing model raises WeightsError naming what was looked for; nothing is fetched.
    """
    from transformers import HubertModel

    local = Path(name_or_dir)
    is_dir = local.is_dir()
    if not is_dir and (local.is_absolute() or str(name_or_dir).startswith(".")):
        raise WeightsError(f"HuBERT directory not found: {local}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would cut into the pipeline's own
    try:
        model, info = HubertModel.from_pretrained(str(name_or_dir), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        where = f"directory {local}" if is_dir else f"'{name_or_dir}' in the Hugging Face cache"
        raise WeightsError(f"cannot load HuBERT from {where} (local_files_only, nothing downloaded): {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # strict: a key missing from the file would be initialised at random and every feature silently wrong
    check_loading_info(info, str(name_or_dir), "HubertModel", allowed_unexpected=CTC_HEAD_PREFIXES)
    model = model.to(device).eval()
    pre_dir = local if is_dir else _cached_snapshot(str(name_or_dir))
    dryrun = is_dir and (local / HF_DRYRUN_MARKER).is_file()
    return HubertFeatureModel(model=model, do_normalize=_preprocessor_normalises(pre_dir), source=str(name_or_dir),
                              untrained_dryrun=dryrun)


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None
