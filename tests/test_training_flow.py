"""The training flow: real trainer subprocesses (torchrun, CPU), gate decisions, retries and artifacts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey  # noqa: E402

from flows.train import train_flow  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.run_status import COMPLETED, ERROR, NONFINITE, OOM, read_statuses  # noqa: E402
from tests.training_shards import train_config, write_shards  # noqa: E402


pytestmark = pytest.mark.usefixtures("prefect_test_server")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, n_shards=4, per_shard=4)
    return out


def _config(shards: Path, out_dir: Path, **kw) -> dict:
    return train_config(shards, out_dir, **kw)


# Gates that a 3-step tiny run passes: convergence / joint progress not reached yet.
GATES = {"convergence_step": 1000, "joint_step": 5000}


def _artifacts(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_crashing_worker_fails_the_flow_with_its_log_tail(shards, tmp_path):
    """Two processes, ZeRO-2: rank 1 raises at step 2; the flow run fails and shows why."""
    cfg = _config(shards, tmp_path, faults={"crash_at_step": 2, "crash_rank": 1})
    state = train_flow(cfg, nproc_per_node=2, gates=GATES, return_state=True)
    assert state.is_failed() and state.name == "TrainerCrashed"
    assert "rank 1 at step 2: RuntimeError: injected crash at step 2 on rank 1" in state.message
    assert "last log lines:" in state.message and "Traceback" in state.message
    run_dir = tmp_path / "run-b2-w9-per_frame"
    statuses = {s.rank: s.status for s in read_statuses(run_dir)}
    assert statuses[1] == ERROR
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]  # step 1 ran on both ranks
    crash = _artifacts("trainer-crash")
    assert crash and "injected crash" in crash[-1].data


def test_out_of_memory_is_retried_with_batch_one(shards, tmp_path):
    cfg = _config(shards, tmp_path, faults={"oom_at_step": 2, "oom_if_batch_above": 1})
    state = train_flow(cfg, nproc_per_node=1, gates=GATES, return_state=True)
    assert state.is_completed() and state.name == "GO", state.message
    first = read_statuses(tmp_path / "run-b2-w9-per_frame")
    assert [(s.status, s.step) for s in first] == [(OOM, 1)]
    retry_dir = tmp_path / "run-b1-w9-per_frame"
    assert [s.status for s in read_statuses(retry_dir)] == [COMPLETED]
    records = read_metrics(retry_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and {r["micro_batch"] for r in records} == {1}
    memory = _artifacts("train-gate-memory")
    assert any("NO-GO" in a.data and "retry with micro batch 1" in a.data for a in memory)
    assert any("**GO**" in a.data for a in memory)
    assert (retry_dir / "gate-memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_memory_fallback_reaches_the_short_clip_then_nan_retries_per_sample(shards, tmp_path):
    cfg = _config(
        shards,
        tmp_path,
        faults={
            "oom_at_step": 1,
            "oom_if_window_above": 5,  # only the 5-frame (2 latent frames) clip fits
            "nan_at_step": 2,
            "nan_if_noise_mode": "per_frame",
        },
    )
    gates = dict(GATES, fallback_latent_frames=2)
    state = train_flow(cfg, nproc_per_node=2, gates=gates, return_state=True)
    assert state.is_completed(), state.message
    tried = sorted(p.name for p in tmp_path.glob("run-*"))
    assert tried == ["run-b1-w5-per_frame", "run-b1-w5-per_sample", "run-b1-w9-per_frame", "run-b2-w9-per_frame"]
    assert {s.status for s in read_statuses(tmp_path / "run-b1-w5-per_frame")} == {NONFINITE}
    final = read_metrics(tmp_path / "run-b1-w5-per_sample" / "metrics.jsonl")
    assert [r["window"] for r in final] == [5, 5, 5] and final[0]["noise_mode"] == "per_sample"


@pytest.mark.slow
def test_convergence_no_go_ends_the_flow_failed_with_recommendation(shards, tmp_path):
    cfg = _config(shards, tmp_path, total_steps=2)
    state = train_flow(
        cfg, nproc_per_node=1, gates={"convergence_step": 2, "convergence_max_loss": 0.01, "convergence_window": 2},
        return_state=True,
    )
    assert state.is_failed() and state.name == "NO-GO"
    assert state.message.startswith("NO-GO: convergence") and "talking-head data" in state.message


def test_publish_gate_artifacts_and_states(tmp_path):
    from prefect import flow

    from flows.gate_artifacts import artifact_key, publish_gate
    from tasks.gates import GateVerdict
    from training.loss_plot import plot_losses

    records = [{"step": s, "loss": 1.0 / s, "video_loss": 0.6 / s, "struct_loss": 0.4 / s} for s in range(1, 6)]
    png = plot_losses(records + [{"step": 6, "loss": float("nan")}], tmp_path / "loss.png")
    nogo = GateVerdict("joint_progress", False, "struct not falling", {"step": 5, "rows": [1, 2]}, "stop and report",
                       rows=[{"stream": "video_loss", "falling": True}, {"stream": "struct_loss", "falling": False}])
    go = GateVerdict("stability", True, "finite", {"sign_changes": 0})

    @flow(validate_parameters=False)
    def gate_flow(verdict):
        return publish_gate(verdict, image=png, key_prefix="t-gate")

    failed = gate_flow(nogo, return_state=True)
    assert failed.is_failed() and failed.name == "NO-GO"
    assert failed.message == "NO-GO: joint_progress: struct not falling. Recommendation: stop and report"
    ok = gate_flow(go, return_state=True)
    assert ok.is_completed()
    markdown = _artifacts(artifact_key("t-gate", "joint_progress"))[-1]
    assert markdown.key == "t-gate-joint-progress" and "**NO-GO**" in markdown.data
    assert "data:image/png;base64,iVBORw0KGgo" in markdown.data and "stop and report" in markdown.data
    table = _artifacts("t-gate-joint-progress-table")[-1]
    assert "struct_loss" in table.data and table.type == "table"
    assert artifact_key("Gate", "3d_latent quality") == "gate-3d-latent-quality"
