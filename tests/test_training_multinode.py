"""Training on many nodes: launcher argument lists, hostfile checks, and two "nodes" on this machine.

The two-node runs start one launcher per node (node_rank 0 and 1, nproc_per_node 1) meeting on 127.0.0.1 at a
free port, train the tiny model 3 ZeRO-2 steps, and must give the loss records of the same job run as two
processes on one node: multi-node changes where processes run, not what data-parallel training computes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from flows.train import train_flow  # noqa: E402
from tests.training_shards import WINDOW, train_config, write_shards  # noqa: E402
from training.hostfile import HostSlots, parse_hostfile, read_hostfile, write_hostfile  # noqa: E402
from training.launch import LaunchSpec, check_launch, command, environment  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.run_status import COMPLETED, read_statuses  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TAIL = ["-m", "training.train", "--config", "c.json"]
DS_TAIL = ["--module", "training.train", "--config", "c.json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- argument lists ---------------------------------------------------------------------------------


def test_torchrun_c10d_rendezvous_arguments():
    spec = LaunchSpec(nproc_per_node=8, nnodes=4, node_rank=2, master_addr="gpu-001", master_port=29400,
                      rdzv_backend="c10d", rdzv_id="job123", rdzv_timeout_s=900)
    assert command(spec, "c.json", rdzv_suffix="-run-b1") == [
        PY, "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-001:29400", "--rdzv-id=job123-run-b1", "--rdzv-conf=join_timeout=900", *TAIL,
    ]  # node_rank is not passed: c10d assigns node ranks on arrival
    ipv6 = LaunchSpec(nproc_per_node=1, nnodes=2, master_addr="fd00::1", rdzv_backend="c10d")
    assert "--rdzv-endpoint=[fd00::1]:29500" in command(ipv6, "c.json")


def test_torchrun_static_rendezvous_arguments():
    spec = LaunchSpec(nproc_per_node=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600)
    assert command(spec, "c.json") == [
        PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2", "--node_rank=1",
        "--master_addr=10.0.0.1", "--master_port=29600", *TAIL,
    ]


def test_deepspeed_hostfile_arguments_over_ssh_and_per_node():
    ssh = LaunchSpec(nproc_per_node=8, launcher="deepspeed", nnodes=2, hostfile="/job/hosts",
                     master_addr="gpu-001", master_port=29700)
    assert command(ssh, "c.json") == [
        PY, "-m", "deepspeed.launcher.runner", "--master_port=29700", "--hostfile=/job/hosts", "--num_nodes=2",
        "--num_gpus=8", "--master_addr=gpu-001", "--launcher=pdsh", *DS_TAIL,
    ]
    per_node = LaunchSpec(nproc_per_node=8, launcher="deepspeed", nnodes=2, node_rank=1, hostfile="/job/hosts",
                          master_addr="gpu-001", no_ssh=True)
    assert command(per_node, "c.json") == [
        PY, "-m", "deepspeed.launcher.runner", "--master_port=29500", "--hostfile=/job/hosts", "--num_nodes=2",
        "--num_gpus=8", "--master_addr=gpu-001", "--no_ssh", "--node_rank=1", *DS_TAIL,
    ]
    one = command(LaunchSpec(nproc_per_node=2, launcher="deepspeed", hostfile="/h"), "c.json")
    assert {"--num_nodes=1", "--no_ssh_check", "--master_addr=127.0.0.1"} <= set(one)  # local: no ssh at all
    assert "--launcher=pdsh" not in one


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nnodes=2, node_rank=2, master_addr="h"), r"node_rank must be in \[0, nnodes=2\), got 2"),
        (dict(nnodes=0), "nnodes must be >= 1, got 0"),
        (dict(nproc_per_node=0), "nproc_per_node must be >= 1"),
        (dict(nnodes=2), "nnodes=2 needs master_addr"),
        (dict(nnodes=2, master_addr="a b"), "master_addr must be a host name"),
        (dict(master_port=70000), "master_port must be in 1..65535, got 70000"),
        (dict(nnodes=2, master_addr="h", rdzv_backend="etcd"), "rdzv_backend must be one of"),
        (dict(nnodes=2, master_addr="h", rdzv_id="job 1"), "rdzv_id must be"),
        (dict(hostfile="/h"), "hostfile is read by the deepspeed launcher only"),
        (dict(launcher="deepspeed", nnodes=2), "deepspeed launcher on nnodes=2 needs a hostfile"),
        (dict(launcher="deepspeed", nnodes=2, node_rank=1, hostfile="/h"), "only node 0 runs the launcher"),
        (dict(launcher="deepspeed", nnodes=2, hostfile="/h", no_ssh=True), "no_ssh needs master_addr"),
        (dict(launcher="deepspeed", nnodes=2, hostfile="/h", ds_launcher="ssh"), "ds_launcher must be one of"),
        (dict(launcher="mpirun"), "launcher must be torchrun or deepspeed"),
    ],
)
def test_launch_spec_rejects_inconsistent_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LaunchSpec(**kwargs)


# ---- hostfiles --------------------------------------------------------------------------------------


def test_hostfile_parses_like_deepspeed(tmp_path):
    from deepspeed.launcher.runner import _parse_hostfile

    text = "# two nodes\nworker-0 slots=8\n\n  worker-1   slots=4  # smaller node\n"
    ours = parse_hostfile(text)
    assert ours == [HostSlots("worker-0", 8), HostSlots("worker-1", 4)]
    assert dict(_parse_hostfile(text.splitlines())) == {h.host: h.slots for h in ours}
    path = write_hostfile(ours, tmp_path / "hosts")
    assert path.read_text() == "worker-0 slots=8\nworker-1 slots=4\n" and read_hostfile(path) == ours


@pytest.mark.parametrize(
    "text, message",
    [
        ("worker-0 slots=8\nworker-1 8\n", r"line 2: expected 'HOST slots=N', got 'worker-1 8'"),
        ("worker-0 slots=8 extra\n", "line 1: expected 'HOST slots=N'"),  # DeepSpeed would accept this
        ("worker-0 slots=8\nworker-0 slots=8\n", "line 2: host 'worker-0' is listed twice \\(first on line 1\\)"),
        ("worker-0 slots=0\n", "host 'worker-0' has slots=0"),
        ("# nothing\n\n", "lists no hosts"),
    ],
)
def test_malformed_hostfiles_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_hostfile(text)


def test_check_launch_matches_nnodes_and_slots_to_the_hostfile(tmp_path):
    missing = LaunchSpec(launcher="deepspeed", nnodes=2, hostfile=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="hostfile .*nope does not exist"):
        check_launch(missing)
    hosts = write_hostfile([HostSlots("a", 2), HostSlots("b", 1), HostSlots("c", 2)], tmp_path / "hosts")
    with pytest.raises(ValueError, match="nnodes=4 but hostfile .* lists 3 host\\(s\\): a, b, c"):
        check_launch(LaunchSpec(launcher="deepspeed", nproc_per_node=1, nnodes=4, hostfile=str(hosts)))
    with pytest.raises(ValueError, match="nproc_per_node=2 but hostfile .* gives b slots=1"):
        check_launch(LaunchSpec(launcher="deepspeed", nproc_per_node=2, nnodes=2, hostfile=str(hosts)))
    plan = check_launch(LaunchSpec(launcher="deepspeed", nproc_per_node=1, nnodes=2, hostfile=str(hosts)))
    assert plan.world_size == 2 and [h.host for h in plan.hosts] == ["a", "b"]  # DeepSpeed's first nnodes hosts
    assert not plan.waits_for_peers  # node 0 drives every node: one flow run
    torchrun = check_launch(LaunchSpec(nproc_per_node=4, nnodes=3, master_addr="h"))
    assert torchrun.world_size == 12 and torchrun.waits_for_peers


def test_train_flow_rejects_bad_launch_settings_before_starting_anything(tmp_path):
    cfg = {"shards": ["x.tar"], "out_dir": str(tmp_path / "out"), "window_frames": WINDOW}
    with pytest.raises(ValueError, match="nnodes=3 but hostfile"):
        train_flow.fn(cfg, launch=LaunchSpec(launcher="deepspeed", nproc_per_node=1, nnodes=3, hostfile=str(
            write_hostfile([HostSlots("a", 1), HostSlots("b", 1)], tmp_path / "hosts"))))
    assert not (tmp_path / "out").exists()


# ---- the SLURM example ------------------------------------------------------------------------------

STUBS = {
    "scontrol": "#!/bin/bash\nprintf 'gpu-001\\ngpu-002\\n'\n",  # `scontrol show hostnames` of a 2-node job
    "srun": "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nfor id in 0 1; do SLURM_NODEID=$id \"$@\"; done\n",
    "py": "#!/bin/bash\necho \"$*\"\n",  # stands in for python: prints the flow's command line
}


@pytest.mark.parametrize("mode, flow_runs", [("torchrun", 2), ("deepspeed-nossh", 2), ("deepspeed-ssh", 1)])
def test_slurm_script_builds_valid_flow_commands(tmp_path, mode, flow_runs):
    import argparse

    from flows.train import add_launch_arguments, launch_kwargs

    for name, text in STUBS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu-[001-002]", REPO=str(tmp_path), PYTHON=str(tmp_path / "py"),
               TRAIN_CONFIG="cfg.json", GPUS_PER_NODE="4", MODE=mode)
    env.pop("SLURM_NODEID", None)
    proc = subprocess.run(["bash", str(REPO / "scripts/slurm/train.sbatch")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == flow_runs, proc.stdout + proc.stderr
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    parser.add_argument("command")  # python -m flows.cli train: the one train entry point
    parser.add_argument("--config")
    add_launch_arguments(parser)
    specs = [LaunchSpec(**launch_kwargs(parser.parse_args(line.split()))) for line in lines]
    assert [s.node_rank for s in specs] == list(range(flow_runs))
    assert all(s.nnodes == 2 and s.nproc_per_node == 4 and s.master_addr == "gpu-001" for s in specs)
    assert {s.master_port for s in specs} == {20077}
    if mode == "torchrun":
        assert {(s.launcher, s.rdzv_backend, s.rdzv_id) for s in specs} == {("torchrun", "c10d", "job77")}
    else:
        assert (tmp_path / "hostfile-77").read_text() == "gpu-001 slots=4\ngpu-002 slots=4\n"
        assert all(check_launch(s).world_size == 8 for s in specs)
        assert {s.no_ssh for s in specs} == {mode == "deepspeed-nossh"}


# ---- two nodes on one machine -----------------------------------------------------------------------


def _config(shards: Path, out_dir: Path) -> dict:
    return train_config(shards, out_dir, micro_batch=1, ds_config="zero2")


LOSS_KEYS = ("step", "loss", "video_loss", "struct_loss", "grad_norm", "lr", "world_size")


def _loss_records(metrics: Path) -> list[tuple]:
    return [tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(metrics)]


def _assert_two_rank_run(run_dir: Path) -> None:
    assert {(s.rank, s.status, s.step) for s in read_statuses(run_dir)} == {(0, COMPLETED, 3), (1, COMPLETED, 3)}
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000003"
    names = {p.name for p in (ckpt / "step00000003").iterdir()}
    assert {"mp_rank_00_model_states.pt", "trainer_state_rank0.pt", "trainer_state_rank1.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, n_shards=4, per_shard=2)  # two shards per rank
    return out


@pytest.fixture(scope="module")
def one_node_reference(shards, tmp_path_factory) -> list[tuple]:
    """The same job as 2 processes on one node (torchrun --standalone)."""
    root = tmp_path_factory.mktemp("reference")
    path = root / "train.json"
    path.write_text(json.dumps(_config(shards, root / "run")))
    proc = subprocess.run(command(LaunchSpec(nproc_per_node=2), path), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _loss_records(root / "run" / "metrics.jsonl")
    assert [r[0] for r in records] == [1, 2, 3] and {r[-1] for r in records} == {2}
    assert len({r[1] for r in records}) == 3  # the loss does change from step to step
    return records


@pytest.mark.slow  # 185 s (+90 s reference run and Prefect start) measured on the shared 2-core machine
def test_two_flow_runs_as_two_nodes_train_like_one_node(shards, tmp_path, one_node_reference, prefect_test_server):
    """One flow run per node, torchrun c10d rendezvous on 127.0.0.1: both GO, one shared run directory."""
    port = _free_port()
    cfg = _config(shards, tmp_path / "train")
    launch = dict(nproc_per_node=1, nnodes=2, master_addr="127.0.0.1", master_port=port, rdzv_backend="c10d",
                  rdzv_id="test-two-nodes", rdzv_timeout_s=120)
    gates = {"convergence_step": 1000, "joint_step": 5000}
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(train_flow, cfg, gates=gates, launch=LaunchSpec(node_rank=r, **launch), timeout_s=240,
                            return_state=True)
                for r in (0, 1)]
        states = [run.result() for run in runs]
    for state in states:
        assert state.is_completed() and state.name == "GO", state.message
    run_dir = tmp_path / "train" / "run-b1-w9-per_frame"
    _assert_two_rank_run(run_dir)
    assert _loss_records(run_dir / "metrics.jsonl") == one_node_reference  # bitwise: same data-parallel job
    assert (run_dir / "gate-memory-node0.png").exists() and (run_dir / "gate-memory-node1.png").exists()


@pytest.mark.slow
def test_deepspeed_hostfile_one_launcher_per_node(shards, tmp_path, one_node_reference):
    """DeepSpeed's launcher with a two-host hostfile and no_ssh: node_rank picks this node's line."""
    hosts = write_hostfile([HostSlots("node-a", 1), HostSlots("node-b", 1)], tmp_path / "hostfile")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_config(shards, tmp_path / "run")))
    port = _free_port()
    specs = [LaunchSpec(nproc_per_node=1, launcher="deepspeed", nnodes=2, node_rank=r, hostfile=str(hosts),
                        master_addr="127.0.0.1", master_port=port, no_ssh=True) for r in (0, 1)]
    assert all(check_launch(s).world_size == 2 for s in specs)
    procs = [subprocess.Popen(command(s, path), cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for s in specs]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "global_rank_mapping" in outputs[1] and "'node-b': [1]" in outputs[1]
    _assert_two_rank_run(tmp_path / "run")
    assert _loss_records(tmp_path / "run" / "metrics.jsonl") == one_node_reference
