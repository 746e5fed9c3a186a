"""Command lines and environment for running the trainer as N processes (torchrun or DeepSpeed's launcher)."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, get_args

import torch

from training.hostfile import HostSlots, read_hostfile

REPO_ROOT = Path(__file__).resolve().parents[1]


# the choices, as the types flow parameters are declared with (the Prefect UI validates them) and as tuples
Launcher = Literal["torchrun", "deepspeed"]
RdzvBackend = Literal["static", "c10d"]
DsLauncher = Literal["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"]
LAUNCHERS = get_args(Launcher)
TORCHRUN_RDZV_BACKENDS = get_args(RdzvBackend)
DEEPSPEED_MULTINODE_LAUNCHERS = get_args(DsLauncher)


def _launch_field(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class LaunchSpec:
    """Where the trainer processes run. One node: nproc_per_node processes here. Many nodes, two ways:

    torchrun: every node runs its own launcher (one flow run per node, e.g. srun); they meet at a rendezvous
      on master_addr:master_port. rdzv_backend "static": ranks follow node_rank (0..nnodes-1, 0 hosts the
      store); "c10d": torch's dynamic rendezvous, node ranks are assigned on arrival and node_rank is unused.
    deepspeed: the hostfile lists the nodes (`host slots=N`). By default node 0 alone runs the launcher and
      starts the others over ds_launcher (pdsh/ssh); with no_ssh every node runs its own launcher with its
      node_rank (one flow run per node), the way torchrun does.
    Values are checked here; check_launch() also reads the hostfile.
    """

    # Declared once: the train flow takes a LaunchSpec and `dualforce train` makes one flag per field from the
    # `help` (and `flag`, `min`) of its metadata (flows/train.py add_launch_arguments).
    nproc_per_node: int = _launch_field(2, "trainer processes per node", min=1)
    launcher: Launcher = _launch_field("torchrun", "torchrun, or DeepSpeed's launcher")
    nnodes: int = _launch_field(1, "nodes in the job", min=1)
    node_rank: int = _launch_field(0, "this node, 0..nnodes-1 (e.g. $SLURM_NODEID)", min=0)
    master_addr: Optional[str] = _launch_field(None, "rendezvous host: node 0 (e.g. first host of $SLURM_JOB_NODELIST)")
    master_port: int = _launch_field(29500, "rendezvous port", min=1)
    hostfile: Optional[str] = _launch_field(None, "deepspeed launcher: 'HOST slots=N' per node")
    rdzv_backend: RdzvBackend = _launch_field("static", "torchrun, many nodes: static node ranks or c10d's")
    rdzv_id: str = _launch_field("dualforce", "torchrun c10d: one id per job (e.g. $SLURM_JOB_ID)")
    rdzv_timeout_s: Optional[int] = _launch_field(None, "torchrun c10d: seconds to wait for all nodes (torch: 600)",
                                                  min=1, flag="--rdzv-timeout")
    no_ssh: bool = _launch_field(False, "deepspeed: one launcher per node, no pdsh/ssh")
    ds_launcher: DsLauncher = _launch_field("pdsh", "deepspeed over ssh: how node 0 reaches the others")

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be torchrun or deepspeed, got {self.launcher!r}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}")
        if self.master_addr is not None and (not self.master_addr.strip() or any(c.isspace() for c in self.master_addr)):
            raise ValueError(f"master_addr must be a host name or address, got {self.master_addr!r}")
        if self.launcher == "torchrun":
            self._check_torchrun()
        else:
            self._check_deepspeed()

    def _check_torchrun(self) -> None:
        if self.hostfile is not None:
            raise ValueError("hostfile is read by the deepspeed launcher only; torchrun takes nnodes + master_addr")
        if self.no_ssh:
            raise ValueError("no_ssh applies to the deepspeed launcher only (torchrun always runs one launcher per node)")
        if self.rdzv_backend not in TORCHRUN_RDZV_BACKENDS:
            raise ValueError(f"rdzv_backend must be one of {TORCHRUN_RDZV_BACKENDS}, got {self.rdzv_backend!r}")
        if self.nnodes > 1 and self.master_addr is None:
            raise ValueError(
                f"nnodes={self.nnodes} needs master_addr: the host every node meets at (node 0 / the rendezvous host)"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.rdzv_id):
            raise ValueError(f"rdzv_id must be letters, digits, '_', '.', '-', got {self.rdzv_id!r}")
        if self.rdzv_timeout_s is not None and self.rdzv_timeout_s < 1:
            raise ValueError(f"rdzv_timeout_s must be >= 1, got {self.rdzv_timeout_s}")

    def _check_deepspeed(self) -> None:
        if self.nnodes > 1 and self.hostfile is None:
            raise ValueError(
                f"the deepspeed launcher on nnodes={self.nnodes} needs a hostfile ('HOST slots=N' per node)"
            )
        if self.no_ssh:
            if self.hostfile is None:
                raise ValueError("no_ssh needs a hostfile: it maps node_rank to a host and its slots")
            if self.master_addr is None:
                raise ValueError("no_ssh needs master_addr: without ssh DeepSpeed cannot look up node 0's address")
        elif self.nnodes > 1 and self.node_rank != 0:
            raise ValueError(
                f"node_rank={self.node_rank}: with the deepspeed launcher over {self.ds_launcher} only node 0 runs "
                "the launcher (it starts the others); run the flow on node 0 only, or set no_ssh for one launcher per node"
            )
        if self.ds_launcher not in DEEPSPEED_MULTINODE_LAUNCHERS:
            raise ValueError(f"ds_launcher must be one of {DEEPSPEED_MULTINODE_LAUNCHERS}, got {self.ds_launcher!r}")

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def command(spec: LaunchSpec, config_path: str | Path, rdzv_suffix: str = "") -> list[str]:
    """Argument list (no shell) that starts this node's trainer processes (or, deepspeed over ssh, every node's).

    Pure: reads no files (check_launch() validates the hostfile). rdzv_suffix is appended to the c10d
    rendezvous id so that successive attempts of one job never join an earlier attempt's rendezvous.
    """
    entry = ["--config", str(config_path)]
    if spec.launcher == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}"]
        if spec.nnodes == 1 and spec.master_addr is None:
            args.append("--standalone")  # picks a free port
        elif spec.rdzv_backend == "c10d":
            args += [
                f"--nnodes={spec.nnodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={_endpoint(spec.master_addr, spec.master_port)}",
                f"--rdzv-id={spec.rdzv_id}{rdzv_suffix}",
            ]
            if spec.rdzv_timeout_s is not None:
                args.append(f"--rdzv-conf=join_timeout={spec.rdzv_timeout_s}")
        else:
            args += [
                f"--nnodes={spec.nnodes}",
                f"--node_rank={spec.node_rank}",
                f"--master_addr={spec.master_addr}",
                f"--master_port={spec.master_port}",
            ]
        return args + ["-m", "training.train", *entry]
    args = [sys.executable, "-m", "deepspeed.launcher.runner", f"--master_port={spec.master_port}"]
    if spec.hostfile is None:
        args.append(f"--num_gpus={spec.nproc_per_node}")  # alias --num_accelerators: processes per node
        if spec.master_addr is not None:
            args.append(f"--master_addr={spec.master_addr}")
        return args + ["--module", "training.train", *entry]
    args += [f"--hostfile={spec.hostfile}", f"--num_nodes={spec.nnodes}", f"--num_gpus={spec.nproc_per_node}"]
    if spec.master_addr is not None:
        args.append(f"--master_addr={spec.master_addr}")
    if spec.no_ssh:
        args += ["--no_ssh", f"--node_rank={spec.node_rank}"]
    elif spec.nnodes == 1:
        args.append("--no_ssh_check")  # one host: DeepSpeed launches locally, no ssh needed
        if spec.master_addr is None:
            args.append("--master_addr=127.0.0.1")
    else:
        args.append(f"--launcher={spec.ds_launcher}")
    return args + ["--module", "training.train", *entry]


@dataclass(frozen=True)
class LaunchPlan:
    spec: LaunchSpec
    world_size: int  # trainer processes over all nodes
    hosts: tuple[HostSlots, ...] = ()  # deepspeed: the hostfile's nodes that take part

    @property
    def waits_for_peers(self) -> bool:
        """Other nodes' processes write to the shared run directory too (one launcher per node)."""
        return self.spec.multi_node and (self.spec.launcher == "torchrun" or self.spec.no_ssh)


