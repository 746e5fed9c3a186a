"""Capacity plan arithmetic on a constructed ledger + manifest (flows/plan.py)."""
from __future__ import annotations

import argparse
import json
import time

import pytest

from datasets_manifest.schema import ClipRow, write_manifest
from datasets_manifest.summary import storage_bytes_per_second
from flows.plan import (
    CPU_STEPS,
    GPU_STEPS,
    PIPELINE_STEPS,
    add_plan_parser,
    costs_from_ledger,
    load_costs,
    parse_rates,
    plan_capacity,
)
from tasks.ledger import write_ledger_part
from tasks.step_runner import LedgerEntry


def entry(clip, step, seconds, status="ok", action="ran"):
    return {"clip_id": clip, "step": step, "status": status, "action": action, "seconds": seconds}


# clip a: 10 s, clip b: 30 s; b is rejected at crop (no face), so later steps only see a.
DURATIONS = {"a": 10.0, "b": 30.0}
LEDGER = [
    entry("a", "download", 1.0), entry("b", "download", 3.0),
    entry("a", "crop", 20.0), entry("b", "crop", 6.0, status="rejected"),
    entry("a", "motion", 5.0), entry("a", "pose_check", 0.5), entry("a", "audio_features", 2.0),
    entry("a", "vae_latents", 40.0), entry("a", "shard", 1.0),
    # not counted: a cached skip, a failure (retried later), a clip of unknown duration, a non-step row
    entry("a", "crop", 0.0, action="skipped"), entry("a", "vae_latents", 999.0, status="failed"),
    entry("ghost", "crop", 500.0), entry("row-3", "manifest", 0.0, status="rejected"),
]


def test_costs_per_clip_second_and_reach():
    costs = costs_from_ledger(LEDGER, DURATIONS)
    assert set(costs) == set(PIPELINE_STEPS)
    assert costs["download"].seconds_per_clip_s == pytest.approx(4.0 / 40.0)
    assert costs["crop"].seconds_per_clip_s == pytest.approx(26.0 / 40.0)  # the rejected clip cost time too
    assert costs["vae_latents"].seconds_per_clip_s == pytest.approx(40.0 / 10.0)  # failure not counted
    assert costs["crop"].clips == 2 and costs["vae_latents"].clips == 1
    assert costs["download"].reach == pytest.approx(1.0)
    assert costs["crop"].reach == pytest.approx(1.0)  # crop ran on both (and rejected one)
    assert costs["motion"].reach == pytest.approx(10.0 / 40.0)
    assert costs["shard"].reach == pytest.approx(0.25)


def manifest_rows(n=4, seconds=900.0):
    return [ClipRow(clip_id=f"c{i}", dataset="hdtf", source=f"/x/{i}.mp4", start_s=0.0, end_s=seconds,
                    identity=f"p{i}") for i in range(n)]


def test_plan_hours_and_storage():
    costs = costs_from_ledger(LEDGER, DURATIONS)
    rows = manifest_rows() + [ClipRow(clip_id="open", dataset="hdtf", source="/x/o.mp4", identity="q")]
    plan = plan_capacity(rows, costs, cpus=4, gpus=2, dataset="hdtf")
    total_s = 4 * 900.0  # the open-ended clip is not counted
    assert plan.clip_hours == pytest.approx(1.0) and plan.unknown_duration_clips == 1
    by = {s.step: s for s in plan.steps}
    assert [s.step for s in plan.steps] == list(PIPELINE_STEPS)
    assert {s for s in by if by[s].kind == "cpu"} == set(CPU_STEPS)
    assert {s for s in by if by[s].kind == "gpu"} == set(GPU_STEPS)
    # crop: 0.65 s per clip-second x 3600 s x reach 1 = 0.65 h of compute, over 4 workers
    assert by["crop"].compute_hours == pytest.approx(0.65)
    assert by["crop"].wall_hours == pytest.approx(0.65 / 4)
    # vae: 4 s per clip-second x 3600 s x reach 0.25 = 1 h, over 2 GPUs
    assert by["vae_latents"].compute_hours == pytest.approx(1.0)
    assert by["vae_latents"].wall_hours == pytest.approx(0.5)
    cpu = (0.1 + 0.65 + 0.05 * 0.25 + 0.1 * 0.25) * total_s / 3600 / 4
    gpu = (0.5 + 0.2 + 4.0) * 0.25 * total_s / 3600 / 2
    assert plan.cpu_wall_hours == pytest.approx(cpu) and plan.gpu_wall_hours == pytest.approx(gpu)
    assert plan.wall_hours_overlapped == pytest.approx(max(cpu, gpu))
    assert plan.wall_hours_sequential == pytest.approx(cpu + gpu)
    rates = storage_bytes_per_second()
    assert by["crop"].storage_bytes == pytest.approx(rates["crop"] * total_s)
    assert by["vae_latents"].storage_bytes == pytest.approx(rates["vae"] * total_s * 0.25)
    assert by["pose_check"].storage_bytes == pytest.approx(rates["flame"] * total_s * 0.25)
    assert plan.storage_bytes == pytest.approx(sum(s.storage_bytes for s in plan.steps))
    assert any("no end time" in n for n in plan.notes)


