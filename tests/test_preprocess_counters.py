"""What a preprocess run writes to Prefect does not grow with its clips (issue 30): log lines are one per batch and
step plus one per clip that did not make it, artifacts are per run, task runs per batch, never per clip."""
from __future__ import annotations

import asyncio

import pyarrow.parquet as pq

from datasets_manifest.schema import ClipRow, rows_to_table


def _manifest(samples_dir, path, n: int):
    """n distinct one-second clips of one sample (distinct time ranges: each is a real download with a trim)."""
    src = str(samples_dir / "yongen.mp4")
    rows = [ClipRow(clip_id=f"c{i:02d}", dataset="t", source=src, start_s=0.25 * i, end_s=0.25 * i + 1.0, identity="a")
            for i in range(n)]
    pq.write_table(rows_to_table(rows), path)
    return str(path)


def _recorded(run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the API handler sends in the background: wait for this run's lines

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return {"logs": [log.message for log in logs], "artifacts": len(artifacts),
                "task_runs": sorted(t.name.rsplit("-", 1)[0] for t in tasks)}

    return asyncio.run(read())


def test_log_lines_artifacts_and_task_runs_do_not_grow_with_the_clips(prefect_test_server, samples_dir, tmp_path):
    from flows.preprocess import preprocess

    recorded = {}
    for n in (2, 6):
        manifest = _manifest(samples_dir, tmp_path / f"m{n}.parquet", n)
        report = preprocess(dataset="t", manifest=manifest, output_root=str(tmp_path / f"out{n}"), steps=["download"],
                            runner={"batch_size": 8, "progress": False})
        assert report["clips_out"] == n
        recorded[n] = _recorded(report["run_id"])
    small, large = recorded[2], recorded[6]
    assert len(large["logs"]) == len(small["logs"]), (small["logs"], large["logs"])
    assert not [line for line in large["logs"] if "c05" in line]  # an ok clip has no line of its own
    assert any("download: 6 ok" in line for line in large["logs"])  # the batch's line counts them
    assert large["artifacts"] == small["artifacts"] > 0
    assert large["task_runs"] == small["task_runs"]  # one download batch either way


def test_a_clip_that_did_not_make_it_keeps_its_line(prefect_test_server, samples_dir, tmp_path):
    from flows.preprocess import preprocess

    rows = [ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"), end_s=1.0, identity="a"),
            ClipRow(clip_id="nowhere", dataset="t", source=str(tmp_path / "missing.mp4"), identity="b")]
    pq.write_table(rows_to_table(rows), tmp_path / "m.parquet")
    report = preprocess(dataset="t", manifest=str(tmp_path / "m.parquet"), output_root=str(tmp_path / "out"),
                        steps=["download"], runner={"batch_size": 8, "progress": False})
    logs = _recorded(report["run_id"])["logs"]
    assert [line for line in logs if "nowhere" in line and "rejected" in line]
    assert not [line for line in logs if "good" in line]
    assert any("download: 1 ok" in line and "1 rejected" in line for line in logs)
