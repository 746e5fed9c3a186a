"""The training program: concept -> pretrain -> joint, stages chained by their live gates (real trainer processes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pydantic import ValidationError  # noqa: E402

from tasks import contract  # noqa: E402
from tests.training_shards import CROP, WINDOW, write_shards  # noqa: E402
from training.gates import read_gate_log  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.program import load_program  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = {"model_variant": "tiny", "micro_batch": 1, "warmup_steps": 1, "num_workers": 0, "shuffle_buffer": 4}


def _shard_set(root: Path, profile: str, seed: int) -> Path:
    """A shard-set folder as preprocess writes it: <split>/shard-*.tar + stats.json."""
    write_shards(root / "train", n_shards=2, per_shard=2, seed=seed, profile=profile)
    stats = {"window_frames": WINDOW, "crop_size": CROP, "profile": profile, "samples": 4}
    (root / "stats.json").write_text(json.dumps(stats))
    return root


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("program-data")
    return {"heads": _shard_set(base / "heads", contract.TALKING_HEAD, 1),
            "general": _shard_set(base / "general", contract.VIDEO_ONLY, 2)}


def _program(tmp_path: Path, shard_sets: dict[str, Path], **stages) -> Path:
    program = {"name": "toy", "out_dir": "out", "launch": {"nproc_per_node": 1}, **stages}
    path = tmp_path / "program.yaml"
    path.write_text(yaml.safe_dump(program))
    return path


def _stage(shards: Path, steps: int, **gates) -> dict:
    return {"shards": [str(shards)], "train": dict(TOY, total_steps=steps, ckpt_every=steps), "gates": gates}


def test_program_files_are_checked_before_anything_runs(tmp_path):
    lite = load_program(REPO / "configs" / "program-lite.yaml")
    assert lite.concept.sigma_struct_max == [0.5, 0.7, 1.0] and lite.pretrain.gates["convergence_step"] == 20000
    assert lite.joint.gates["joint_step"] == 5000 and lite.joint.gates["review_step"] == 20000
    assert Path(lite.out_dir).is_absolute() and lite.joint.shards[0].endswith("data/preprocessed/hdtf/shards")
    assert load_program(REPO / "configs" / "program-dryrun.yaml").review.auto_approve
    base = {"name": "x", "out_dir": "o", "joint": {"shards": ["s"]}}
    cases = [
        ({"joint": {"shards": ["s"], "train": {"total_stepz": 3}}}, "unknown training config keys"),
        ({"joint": {"shards": ["s"], "train": {"out_dir": "elsewhere"}}}, "set by the program"),
        ({"joint": {"shards": ["s"], "gates": {"joint_step": 0}}}, "joint_step must be >= 1"),
        ({"concept": {"shards": ["s"], "chosen": 0.6, "gates": {"convergence_step": 5},
                      "train": {"total_steps": 5}}}, "chosen 0.6 is not one of"),
        ({"pretrain": {"shards": ["s"], "gates": {"convergence_step": 50}, "train": {"total_steps": 10}}},
         "must fall within its 10 training steps"),
        ({"pretrain": {"shards": ["s"], "gates": {"joint_step": 5, "convergence_step": 5},
                       "train": {"total_steps": 10}}}, "no struct stream"),
        ({"joint": {"shards": ["s"], "train": {"video_only": True}}}, "set by the program"),
        ({"stages": []}, "Extra inputs are not permitted"),
    ]
    for change, message in cases:
        with pytest.raises(ValidationError, match=message):
            load_program({**base, **change})


@pytest.mark.usefixtures("prefect_test_server")
@pytest.mark.slow
def test_the_program_runs_concept_then_pretrain_and_branches_to_option_b_on_its_no_go(tmp_path, shard_sets, capsys):
    """concept (GO) -> pretrain NO-GO at step 2 of 6 (stops there) -> joint from scratch, whose review gate is
    auto-approved; `dualforce program` exits 0 and prints the stage table. (Three ceilings: the dry-run's test.)"""
    from flows.cli import main

    path = _program(
        tmp_path, shard_sets,
        concept=dict(_stage(shard_sets["heads"], 2, convergence_step=2, convergence_window=2,
                            convergence_max_loss=1e9, joint_step=None),
                     sigma_struct_max=[0.7], chosen=0.7),
        pretrain=_stage(shard_sets["general"], 6, convergence_step=2, convergence_window=2,
                        convergence_max_loss=1e-6, joint_step=None),
        joint=_stage(shard_sets["heads"], 2, convergence_step=None, joint_step=None, review_step=1))
    assert main(["program", str(path), "--auto-approve"]) == 0
    out = capsys.readouterr().out
    out_dir = tmp_path / "out"
    record = json.loads((out_dir / "program.json").read_text())
    assert [(r["stage"], r["run"], r["verdict"]) for r in record["runs"]] == [
        ("concept", "sigma_s max 0.7", "GO"), ("pretrain", "video-only", "NO-GO"), ("joint", "from scratch", "GO")]
    decisions = {d["stage"]: d for d in record["decisions"]}
    assert decisions["concept"]["decision"] == "go on"
    assert decisions["pretrain"]["decision"] == "option B: joint starts from scratch on talking-head data"
    assert "convergence" in decisions["pretrain"]["why"] and "NO-GO" in decisions["pretrain"]["why"]
    cfg = json.loads(next((out_dir / "concept" / "sigma-0.7").glob("run-*/train_config.json")).read_text())
    assert cfg["loss_options"]["sigma_struct_max"] == 0.7
    # pretrain stopped at its gate step, not at its total of 6, and trained the video stream alone
    pre_runs = list((out_dir / "pretrain").glob("run-*"))
    assert len(pre_runs) == 1
    records = read_metrics(pre_runs[0] / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(r["struct_loss"] is None for r in records)
    assert json.loads((pre_runs[0] / "train_config.json").read_text())["video_only"] is True
    # joint started from scratch (no init_from), and its review was answered by auto-approve at step 1
    joint_run = next((out_dir / "joint" / "from-scratch").glob("run-*"))
    assert json.loads((joint_run / "train_config.json").read_text())["init_from"] is None
    review = [g for g in read_gate_log(out_dir / "joint" / "from-scratch") if g["gate"] == "review"]
    assert [(g["verdict"], g["step"], g["numbers"]["answered_by"]) for g in review] == [("GO", 1, "auto-approve")]
    assert not (out_dir / "joint" / "from-pretrain").exists()
    assert "pretrain  video-only        NO-GO" in out and "after pretrain: option B" in out


@pytest.mark.usefixtures("prefect_test_server")
def test_a_converged_pretrain_hands_its_video_dit_to_joint(tmp_path, shard_sets):
    from flows.program import training_program

    path = _program(tmp_path, shard_sets,
                    pretrain=_stage(shard_sets["general"], 2, convergence_step=2, convergence_window=2,
                                    convergence_max_loss=1e9, joint_step=None),
                    joint=_stage(shard_sets["heads"], 1, convergence_step=None, joint_step=None))
    result = training_program(str(path))
    assert [(s["stage"], s["verdict"]) for s in result["stages"]] == [("pretrain", "GO"), ("joint", "GO")]
    out_dir = tmp_path / "out"
    weights = next((out_dir / "pretrain").glob("run-*/checkpoints/step00000002/weights.safetensors"))
    joint_run = next((out_dir / "joint" / "from-pretrain").glob("run-*"))
    assert json.loads((joint_run / "train_config.json").read_text())["init_from"] == str(weights)
    assert result["decisions"][0]["decision"] == "joint starts from pretrain's video DiT (step 2)"


@pytest.mark.usefixtures("prefect_test_server")
def test_a_concept_that_does_not_converge_stops_the_program_with_exit_3(tmp_path, shard_sets, capsys):
    from flows.cli import main

    path = _program(tmp_path, shard_sets,
                    concept=dict(_stage(shard_sets["heads"], 1, convergence_step=1, convergence_window=1,
                                        convergence_max_loss=1e-6, joint_step=None),
                                 sigma_struct_max=[0.7], chosen=0.7),
                    joint=_stage(shard_sets["heads"], 1))
    assert main(["program", str(path)]) == 3
    assert "NO-GO: concept (sigma_s max 0.7)" in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "program.json").read_text())
    assert [r["stage"] for r in record["runs"]] == ["concept"]  # joint never started
    assert record["decisions"][-1]["decision"] == "stop"


