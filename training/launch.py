"""Command lines and environment for running the trainer as N processes (torchrun or DeepSpeed's launcher)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LaunchSpec:
    nproc_per_node: int = 2
    launcher: str = "torchrun"  # "torchrun" | "deepspeed"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None  # multi-node: the rendezvous host
    master_port: int = 29500
    hostfile: Optional[str] = None  # deepspeed launcher, multi-node


def command(spec: LaunchSpec, config_path: str | Path) -> list[str]:
    """Argument list (no shell) that starts spec.nproc_per_node trainer processes on this node."""
    entry = ["--config", str(config_path)]
    if spec.launcher == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}"]
        if spec.nnodes == 1 and spec.master_addr is None:
            args.append("--standalone")  # picks a free port
        else:
            args += [
                f"--nnodes={spec.nnodes}",
                f"--node_rank={spec.node_rank}",
                f"--master_addr={spec.master_addr}",
                f"--master_port={spec.master_port}",
            ]
        return args + ["-m", "training.train", *entry]
    if spec.launcher == "deepspeed":
        args = [sys.executable, "-m", "deepspeed.launcher.runner", f"--master_port={spec.master_port}"]
        if spec.hostfile:
            args += [f"--hostfile={spec.hostfile}"]
        else:
            args += [f"--num_gpus={spec.nproc_per_node}"]  # alias --num_accelerators: processes per node
        return args + ["--module", "training.train", *entry]
    raise ValueError(f"launcher must be torchrun or deepspeed, got {spec.launcher!r}")


def environment(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The launching process's environment plus what the trainer needs on this hardware (STACK.md)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")  # 3.5x faster on CPU; the deepspeed launcher does not set it
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dualforce" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