def check_launch(spec: LaunchSpec) -> LaunchPlan:
    """Validate what LaunchSpec cannot check alone (the hostfile against nnodes and nproc_per_node)."""
    if spec.hostfile is None:
        world = spec.nnodes * spec.nproc_per_node
        return LaunchPlan(spec, world)
    hosts = read_hostfile(spec.hostfile)
    if spec.nnodes > len(hosts):
        raise ValueError(
            f"nnodes={spec.nnodes} but hostfile {spec.hostfile} lists {len(hosts)} host(s): "
            + ", ".join(h.host for h in hosts)
        )
    used = hosts[: spec.nnodes]  # DeepSpeed takes the first nnodes hosts
    short = [h for h in used if h.slots < spec.nproc_per_node]
    if short:
        raise ValueError(
            f"nproc_per_node={spec.nproc_per_node} but hostfile {spec.hostfile} gives "
            + ", ".join(f"{h.host} slots={h.slots}" for h in short)
            + " (DeepSpeed would quietly start fewer processes there)"
        )
    return LaunchPlan(spec, spec.nnodes * spec.nproc_per_node, tuple(used))


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags: DeepSpeed builds its ops with -march=native."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return f"{platform.machine()}|{platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    return "|".join(dict.fromkeys(ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() in wanted))


def extensions_dir(prefix: str = sys.prefix, cpu: Optional[str] = None) -> Path:
    """Where DeepSpeed's JIT-built ops (the CPU shm comm op, ~30-50 s to build) are cached: one folder per
    Python environment, torch version and CPU type, so two virtualenvs sharing a home directory (a cluster's
    shared home, a fresh clone beside a checkout) keep their builds instead of rebuilding each other's, and a
    node never loads an op built with -march=native for another CPU."""
    signature = f"{prefix}|{torch.__version__}|{_cpu_signature() if cpu is None else cpu}"
    return Path.home() / ".cache" / "dualforce" / "torch_extensions" / hashlib.sha256(signature.encode()).hexdigest()[:12]


def environment(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The launching process's environment plus what the trainer needs on this hardware (STACK.md)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")  # 3.5x faster on CPU; the deepspeed launcher does not set it
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
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