def test_init_from_belongs_to_the_stage_that_starts_the_video_dit(tmp_path):
    lite = load_program(REPO / "configs" / "program-lite.yaml")
    assert lite.pretrain.init_from.layers == "even" and Path(lite.pretrain.init_from.wan).is_absolute()
    stage = {"shards": ["s"], "gates": {"convergence_step": 5, "joint_step": None}, "train": {"total_steps": 5}}
    wan = {"wan": "w", "layers": "even"}
    with pytest.raises(ValidationError, match="give init_from to pretrain"):
        load_program({"name": "x", "out_dir": "o", "pretrain": stage, "joint": {"shards": ["s"], "init_from": wan}})
    with pytest.raises(ValidationError, match="concept trains a small model"):
        load_program({"name": "x", "out_dir": "o", "concept": {**stage, "init_from": wan}, "joint": {"shards": ["s"]}})
    with pytest.raises(ValidationError):
        load_program({"name": "x", "out_dir": "o", "joint": {"shards": ["s"], "init_from": {**wan, "layers": "odd"}}})
    assert load_program({"name": "x", "out_dir": "o", "joint": {"shards": ["s"], "init_from": wan}}).joint.init_from


@pytest.mark.usefixtures("prefect_test_server")
def test_pretrain_warm_starts_from_wan_and_the_export_says_so(tmp_path, shard_sets, capsys):
    """pretrain from a random Wan transformer (diffusers layout, 6 blocks -> 3: blocks 0, 2, 4), then joint from
    pretrain; the trained blocks sit next to the Wan blocks they came from, and the exported model records both."""
    from safetensors.torch import load_file

    from flows.cli import main
    from models.dryrun_models import tiny_wan_transformer, write_dryrun_wan_transformer

    wan_dir = write_dryrun_wan_transformer(tmp_path / "wan")
    pretrain = dict(_stage(shard_sets["general"], 2, convergence_step=2, convergence_window=2,
                           convergence_max_loss=1e9, joint_step=None), init_from={"wan": str(wan_dir)})
    path = _program(tmp_path, shard_sets, pretrain=pretrain,
                    joint=_stage(shard_sets["heads"], 1, convergence_step=None, joint_step=None))
    assert main(["program", str(path)]) == 0
    record = json.loads((tmp_path / "out" / "program.json").read_text())
    pre = record["runs"][0]
    assert pre["run"].startswith("video-only, from wan (") and pre["run"].endswith("blocks 0, 2, 4)")
    report = json.loads((Path(pre["run_dir"]) / "wan_transfer.json").read_text())
    assert report["layers"] == [0, 2, 4] and report["layout"] == "diffusers"
    trained = load_file(next(Path(pre["run_dir"]).glob("checkpoints/step00000002/weights.safetensors")))
    wan = tiny_wan_transformer().state_dict()
    d = lambda b: (trained["video_blocks.1.self_attn.q.weight"] - wan[f"blocks.{b}.attn1.to_q.weight"]).abs().max()  # noqa: E731
    assert d(2) < 0.01 < d(1)  # two steps at lr 1e-4 from Wan's block 2, not from block 1
    joint_run = next((tmp_path / "out" / "joint" / "from-pretrain").glob("run-*"))
    assert main(["export", str(joint_run), "-o", str(tmp_path / "export")]) == 0
    start = json.loads((tmp_path / "export" / "provenance.json").read_text())["initialised_from"]
    assert start["from"] == "pretrain" and start["pretrain_started"]["from"] == "wan"
    assert start["pretrain_started"]["layers"] == [0, 2, 4]


