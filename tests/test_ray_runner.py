"""Preprocessing on Ray or a local process pool: resource requests, one Prefect API, and the same ledger and shard
bytes as the thread runner."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from datasets_manifest.schema import ClipRow, rows_to_table
from flows.runners import GPU_STEPS, RayConfig, batch_resources, check_api_reachable
from tasks.ledger import read_ledger
from tasks.steps.shard import shard_files

# Steps 1, 2 and 7 on three short real clips, sparse windows: the plumbing, not the models.
WINDOWS = dict(shard_features=False, window_frames=17, window_stride=50, shard_max_samples=2, shard_groups=4)
FLOW = dict(steps=["download", "crop", "shard"], windows=WINDOWS, runner={"batch_size": 1})
RAY = dict(runner={"runner": "ray", "ray_num_cpus": 2, "batch_size": 1})


def test_gpu_steps_ask_for_a_gpu_only_where_the_cluster_has_one():
    cfg = RayConfig(cpus_per_batch=2, gpus_per_batch=0.5)
    assert GPU_STEPS == {"motion", "audio_features", "vae_latents"}
    for step in ("motion", "audio_features", "vae_latents"):
        assert batch_resources(step, 8, cfg) == {"num_cpus": 2, "num_gpus": 0.5}
        assert batch_resources(step, 0, cfg) == {"num_cpus": 2}
    for step in ("download", "crop", "pose_check", "shard"):
        assert batch_resources(step, 8, cfg) == {"num_cpus": 2}


def test_a_loopback_prefect_api_is_refused_on_a_multi_node_cluster():
    check_api_reachable("http://127.0.0.1:4200/api", 1)
    check_api_reachable("http://head:4200/api", 3)
    with pytest.raises(RuntimeError, match="local to this machine but the Ray cluster has 3 nodes.*PREFECT_API_URL"):
        check_api_reachable("http://127.0.0.1:4200/api", 3)


@pytest.fixture(scope="module")
def prefect_harness(prefect_test_server):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return prefect_test_server


@pytest.fixture(scope="module")
def manifest(samples_dir, tmp_path_factory):
    rows = [ClipRow(clip_id=f"c-{n}", dataset="t", source=str(samples_dir / "more" / f"{n}.mp4"), identity=n, split=split)
            for n, split in (("lp_d19", "train"), ("lp_d12", "train"), ("lp_s18", "test"))]  # lp_d19: silent
    path = tmp_path_factory.mktemp("manifest") / "m.parquet"
    pq.write_table(rows_to_table(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def local_run(prefect_harness, manifest, tmp_path_factory):
    from flows.preprocess import preprocess

    out = tmp_path_factory.mktemp("local")
    t0 = time.perf_counter()
    report = preprocess(dataset="t", manifest=manifest, output_root=str(out), **FLOW)
    return out, report, time.perf_counter() - t0


def _digests(shards) -> dict:
    return {p.relative_to(shards).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_files(shards)}


def _ledger(root, run_id) -> dict:
    return {(r["clip_id"], r["step"]): (r["status"], r["reason"], r["key"], r["checksum"])
            for r in read_ledger(root).to_pylist() if r["run_id"] == run_id}


@pytest.mark.slow  # ~90 s here: a local Ray instance and its workers take ~45 s to start on 2 shared cores
def test_ray_runner_gives_the_local_runs_ledger_and_shard_bytes(local_run, manifest, tmp_path):
    from flows.preprocess import preprocess

    local_out, local_report, local_s = local_run
    t0 = time.perf_counter()
    report = preprocess(dataset="t", manifest=manifest, output_root=f"file://{tmp_path}", **dict(FLOW, **RAY))
    ray_s = time.perf_counter() - t0
    print(f"\nwall time: local {local_s:.1f}s, ray {ray_s:.1f}s")
    assert report["runner"] == "ray" and report["clips_out"] == 2 and report["shards"]["samples"] > 0
    digests = _digests(tmp_path / "t" / "shards")
    assert digests and digests == _digests(local_out / "t" / "shards")
    assert (pq.read_table(tmp_path / "t" / "shards" / "index.parquet").to_pylist()
            == pq.read_table(local_out / "t" / "shards" / "index.parquet").to_pylist())
    ray_ledger = _ledger(tmp_path / "t", report["run_id"])
    assert len(ray_ledger) == 8 and ray_ledger == _ledger(local_out / "t", local_report["run_id"])
    assert ray_ledger[("c-lp_d19", "crop")][:2] == ("rejected", "silent_audio")  # rejected the same way
    assert {k for k in ray_ledger if k[1] == "crop" and ray_ledger[k][3]} == {(f"c-{n}", "crop") for n in ("lp_d12", "lp_s18")}


def test_process_pool_runner_gives_the_local_runs_ledger_and_shard_bytes(local_run, manifest, tmp_path):
    """runner="processes": batches in worker processes (own interpreters, so the crop's Python work runs in
    parallel) report to the same Prefect API and produce the thread runner's exact outputs."""
    from flows.preprocess import preprocess

    local_out, local_report, _ = local_run
    pool = {"runner": "processes", "processes": 2, "batch_size": 1}
    report = preprocess(dataset="t", manifest=manifest, output_root=str(tmp_path), **dict(FLOW, runner=pool))
    assert report["runner"] == "processes" and report["clips_out"] == 2  # lp_d19 is rejected: silent_audio
    digests = _digests(tmp_path / "t" / "shards")
    assert digests and digests == _digests(local_out / "t" / "shards")
    ledger = _ledger(tmp_path / "t", report["run_id"])
    assert len(ledger) == 8 and ledger == _ledger(local_out / "t", local_report["run_id"])
    import psutil  # the pool is gone with the run: no worker process outlives it

    assert not [c for c in psutil.Process().children(recursive=True) if "ProcessPool" in " ".join(c.cmdline()) or
                "multiprocessing.spawn" in " ".join(c.cmdline())]


