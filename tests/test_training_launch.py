"""Launcher command lines, trainer environment and the streaming subprocess runner."""
from __future__ import annotations

import sys
import time

import pytest

from training.launch import REPO_ROOT, LaunchSpec, command, environment, extensions_dir, run_streaming
from training.train_config import TrainConfig


def test_torchrun_single_node_is_standalone():
    args = command(LaunchSpec(nproc_per_node=2), "/x/cfg.json")
    assert args[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in args and "--standalone" in args
    assert args[-4:] == ["-m", "training.train", "--config", "/x/cfg.json"]


def test_torchrun_multi_node_and_deepspeed_launcher():
    multi = command(LaunchSpec(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1"), "c.json")
    assert "--standalone" not in multi
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"} <= set(multi)
    ds = command(LaunchSpec(nproc_per_node=4, launcher="deepspeed", hostfile="/h"), "c.json")
    assert ds[1:3] == ["-m", "deepspeed.launcher.runner"] and "--hostfile=/h" in ds
    assert ds[-4:] == ["--module", "training.train", "--config", "c.json"]
    with pytest.raises(ValueError, match="launcher must be"):
        command(LaunchSpec(launcher="mpirun"), "c.json")


def test_environment_sets_cpu_defaults_without_overriding():
    env = environment({"PATH": "/bin", "OMP_NUM_THREADS": "4"})
    assert env["OMP_NUM_THREADS"] == "4" and env["DS_ACCELERATOR"] == "cpu"
    assert env["TORCH_EXTENSIONS_DIR"] == str(extensions_dir()) and env["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert environment({})["OMP_NUM_THREADS"] == "1"
    assert environment({"TORCH_EXTENSIONS_DIR": "/x"})["TORCH_EXTENSIONS_DIR"] == "/x"


def test_extension_builds_are_kept_per_python_environment_and_cpu():
    here = extensions_dir("/venvs/a")
    assert extensions_dir("/venvs/a") == here  # stable across calls (and runs)
    for other in (extensions_dir("/venvs/b"), extensions_dir("/venvs/a", cpu="another model|avx2")):
        assert other != here and other.parent == here.parent  # one cache folder each, side by side


def test_run_streaming_forwards_lines_and_keeps_the_tail():
    seen = []
    code = "import sys\nfor i in range(100): print('line', i)\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    result = run_streaming([sys.executable, "-c", code], seen.append, tail_lines=5)
    assert result.returncode == 3 and not result.timed_out
    assert len(seen) == 101 and seen[0] == "line 0"
    assert result.tail == ["line 96", "line 97", "line 98", "line 99", "oops"]


def test_run_streaming_timeout_kills_the_process_group():
    start = time.monotonic()
    code = ("import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('up', flush=True)\ntime.sleep(60)")
    result = run_streaming([sys.executable, "-c", code], lambda line: None, timeout_s=1.5)
    assert result.timed_out and result.returncode != 0 and result.tail == ["up"]
    assert time.monotonic() - start < 20  # the grandchild holding the pipe was killed too


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    base = {"shards": ["a.tar"], "out_dir": str(tmp_path), "window_frames": 9}
    with pytest.raises(ValueError, match="unknown training config keys: \\['bach'\\]"):
        TrainConfig.from_dict({**base, "bach": 2})
    with pytest.raises(ValueError, match="noise_mode"):
        TrainConfig.from_dict({**base, "noise_mode": "per_token"})
    cfg = TrainConfig.from_dict({**base, "faults": {"crash_at_step": 3}, "train_window_frames": 5})
    assert cfg.faults.crash_at_step == 3 and cfg.effective_window_frames == 5
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path):
    """A build killed midway leaves torch's `lock`; every later load would wait on it forever."""
    import os
    import time

    from training.prebuild_ops import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not clear_stale_lock(tmp_path) and lock.exists()  # a build may be running right now
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()
    assert not clear_stale_lock(tmp_path)  # nothing there: nothing to do
