"""Inflated Inception-v1 (I3D, Carreira & Zisserman 2017): the Kinetics-400 video classifier FVD is measured with.

Module names and layer shapes follow the public PyTorch port (piergiaj/pytorch-i3d, pytorch_i3d.py: Unit3D with
`conv3d` + `bn`, InceptionModule branches b0, b1a, b1b, b2a, b2b, b3b, endpoints Conv3d_1a_7x7 ... Mixed_5c,
`logits`), so its `rgb_imagenet.pt` (Kinetics-400, 400 classes) loads strictly. As there, every convolution and
max-pool pads TensorFlow-style 'same' at run time, BatchNorm has eps 1e-3, and input is RGB in [-1, 1].

FVD's features are the 400 class logits before the softmax (Unterthiner et al. 2018). The port averages the last
feature map with a fixed 2x7x7 pool, which covers all of it for the standard 16x224x224 input; `logits_features`
averages over the whole map instead: the same numbers at that size, and defined for smaller test inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.weight_files import load_strictly

INPUT_SIZE = 224
CLIP_FRAMES = 16


@dataclass(frozen=True)
class I3DConfig:
    num_classes: int = 400  # Kinetics-400
    in_channels: int = 3


def _same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad argument (last axis first) for TensorFlow 'same' padding of a [B, C, T, H, W] input."""
    pads = []
    for s, k, st in zip(size, kernel, stride):
        total = max(k - (st if s % st == 0 else s % st), 0)
        pads.append((total // 2, total - total // 2))
    return tuple(p for pair in reversed(pads) for p in pair)


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        x = F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride))  # zeros: inputs are post-ReLU
        return F.max_pool3d(x, self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d ('same' padding, no bias) + BatchNorm + ReLU; the logits unit has a bias and neither of the others."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), norm_act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.norm_act = kernel, stride, norm_act
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=not norm_act)
        if norm_act:
            self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride)))
        return F.relu(self.bn(x)) if self.norm_act else x


class InceptionModule(nn.Module):
    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a = Unit3D(cin, c[1])
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a = Unit3D(cin, c[3])
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, c[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (endpoint, in channels, branch widths b0, b1a, b1b, b2a, b2b, b3b), in the order of the forward pass
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
FEATURE_DIM = 1024  # Mixed_5c output channels


class InceptionI3d(nn.Module):
    def __init__(self, cfg: I3DConfig | None = None):
        super().__init__()
        self.cfg = cfg or I3DConfig()
        layers: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": Unit3D(self.cfg.in_channels, 64, (7, 7, 7), (2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)),
            "MaxPool3d_3a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
        }
        for name, (cin, widths) in _MIXED.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            layers[name] = InceptionModule(cin, widths)
        for name, layer in layers.items():
            self.add_module(name, layer)
        self._trunk = list(layers)
        self.logits = Unit3D(FEATURE_DIM, self.cfg.num_classes, norm_act=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, T, H, W] RGB in [-1, 1] -> Mixed_5c [B, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]."""
        for name in self._trunk:
            x = getattr(self, name)(x)
        return x

    def logits_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, T, H, W] -> [B, num_classes] logits of the whole-clip average (FVD's features)."""
        pooled = self.trunk(x).mean(dim=(2, 3, 4), keepdim=True)  # [B, 1024, 1, 1, 1]
        return self.logits(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_features(x)


def load_i3d(path: str | Path, cfg: I3DConfig | None = None) -> InceptionI3d:
    """I3D with the weights of `path` (pytorch-i3d's `rgb_imagenet.pt` or a safetensors copy), strictly."""
    return load_strictly(InceptionI3d(cfg), path, "I3D")