@pytest.mark.usefixtures("prefect_test_server")
def test_wan_weights_that_do_not_fit_stop_the_program_before_any_stage_with_exit_7(tmp_path, shard_sets, capsys):
    from flows.cli import main

    broken = tmp_path / "wan" / "diffusion_pytorch_model.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"truncated")
    concept = dict(_stage(shard_sets["heads"], 1, convergence_step=1, convergence_window=1,
                          convergence_max_loss=1e9, joint_step=None), sigma_struct_max=[0.7], chosen=0.7)
    pretrain = dict(_stage(shard_sets["general"], 2, convergence_step=2, convergence_window=2,
                           convergence_max_loss=1e9, joint_step=None), init_from={"wan": str(broken.parent)})
    path = _program(tmp_path, shard_sets, concept=concept, pretrain=pretrain,
                    joint=_stage(shard_sets["heads"], 1, convergence_step=None, joint_step=None))
    assert main(["program", str(path)]) == 7
    err = capsys.readouterr().err
    assert "pretrain.init_from" in err and "cannot read" in err and "Remove pretrain.init_from" in err
    assert not (tmp_path / "out" / "concept").exists()  # nothing ran


@pytest.mark.usefixtures("prefect_test_server")
def test_the_conditioning_gate_stops_joint_when_the_model_ignores_the_speech(tmp_path, shard_sets, capsys):
    """Two toy steps leave the zero-gated audio path all but closed: audio use 1.000 < 1.05 is a NO-GO at the
    gate's step (exit 3), its card shows the ratios and the fix, and training stops there."""
    from flows.cli import main

    path = _program(tmp_path, shard_sets,
                    joint=_stage(shard_sets["heads"], 4, convergence_step=None, joint_step=None, conditioning_step=2,
                                 conditioning_windows=4))
    assert main(["program", str(path)]) == 3
    err = capsys.readouterr().err
    assert "NO-GO: conditioning" in err and "audio use below 1.05" in err and "lipsync_loss_weight" in err
    gates = read_gate_log(tmp_path / "out" / "joint" / "from-scratch")
    verdict = next(g for g in gates if g["gate"] == "conditioning")
    assert verdict["step"] == 2 and verdict["verdict"] == "NO-GO"
    assert abs(verdict["numbers"]["audio_use"] - 1.0) < 0.01 and verdict["numbers"]["windows"] == 4
    record = json.loads(Path(verdict["numbers"]["record"]).read_text())
    assert {r["metric"] for r in record["rows"]} >= {"audio use (other clip's speech, mouth)",
                                                     "reference use (other identity, video)"}
    assert Path(verdict["numbers"]["plot"]).is_file()
    run = Path(verdict["run_dir"])
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 2  # it stopped at the gate
