"""SyncNet (Chung & Zisserman 2016), the network behind the LSE-C / LSE-D lip-sync scores.

Layer for layer the `S` model of joonson/syncnet_python (SyncNetModel.py), which Wav2Lip's evaluation
(evaluation/scores_LSE) also runs, with its module names (netcnnaud, netfcaud, netcnnlip, netfclip), so the public
`syncnet_v2.model` state dict loads strictly. Its inputs, as syncnet_python feeds them:
  audio  [N, 1, 13, 20]       13 MFCCs x 20 steps of 10 ms = 0.2 s (python_speech_features defaults, int16 scale)
  video  [N, 3, 5, 224, 224]  5 consecutive 224x224 face frames, BGR (cv2.imread order), values 0..255 unnormalised
Note: the public video stream takes 5 colour frames (Conv3d over 3 channels, kernel depth 5), not grayscale mouth
crops as in the paper's first version; this file follows the released weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from models.weight_files import load_strictly

VIDEO_SIZE = 224  # the video stream's spatial input (its last conv reduces 6x6 to 1x1 only at this size)
WINDOW_FRAMES = 5  # video frames per window (0.2 s at 25 fps)
MFCC_STEPS = 20  # MFCC frames per window (10 ms hop)
MFCC_PER_VIDEO_FRAME = 4  # 100 MFCC frames/s over 25 video frames/s


@dataclass(frozen=True)
class SyncNetConfig:
    embedding_dim: int = 1024  # syncnet_python's num_layers_in_fc_layers


def _conv_bn_relu(conv: nn.Module, bn: nn.Module) -> list[nn.Module]:
    return [conv, bn, nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """Two streams into one embedding space; distance between an audio and a video embedding = out of sync."""

    def __init__(self, cfg: SyncNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or SyncNetConfig()
        d = self.cfg.embedding_dim
        # Sequential indices must match syncnet_python's (its pooling layers sit between the convs).
        self.netcnnaud = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d(1, 64, 3, 1, 1), nn.BatchNorm2d(64)),
            nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
            *_conv_bn_relu(nn.Conv2d(64, 192, 3, 1, 1), nn.BatchNorm2d(192)),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
            *_conv_bn_relu(nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384)),
            *_conv_bn_relu(nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256)),
            *_conv_bn_relu(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256)),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            *_conv_bn_relu(nn.Conv2d(256, 512, kernel_size=(5, 4), padding=0), nn.BatchNorm2d(512)),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, d))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, d))
        self.netcnnlip = nn.Sequential(
            *_conv_bn_relu(nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0), nn.BatchNorm3d(96)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv_bn_relu(nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv_bn_relu(nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv_bn_relu(nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv_bn_relu(nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv_bn_relu(nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0), nn.BatchNorm3d(512)),
        )

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """mfcc [N, 1, 13, 20] -> [N, D]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))  # conv out [N, 512, 1, 1]

    def forward_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, 3, 5, 224, 224] BGR 0..255 -> [N, D]."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))  # conv out [N, 512, 1, 1, 1]


def load_syncnet(path: str | Path, cfg: SyncNetConfig | None = None) -> SyncNet:
    """SyncNet with the weights of `path` (syncnet_python's `syncnet_v2.model` or a safetensors copy), strictly."""
    return load_strictly(SyncNet(cfg), path, "SyncNet")