def test_more_workers_divide_wall_not_compute():
    costs = costs_from_ledger(LEDGER, DURATIONS)
    one = plan_capacity(manifest_rows(), costs, cpus=1, gpus=1)
    many = plan_capacity(manifest_rows(), costs, cpus=8, gpus=4)
    for a, b in zip(one.steps, many.steps):
        assert a.compute_hours == pytest.approx(b.compute_hours)
        assert b.wall_hours == pytest.approx(a.wall_hours / (8 if a.kind == "cpu" else 4))
    assert many.storage_bytes == pytest.approx(one.storage_bytes)


def test_unmeasured_steps_and_rate_overrides():
    only_cpu = [e for e in LEDGER if e["step"] in ("download", "crop")]
    costs = costs_from_ledger(only_cpu, DURATIONS)
    plan = plan_capacity(manifest_rows(), costs, cpus=2, gpus=1)
    assert set(plan.unmeasured) == {"motion", "pose_check", "audio_features", "vae_latents", "shard"}
    assert plan.gpu_wall_hours == 0.0
    assert any("no measured cost" in n for n in plan.notes)
    given = plan_capacity(manifest_rows(), costs, cpus=2, gpus=1, rates=parse_rates(["vae_latents=0.5"]))
    vae = next(s for s in given.steps if s.step == "vae_latents")
    assert vae.compute_hours == pytest.approx(0.5 * 3600 / 3600) and vae.reach == 1.0


@pytest.mark.parametrize("bad, msg", [("vae=1", "STEP one of"), ("crop", "STEP one of"), ("crop=x", "not a number"),
                                      ("crop=-1", ">= 0")])
def test_bad_rates_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_rates([bad])


def test_needs_workers():
    with pytest.raises(ValueError, match="at least one CPU worker and one GPU"):
        plan_capacity(manifest_rows(), {}, cpus=0, gpus=1)


def _finished_run(root):
    """A dataset output folder as a preprocess run leaves it: ledger parts + steps/<step>/<clip>/_status.json."""
    now = time.time()
    entries = [LedgerEntry(clip_id=e["clip_id"], dataset="hdtf", step=e["step"], status=e["status"], action=e["action"],
                           reason="", detail="", version="1", key="k", checksum="", seconds=e["seconds"], run_id="run",
                           finished_at=now) for e in LEDGER]
    write_ledger_part(root, entries, "run-1")
    for clip, seconds in DURATIONS.items():
        d = root / "steps" / "download" / clip
        d.mkdir(parents=True)
        (d / "_status.json").write_text(json.dumps({"info": {"duration_s": seconds}}))
    d = root / "steps" / "motion" / "a"
    d.mkdir(parents=True)
    (d / "_status.json").write_text(json.dumps({"info": {"frames": 250, "untrained_dryrun": True}}))
    return root


def test_load_costs_and_cli(tmp_path, capsys):
    run = _finished_run(tmp_path / "out" / "hdtf")
    costs = load_costs(run / "ledger")
    assert costs["crop"].seconds_per_clip_s == pytest.approx(0.65)
    manifest = write_manifest(manifest_rows(), tmp_path / "m.parquet")
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "hdtf", "--cpus", "4", "--gpus", "2", "--manifest", str(manifest),
                              "--ledger", str(run)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    crop_line = next(line for line in out.splitlines() if line.startswith("crop "))
    assert "0.6500" in crop_line and "0.65" in crop_line.split()[-4]
    assert "untrained dry-run" in out and "motion" in out
    args = parser.parse_args(["plan", "hdtf", "--cpus", "1", "--gpus", "1", "--manifest", str(manifest),
                              "--ledger", str(tmp_path)])
    assert args.func(args) == 2 and "no ledger under" in capsys.readouterr().err  # a usage error, not exit 1
