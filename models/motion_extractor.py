"""LivePortrait's motion extractor: a ConvNeXt-V2 backbone with pose/expression heads (step 3).

Module and parameter names follow LivePortrait's released `motion_extractor.pth` (keys `detector.*`), so the
official file loads strictly into `MotionExtractor`. Architecture facts (checked in KwaiVGI/LivePortrait,
src/modules/convnextv2.py, motion_extractor.py, util.py, utils/camera.py): ConvNeXt-V2 tiny, GRN blocks, stem
conv 4x4/4 + channels-first LayerNorm, downsampling LayerNorm + conv 2x2/2, global average pool + LayerNorm,
heads fc_kp/fc_exp (3 * 21), fc_pitch/fc_yaw/fc_roll (66 bins), fc_t (3), fc_scale (1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.weights import MOTION_DRYRUN_MARKER, MOTION_EXTRACTOR_RELPATH, WeightsError, check_state_dict

INPUT_SIZE = 256  # LivePortrait feeds the motion extractor 256x256 RGB in [0, 1]
NUM_BINS = 66
BIN_DEGREES = 3.0
BIN_OFFSET = 97.5  # degrees = softmax(bins) . [0..65] * 3 - 97.5  -> range [-97.5, 97.5]


@dataclass(frozen=True)
class MotionExtractorConfig:
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    num_kp: int = 21
    num_bins: int = NUM_BINS
    in_chans: int = 3

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"ConvNeXt-V2 needs 4 stages, got depths={self.depths} dims={self.dims}")


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [N, C, H, W] (parameters `weight`, `bias` as upstream)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """Global Response Normalisation on channels-last [N, H, W, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # [N, 1, 1, C]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        y = self.dwconv(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2Detector(nn.Module):
    """The `detector` submodule: backbone + raw heads (bins/logits, not yet degrees)."""

    def __init__(self, cfg: MotionExtractorConfig):
        super().__init__()
        d = cfg.dims
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(cfg.in_chans, d[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(d[0]))]
            + [
                nn.Sequential(ChannelsFirstLayerNorm(d[i]), nn.Conv2d(d[i], d[i + 1], kernel_size=2, stride=2))
                for i in range(3)
            ]
        )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[ConvNeXtV2Block(d[i]) for _ in range(cfg.depths[i])]) for i in range(4)]
        )
        self.norm = nn.LayerNorm(d[-1], eps=1e-6)
        self.fc_kp = nn.Linear(d[-1], 3 * cfg.num_kp)
        self.fc_scale = nn.Linear(d[-1], 1)
        self.fc_pitch = nn.Linear(d[-1], cfg.num_bins)
        self.fc_yaw = nn.Linear(d[-1], cfg.num_bins)
        self.fc_roll = nn.Linear(d[-1], cfg.num_bins)
        self.fc_t = nn.Linear(d[-1], 3)
        self.fc_exp = nn.Linear(d[-1], 3 * cfg.num_kp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # x [N, 3, 256, 256] in [0, 1]
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        feat = self.norm(x.mean(dim=(-2, -1)))  # [N, C]
        return {
            "kp": self.fc_kp(feat),
            "exp": self.fc_exp(feat),
            "pitch": self.fc_pitch(feat),
            "yaw": self.fc_yaw(feat),
            "roll": self.fc_roll(feat),
            "t": self.fc_t(feat),
            "scale": self.fc_scale(feat),
        }


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """[N, 66] bin logits -> [N] degrees (LivePortrait's expectation over 3-degree bins, offset 97.5)."""
    idx = torch.arange(logits.shape[-1], dtype=torch.float32, device=logits.device)
    return (F.softmax(logits.float(), dim=-1) * idx).sum(-1) * BIN_DEGREES - BIN_OFFSET


class MotionExtractor(nn.Module):
    """Wrapper whose state dict matches the released file (`detector.` prefix)."""

    def __init__(self, cfg: MotionExtractorConfig | None = None, untrained_dryrun: bool = False):
        super().__init__()
        self.cfg = cfg or MotionExtractorConfig()
        self.detector = ConvNeXtV2Detector(self.cfg)
        self.untrained_dryrun = untrained_dryrun

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [N, 3, 256, 256] RGB in [0, 1] -> kp/exp [N, K, 3], pitch/yaw/roll [N] degrees, t [N, 3], scale [N, 1]."""
        raw = self.detector(x)
        n = x.shape[0]
        return {
            "kp": raw["kp"].float().reshape(n, -1, 3),
            "exp": raw["exp"].float().reshape(n, -1, 3),
            "pitch": bins_to_degrees(raw["pitch"]),
            "yaw": bins_to_degrees(raw["yaw"]),
            "roll": bins_to_degrees(raw["roll"]),
            "t": raw["t"].float(),
            "scale": raw["scale"].float(),
        }


def load_motion_extractor(
    weights_root: str | Path,
    cfg: MotionExtractorConfig | None = None,
    map_location: str | torch.device = "cpu",
    untrained_dryrun: bool = False,
) -> MotionExtractor:
    """Build the extractor and load `<root>/pretrained_weights/liveportrait/base_models/motion_extractor.pth` strictly.

    `weights_root` is the LivePortrait checkout (or any directory holding its `pretrained_weights/` tree);
    a path that already ends in `motion_extractor.pth` is taken as the file itself. A dry-run file carries a
    `motion_extractor.dryrun.json` beside it (reduced dims, `untrained_dryrun`), which this loader honours.
    """
    root = Path(weights_root)
    path = root if root.suffix == ".pth" else root / MOTION_EXTRACTOR_RELPATH
    if not path.is_file():
        raise WeightsError(
            f"LivePortrait motion extractor weights not found: expected {path} "
            f"(give the directory that holds {MOTION_EXTRACTOR_RELPATH})"
        )
    marker = path.with_name(MOTION_DRYRUN_MARKER)
    if marker.is_file():  # a dry-run file written by models/dryrun_models.py: its reduced config and flag
        info = json.loads(marker.read_text())
        untrained_dryrun = bool(info.get("untrained_dryrun", True))
        if cfg is None:
            cfg = MotionExtractorConfig(depths=tuple(info["depths"]), dims=tuple(info["dims"]),
                                        num_kp=int(info.get("num_kp", 21)))
    model = MotionExtractor(cfg, untrained_dryrun=untrained_dryrun)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects beyond tensors, ...
        raise WeightsError(f"cannot read {path} as a plain state dict: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (got {type(state).__name__})")
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()


def rotation_matrix(pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Degrees [N] -> R [N, 3, 3] = (Rz(roll) @ Ry(yaw) @ Rx(pitch))^T, LivePortrait's row-vector convention."""
    x, y, z = (torch.deg2rad(a.float()) for a in (pitch, yaw, roll))
    o, i = torch.zeros_like(x), torch.ones_like(x)
    rx = torch.stack([i, o, o, o, x.cos(), -x.sin(), o, x.sin(), x.cos()], -1).reshape(-1, 3, 3)
    ry = torch.stack([y.cos(), o, y.sin(), o, i, o, -y.sin(), o, y.cos()], -1).reshape(-1, 3, 3)
    rz = torch.stack([z.cos(), -z.sin(), o, z.sin(), z.cos(), o, o, o, i], -1).reshape(-1, 3, 3)
    return (rz @ ry @ rx).transpose(1, 2)


def drive_keypoints(kp: torch.Tensor, R: torch.Tensor, exp: torch.Tensor, scale: torch.Tensor, t: torch.Tensor):
    """LivePortrait Eq. 2: scale * (kp @ R + exp) + t, with t applied to x and y only (as upstream does)."""
    out = (kp @ R + exp) * scale[..., None]  # [N, K, 3]
    return torch.cat([out[..., :2] + t[:, None, :2], out[..., 2:]], dim=-1)
