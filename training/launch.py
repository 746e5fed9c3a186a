"""Command lines and environment for running the trainer as N processes (torchrun or DeepSpeed's launcher)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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


@dataclass(frozen=True)
class ProcessResult:
    returncode: int
    tail: list[str]  # last lines of the combined stdout/stderr
    timed_out: bool = False


def run_streaming(
    args: list[str],
    on_line: Callable[[str], None],
    env: Optional[dict[str, str]] = None,
    cwd: Path = REPO_ROOT,
    timeout_s: Optional[float] = None,
    tail_lines: int = 60,
) -> ProcessResult:
    """Run `args` (no shell) in its own process group, hand every output line to on_line, keep the tail.

    On timeout (or if the caller is interrupted) the whole group is killed, so no trainer process outlives it.
    """
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=tail_lines)
    timed_out = threading.Event()

    def kill_group() -> None:
        if proc.poll() is None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill_group) if timeout_s else None
    if timer:
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        returncode = proc.wait()
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
    return ProcessResult(returncode, list(tail), timed_out.is_set())
