"""The training flow: real trainer subprocesses (torchrun, CPU), gate decisions, retries and artifacts."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey  # noqa: E402
from prefect.client.schemas.sorting import ArtifactSort  # noqa: E402

from flows.train import train_flow  # noqa: E402
from tests.training_shards import train_config, write_shards  # noqa: E402
from training.gates import ReviewOptions  # noqa: E402
from training.launch import LaunchSpec  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.run_status import COMPLETED, ERROR, NONFINITE, OOM, STOPPED, read_statuses  # noqa: E402

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


def _artifacts(key: str, state=None) -> list:
    """Artifacts under `key`, oldest first; with a flow run's final state, only that run's."""
    flt = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
    if state is not None:
        flt.flow_run_id = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=flt, sort=ArtifactSort.CREATED_DESC)[::-1]


def test_crashing_worker_fails_the_flow_with_its_log_tail(shards, tmp_path):
    """Two processes, ZeRO-2: rank 1 raises at step 2; the flow run fails and shows why."""
    cfg = _config(shards, tmp_path, faults={"crash_at_step": 2, "crash_rank": 1})
    state = train_flow(cfg, gates=GATES, launch=LaunchSpec(nproc_per_node=2), return_state=True)
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
    state = train_flow(cfg, gates=GATES, launch=LaunchSpec(nproc_per_node=1), return_state=True)
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
    state = train_flow(cfg, gates=gates, launch=LaunchSpec(nproc_per_node=2), return_state=True)
    assert state.is_completed(), state.message
    tried = sorted(p.name for p in tmp_path.glob("run-*"))
    assert tried == ["run-b1-w5-per_frame", "run-b1-w5-per_sample", "run-b1-w9-per_frame", "run-b2-w9-per_frame"]
    assert {s.status for s in read_statuses(tmp_path / "run-b1-w5-per_frame")} == {NONFINITE}
    final = read_metrics(tmp_path / "run-b1-w5-per_sample" / "metrics.jsonl")
    assert [r["window_frames"] for r in final] == [5, 5, 5] and final[0]["noise_mode"] == "per_sample"


def _gate_log(base: Path) -> list[dict]:
    return [json.loads(line) for line in (base / "gates.jsonl").read_text().splitlines()]


def test_a_convergence_no_go_at_step_n_stops_the_trainer_at_n_and_exits_3(shards, tmp_path, capsys):
    """`dualforce train` of 6 steps with the gate at step 2: the trainer stops at 2, the flow judges, exits 3."""
    from flows.cli import main

    cfg = _config(shards, tmp_path, total_steps=6, micro_batch=1)
    gates = {"convergence_step": 2, "convergence_max_loss": 0.01, "convergence_window": 2, "joint_step": None}
    code = main(["train", "--config", json.dumps(cfg), "--gates", json.dumps(gates), "--nproc-per-node", "1"])
    assert code == 3
    err = capsys.readouterr().err
    assert "NO-GO: convergence" in err and "talking-head data" in err
    run_dir = tmp_path / "run-b1-w9-per_frame"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]  # not 6
    assert [(s.status, s.step) for s in read_statuses(run_dir)] == [(STOPPED, 2)]
    log = _gate_log(tmp_path)
    assert [(e["gate"], e["verdict"], e["step"]) for e in log] == [("convergence", "NO-GO", 2)]  # memory: at 6


def test_gates_are_judged_live_in_order_and_a_joint_no_go_stops_there(shards, tmp_path):
    """memory at 1, convergence at 2 (GO), joint progress at 3 (NO-GO) of 8: three launches, nothing after 3;
    each verdict was recorded before training went past its step; the unreached review says NOT EVALUATED."""
    cfg = _config(shards, tmp_path, total_steps=8, micro_batch=1)
    gates = {"memory_step": 1, "convergence_step": 2, "convergence_max_loss": 1e9, "convergence_window": 1,
             "joint_step": 3, "joint_window": 1, "joint_min_rel_drop": 10.0}
    state = train_flow(cfg, gates=gates, launch=LaunchSpec(nproc_per_node=1), return_state=True)
    assert state.is_failed() and state.name == "NO-GO" and state.message.startswith("NO-GO: joint_progress")
    run_dir = tmp_path / "run-b1-w9-per_frame"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    log = _gate_log(tmp_path)
    assert [(e["gate"], e["verdict"], e["step"]) for e in log] == [
        ("memory", "GO", 1), ("convergence", "GO", 2), ("joint_progress", "NO-GO", 3)]
    ckpt_mtime = {p.name: p.stat().st_mtime for p in (run_dir / "checkpoints").glob("step*")}
    assert log[1]["time"] < ckpt_mtime["step00000003"]  # convergence was judged before step 3 was trained
    memory = _artifacts("train-gate-memory", state)[-1]
    assert "**GO**" in memory.data and "peak_memory_mb" in memory.data


def test_the_stability_fallback_resumes_from_the_last_good_checkpoint(shards, tmp_path):
    """NaN at step 3 (per-frame): the per-sample attempt continues from the step-2 checkpoint, not from 0."""
    cfg = _config(shards, tmp_path, total_steps=4, micro_batch=1, ckpt_every=2,
                  faults={"nan_at_step": 3, "nan_if_noise_mode": "per_frame"})
    state = train_flow(cfg, gates=GATES, launch=LaunchSpec(nproc_per_node=1), return_state=True)
    assert state.is_completed() and state.name == "GO", state.message
    assert "per-sample noise resumed from the step-2 checkpoint of run-b1-w9-per_frame" in state.message
    first = read_metrics(tmp_path / "run-b1-w9-per_frame" / "metrics.jsonl")
    final = read_metrics(tmp_path / "run-b1-w9-per_sample" / "metrics.jsonl")
    assert [r["step"] for r in final] == [1, 2, 3, 4]
    assert final[:2] == first[:2]  # the steps before the checkpoint are the per-frame run's own
    assert [r["noise_mode"] for r in final[2:]] == ["per_sample", "per_sample"]
    assert sorted(p.name for p in (tmp_path / "run-b1-w9-per_sample" / "checkpoints").glob("step*")) == ["step00000004"]
    stability = [e for e in _gate_log(tmp_path) if e["gate"] == "stability"]
    assert [(e["verdict"], e["step"]) for e in stability] == [("NO-GO", 4), ("GO", 4)]


def _resume_when_paused(answer: dict, timeout_s: float = 120) -> None:
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            paused = [r for r in client.read_flow_runs() if r.state and r.state.is_paused()]
            if paused:
                resume_flow_run(paused[0].id, run_input=answer)
                return
            time.sleep(0.5)
    raise AssertionError("the flow never paused for review")


def test_the_review_gate_pauses_and_resumes_on_the_answer(shards, tmp_path):
    """Review at step 1 of 2: the flow pauses; an "adjust" answer changes the loss weights for step 2."""
    cfg = _config(shards, tmp_path, total_steps=2, micro_batch=1)
    answer = {"decision": "adjust", "note": "struct looks noisy", "loss_options": {"struct_loss_weight": 0.5}}
    resumer = threading.Thread(target=_resume_when_paused, args=(answer,))
    resumer.start()
    state = train_flow(cfg, gates=dict(GATES, review_step=1), launch=LaunchSpec(nproc_per_node=1),
                       review=ReviewOptions(timeout_s=60), return_state=True)
    resumer.join()
    assert state.is_completed(), state.message
    run_dir = tmp_path / "run-b1-w9-per_frame"
    assert json.loads((run_dir / "train_config.json").read_text())["loss_options"] == {"struct_loss_weight": 0.5}
    review = [e for e in _gate_log(tmp_path) if e["gate"] == "review"]
    assert [(e["verdict"], e["step"]) for e in review] == [("GO", 1)]
    assert review[0]["summary"] == "adjust (person): struct looks noisy"
    request = _artifacts("train-review-request", state)[-1]
    assert "Sample review at step 1" in request.data and "data:image/png;base64" in request.data


def test_the_review_gate_acts_on_its_timeout(shards, tmp_path):
    cfg = _config(shards, tmp_path, total_steps=2, micro_batch=1)
    state = train_flow(cfg, gates=dict(GATES, review_step=1), launch=LaunchSpec(nproc_per_node=1),
                       review=ReviewOptions(timeout_s=2, on_timeout="stop"), return_state=True)
    assert state.is_failed() and state.name == "NO-GO"
    assert "review: stop (timeout): no answer within 2 s" in state.message
    assert [r["step"] for r in read_metrics(tmp_path / "run-b1-w9-per_frame" / "metrics.jsonl")] == [1]


def test_publish_gate_artifacts_and_states(tmp_path):
    from prefect import flow

    from flows.gate_artifacts import artifact_key, publish_gate
    from tasks.gate_verdict import GateVerdict
    from training.plots import plot_losses

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
