"""DeepSpeed checkpoints read back without running pickled code.

DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`: a checkpoint directory is a
trust boundary (copied between clusters, shared buckets), and with it any `.pt` file in a tag could run code
on `./run train` at resume. `WeightsOnlyCheckpointEngine` keeps DeepSpeed's save path byte for byte and loads
with `weights_only=True`, which only rebuilds tensors, containers, numbers and strings, plus the classes in
`ALLOWED_GLOBALS`: what DeepSpeed itself writes into ZeRO-1/2/3 optimizer states (found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on our own checkpoints). Each is rebuilt by the
weights-only unpickler as `cls.__new__(cls)` plus an attribute update (or an Enum value lookup); none of
their `__init__`, `__reduce__` or any other callable runs, so they carry data, not code.

Anything else (a planted `__reduce__`, `os.system`, `builtins.exec`, an unknown class) is refused with
`UnsafeCheckpoint` naming the file and the global, before anything in it is used.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What each one is, and why rebuilding it is safe:
ALLOWED_GLOBALS = (
    ZeroStageEnum,  # int Enum (0-3) in every ZeRO optimizer state: rebuilt by value lookup
    LossScaler,  # static loss scale (cur_scale, dynamic): plain attributes, no __setstate__
    DynamicLossScaler,  # fp16 dynamic loss scale (scale, window, counters): plain attributes, no __setstate__
    fragment_address,  # dataclass (numel, start) of ZeRO-1/2 param_slice_mappings: two ints
)


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds something a weights-only load may not rebuild; nothing in it was used."""


def load_weights_only(path: str | Path, map_location=None):
    """torch.load with weights_only=True and our allow-list; refusals become UnsafeCheckpoint."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it holds an object a weights-only load does not rebuild ({first}). "
            f"Checkpoints may hold tensors, containers, numbers, strings and "
            f"{', '.join(c.__module__ + '.' + c.__qualname__ for c in ALLOWED_GLOBALS)}; "
            f"this file was not written by our trainer or was altered since") from None


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `load_weights_only` (saving is unchanged)."""

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)


def install(engine) -> None:
    """Replace a DeepSpeedEngine's checkpoint engine (created at initialize) with the weights-only one."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # a fast/decoupled/datastates writer: its own load path
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}: only the torch "
                           f"engine is supported (no checkpoint.writer / datastates in the DeepSpeed config)")
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # same name and serialization settings; no second init log line
    engine.checkpoint_engine = safe