def _ray_batch_pids() -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::run-step-batch"):
            found.append(p.pid)
    return found


@pytest.mark.slow
def test_killing_a_ray_worker_mid_run_then_rerunning_gives_the_same_shards(local_run, manifest, tmp_path):
    from flows.preprocess import preprocess

    out = tmp_path / "killed"
    outcome: dict = {}

    def run():
        try:
            outcome["report"] = preprocess(dataset="t", manifest=manifest, output_root=str(out), **dict(FLOW, **RAY))
        except BaseException as exc:  # what the killed run ends with is reported below, not hidden
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and thread.is_alive():
        pids = _ray_batch_pids()
        if pids and any((out / "t" / "steps" / "crop").glob("*/_status.json")):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)  # a worker dies in the middle of a batch
        time.sleep(0.1)
    thread.join(600)
    assert killed is not None, "no Ray batch worker was seen running"
    # Ray re-runs the dead worker's batch (max_retries); the step store makes the re-run pick up where it was
    assert "report" in outcome, f"the run with a killed worker ended with {outcome.get('error')!r}"
    assert outcome["report"]["clips_out"] == 2  # lp_d19 is rejected: silent_audio
    assert _digests(out / "t" / "shards") == _digests(local_run[0] / "t" / "shards")

    again = preprocess(dataset="t", manifest=manifest, output_root=str(out), **dict(FLOW, **RAY))
    assert again["clips_out"] == 2
    assert _digests(out / "t" / "shards") == _digests(local_run[0] / "t" / "shards")
    assert _ledger(out / "t", again["run_id"]) == _ledger(local_run[0] / "t", local_run[1]["run_id"])
    for step_dir in (out / "t" / "steps").iterdir():
        assert not list(step_dir.glob(".*tmp*")), step_dir
    assert not [p for p in (out / "t" / "shards").rglob("*") if ".tmp-" in p.name]
