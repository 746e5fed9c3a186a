"""Exponential moving average of the trained weights (fp32), on the tensors each rank owns.

With ZeRO-3 a rank owns only its partition of each parameter (`param.ds_tensor`), so the EMA is kept per
partition and saved per rank; with ZeRO <= 2 every rank holds full parameters.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _local(param: nn.Parameter) -> torch.Tensor:
    """The elements this rank owns: its ZeRO-3 partition less the padding DeepSpeed appends to the last one.

    The padding is never written (it held uninitialised memory: the EMA norm of two identical zero3 runs
    differed by 1.6e-6 relative from step 1 until it was excluded).
    """
    if not hasattr(param, "ds_tensor"):
        return param.data
    partition = param.ds_tensor  # [partition_numel], flat
    start = partition.numel() * dist.get_rank(group=getattr(param, "ds_process_group", None))
    return partition.narrow(0, 0, max(0, min(partition.numel(), param.ds_numel - start)))


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(_local(param).detach().float(), 1.0 - self.decay)

    def sum_of_squares(self) -> float:
        return float(sum(float(t.double().pow(2).sum()) for t in self.shadow.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for name, tensor in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(tensor)
