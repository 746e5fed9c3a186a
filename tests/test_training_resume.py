"""Exact resume: a run stopped at step k and resumed gives the loss sequence of the uninterrupted run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.training_shards import train_config, write_shards
from training.launch import LaunchSpec, command, environment
from training.metrics import read_metrics
from training.run_status import COMPLETED, STOPPED, read_statuses
from training.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _config(shards: Path, out_dir: Path, **kw) -> dict:
    return train_config(shards, out_dir, **{**dict(total_steps=5, ckpt_every=2, warmup_steps=2, num_workers=1,
                                                    ema_decay=0.9, seed=5), **kw})


def _losses(out_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["video_loss"], r["struct_loss"], r["ema_norm"], r["lr"])
            for r in read_metrics(out_dir / "metrics.jsonl")]


def test_resume_in_process_matches_uninterrupted(tmp_path, single_process_env):
    from training.trainer import run_training

    shards = tmp_path / "shards"
    write_shards(shards, n_shards=2, per_shard=3)  # 3 batches per epoch: the runs cross an epoch
    full = run_training(TrainConfig.from_dict(_config(shards, tmp_path / "full")))
    assert full.status == COMPLETED and full.step == 5
    stopped = run_training(TrainConfig.from_dict(_config(shards, tmp_path / "split", stop_at_step=3)))
    assert stopped.status == STOPPED and stopped.step == 3
    assert len(read_metrics(tmp_path / "split" / "metrics.jsonl")) == 3
    resumed = run_training(TrainConfig.from_dict(_config(shards, tmp_path / "split")))
    assert resumed.status == COMPLETED and resumed.step == 5
    reference = _losses(tmp_path / "full")
    assert [r[0] for r in reference] == list(range(1, 6))
    assert _losses(tmp_path / "split") == reference  # bitwise equal floats, EMA and LR included
    assert len({r[1] for r in reference}) == 5  # the losses do change from step to step
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("step*"))
    assert ckpts == ["step00000004", "step00000005"]  # keep_checkpoints=2


def test_resume_from_a_different_seed_is_detectably_different(tmp_path, single_process_env):
    """The equality above is not vacuous: a different noise seed changes the sequence."""
    from training.trainer import run_training

    shards = tmp_path / "shards"
    write_shards(shards, n_shards=1, per_shard=4)
    run_training(TrainConfig.from_dict(_config(shards, tmp_path / "a", total_steps=2)))
    run_training(TrainConfig.from_dict(_config(shards, tmp_path / "b", total_steps=2, seed=6)))
    assert _losses(tmp_path / "a") != _losses(tmp_path / "b")


def _torchrun(cfg: dict, path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(cfg))
    return subprocess.run(
        command(LaunchSpec(nproc_per_node=nproc), path), cwd=REPO, env=environment(), capture_output=True, text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_two_processes(tmp_path, stage):
    shards = tmp_path / "shards"
    write_shards(shards, n_shards=4, per_shard=3)
    base = _config(shards, tmp_path / "full", ds_config=stage, total_steps=5)
    proc = _torchrun(base, tmp_path / "full.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    split = dict(base, out_dir=str(tmp_path / "split"))
    assert _torchrun(dict(split, stop_at_step=2), tmp_path / "s1.json").returncode == 0
    proc = _torchrun(split, tmp_path / "s2.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checkpoints/step00000002 at step 2" in proc.stdout + proc.stderr  # the "resumed from" log line
    # the known third-party noise (tasks/known_noise.py) is quieted in the trainer processes too
    assert "all_gather_into_tensor" not in proc.stderr + proc.stdout and "Setting accelerator" not in proc.stdout
    split_rows, full_rows = _losses(tmp_path / "split"), _losses(tmp_path / "full")
    # bitwise, the EMA norm included: it once read DeepSpeed's uninitialised partition padding (CI: 1.6e-6 apart)
    assert split_rows == full_rows
    assert [s.status for s in read_statuses(tmp_path / "split")] == [COMPLETED, COMPLETED]
    assert read_metrics(tmp_path / "full" / "metrics.jsonl")[0]["world_size"] == 2


class _Planted:
    """What an attacker pickles into a checkpoint: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("member", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "trainer_state_rank0.pt"])
def test_a_planted_checkpoint_payload_does_not_run(tmp_path, single_process_env, member):
    """A payload added to any file of the latest tag is refused on resume: the marker is never created, the
    run ends in error naming the file, and the untouched checkpoint still resumes."""
    from training.run_status import ERROR
    from training.trainer import run_training

    shards = tmp_path / "shards"
    write_shards(shards, n_shards=1, per_shard=3)
    out = tmp_path / "run"
    assert run_training(TrainConfig.from_dict(_config(shards, out, stop_at_step=2))).status == STOPPED
    target = out / "checkpoints" / "step00000002" / member
    original = target.read_bytes()
    state = torch.load(target, weights_only=False)  # our own file, written just now
    marker = tmp_path / "pwned"
    state["extra"] = _Planted(marker)
    torch.save(state, target)
    failed = run_training(TrainConfig.from_dict(_config(shards, out)))
    assert not marker.exists()
    assert failed.status == ERROR and "UnsafeCheckpoint" in failed.error and member in failed.error
    target.write_bytes(original)
    resumed = run_training(TrainConfig.from_dict(_config(shards, out)))
    assert resumed.status == COMPLETED and resumed.step == 5 and not marker.exists()
