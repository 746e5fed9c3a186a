"""Video-DiT weights from video-only pretraining into a full DualForce (the program's pretrain -> joint hand-over).

A video-only DualForce (config.video_only) holds exactly the video DiT: patch embedding, timestep embedding, the
blocks' self-attention / FFN / modulation tables, and the head. The full model has all of these under the same
names, plus the new modules (audio path in every block, audio AdaLN, struct stream, bridge) whose output gates start
at zero. Copying the former and leaving the latter at their initialisation makes the full model at step 0 compute
the pretrained video velocity exactly, whatever the audio and struct inputs are.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn


class WeightTransferError(ValueError):
    """Pretrained weights that do not fit the model they are loaded into."""


def load_video_dit(model: nn.Module, pretrained: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of a video-only model's state dict into `model`; returns the names copied.

    Every pretrained name must exist in `model` with the same shape (a different width, depth or patch size is an
    error; the message counts every problem and names the first 8 of each kind): a silently partial copy would
    start joint training from a model nobody pretrained.
    """
    own = model.state_dict()
    missing = sorted(k for k in pretrained if k not in own)
    mismatched = sorted(f"{k}: pretrained {tuple(pretrained[k].shape)}, model {tuple(own[k].shape)}"
                        for k in pretrained if k in own and own[k].shape != pretrained[k].shape)
    if missing or mismatched:
        problems = [f"{len(missing)} not in the model: {', '.join(missing[:8])}"] if missing else []
        if mismatched:
            problems.append(f"{len(mismatched)} differ in shape: {', '.join(mismatched[:8])}")
        raise WeightTransferError("pretrained video-DiT weights do not fit: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in pretrained.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return sorted(pretrained)
