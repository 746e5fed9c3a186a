"""Reading a user-given weights file (safetensors, or a tensors-only torch file) and loading it strictly.

Shared by the evaluation networks (SyncNet, I3D, the FID Inception), whose public weights come as either
format. A torch file is read with `weights_only=True`: a weights file never runs code.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.weights import WeightsError, check_state_dict

# BatchNorm's batch counter: files saved before PyTorch 0.4.1 (syncnet_python's, pytorch-i3d's) lack it, and
# it does nothing in eval mode, so its absence alone is not a misfit.
_BATCH_COUNTER = ".num_batches_tracked"


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of `path` by name; WeightsError when absent, unreadable or not a flat dict of tensors.

    A torch file whose dict nests the weights under "state_dict" or "model" is unwrapped (common checkpoint layouts).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects beyond tensors, ...
        raise WeightsError(f"cannot read {path} as {what} weights (safetensors or a tensors-only torch file): {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a flat state dict of tensors (got {type(state).__name__})")
    return state


def load_strictly(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    """Load `path` into `model` with every key and shape checked (WeightsError lists all misfits); eval mode."""
    state = read_state_dict(path, what)
    own = model.state_dict()
    for key in own:
        if key.endswith(_BATCH_COUNTER) and key not in state:
            state[key] = own[key]
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()
