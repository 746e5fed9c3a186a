"""Every deployment in prefect.yaml points at a real flow and its parameters validate against it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datasets_manifest import DATASETS

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def _load_flow(entrypoint: str):
    """The way a Prefect worker loads it."""
    from prefect.flows import load_flow_from_entrypoint

    path, name = entrypoint.split(":")
    return load_flow_from_entrypoint(f"{REPO / path}:{name}")


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_loads_and_parameters_validate(dep):
    from prefect import Flow

    flow = _load_flow(dep["entrypoint"])
    assert isinstance(flow, Flow)
    validated = flow.validate_parameters(dep.get("parameters", {}))
    assert set(dep.get("parameters", {})) <= set(validated)
    assert dep["work_pool"]["name"] == "dualforce-process"


def test_every_dataset_has_a_preprocess_deployment():
    names = {d["name"] for d in DEPLOYMENTS}
    assert {f"preprocess-{d}" for d in DATASETS if d != "samples"} <= names
    for d in DEPLOYMENTS:
        if d["name"].startswith("preprocess-"):
            assert d["parameters"]["dataset"] == d["name"].removeprefix("preprocess-")


def test_every_dataset_has_a_backfill_deployment_with_its_preprocess_parameters():
    by_name = {d["name"]: d for d in DEPLOYMENTS}
    for d in DATASETS:
        if d == "samples":
            continue
        backfill, pre = by_name[f"backfill-{d}"], by_name[f"preprocess-{d}"]
        assert backfill["entrypoint"] == "flows/backfill.py:backfill"
        options = backfill["parameters"]["preprocess_options"]
        top = {k: v for k, v in backfill["parameters"].items() if k != "preprocess_options"}
        assert {**top, **{k: v for k, v in options.items() if k != "checks"}} == pre["parameters"]


def test_grouped_parameters_are_checked_before_a_run_starts():
    from prefect.exceptions import ParameterTypeError

    flow = _load_flow("flows/preprocess.py:preprocess")
    base = {"dataset": "hdtf", "manifest": "m", "output_root": "o"}
    got = flow.validate_parameters({**base, "runner": {"runner": "ray", "batch_size": 4}})
    assert got["runner"].runner == "ray" and got["runner"].batch_size == 4 and got["windows"].window_frames == 33
    for wrong in ({"runner": {"runner": "slurm"}}, {"profile": "faces"}, {"weights": {"modles": "dryrun"}},
                  {"checks": {"audit_fraction": 1.5}}, {"windows": {"window_frames": -1}}):
        with pytest.raises(ParameterTypeError):
            flow.validate_parameters({**base, **wrong})


def test_the_training_config_is_typed_and_strict():
    from prefect.exceptions import ParameterTypeError

    from training.gates import ReviewOptions
    from training.launch import LaunchSpec
    from training.train_config import TrainConfig

    flow = _load_flow("flows/train.py:train_flow")
    base = {"shards": ["s/*.tar"], "out_dir": "o", "window_frames": 33}
    got = flow.validate_parameters({"config": {**base, "total_steps": 7, "validation": {"every": 2}},
                                    "gates": {"convergence_step": 5}})
    assert isinstance(got["config"], TrainConfig) and got["config"].total_steps == 7
    assert got["config"].validation.every == 2 and got["gates"].convergence_step == 5
    launched = flow.validate_parameters({"config": base, "launch": {"nproc_per_node": 8, "launcher": "deepspeed"},
                                         "review": {"auto_approve": True}})
    assert launched["launch"] == LaunchSpec(nproc_per_node=8, launcher="deepspeed")  # the fields declared once
    assert launched["review"] == ReviewOptions(auto_approve=True)
    for wrong in ({"config": {**base, "totl_steps": 7}}, {"config": {**base, "window_frames": "lots"}},
                  {"config": {**base, "validation": {"evry": 2}}}, {"config": base, "gates": {"convergence": 5}},
                  {"config": base, "launch": {"launcher": "mpirun"}}, {"config": base, "review": {"on_timeout": "later"}},
                  {"config": base, "launch": {"nproc_per_node": 2, "hostfile": 3}}):
        with pytest.raises(ParameterTypeError):
            flow.validate_parameters(wrong)


def test_a_wrong_parameter_is_caught():
    from prefect.exceptions import ParameterTypeError

    flow = _load_flow("flows/preprocess.py:preprocess")
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters({"dataset": "hdtf", "manifest": "m", "output_root": "o",
                                  "runner": {"batch_size": "lots"}})


GENERAL_VIDEO = {"panda70m", "voxceleb2"}  # the pretrain stage's data: video-only shards (configs/program-lite.yaml)


def _named(name: str) -> dict:
    return next(d for d in DEPLOYMENTS if d["name"] == name)


def _generic(deployment: dict, dataset: str) -> str:
    """A deployment with its dataset's name taken out: what two datasets' deployments must share."""
    import json

    return json.dumps(deployment, sort_keys=True).replace(dataset, "DATASET")


def test_per_dataset_deployments_differ_only_in_the_dataset_and_its_profile():
    datasets = [d for d in DATASETS if d != "samples"]
    for kind in ("preprocess", "backfill", "pipeline"):
        shapes: dict[bool, set[str]] = {}
        for d in datasets:
            if kind == "pipeline" and d in GENERAL_VIDEO:
                assert not any(x["name"] == f"pipeline-{d}" for x in DEPLOYMENTS)  # the pipeline trains talking heads
                continue
            shapes.setdefault(d in GENERAL_VIDEO, set()).add(_generic(_named(f"{kind}-{d}"), d))
        assert all(len(s) == 1 for s in shapes.values()), (kind, shapes)  # one shape per profile, nothing else
    for d in datasets:
        pre = _named(f"preprocess-{d}")["parameters"]
        assert pre["profile"] == ("general" if d in GENERAL_VIDEO else "talking_head")
        assert set(pre["weights"]) == ({"wan_vae", "wan_vae_subfolder"} if d in GENERAL_VIDEO else
                                       {"liveportrait_root", "hubert", "wan_vae", "wan_vae_subfolder"})


def test_the_program_file_reads_the_shard_sets_the_deployments_write():
    from training.program import load_program

    program = load_program(REPO / "configs" / "program-lite.yaml")
    written = {(REPO / d["parameters"]["output_root"] / d["parameters"]["dataset"] / "shards").resolve()
               for d in DEPLOYMENTS if d["name"].startswith("preprocess-")}
    for stage in ("pretrain", "joint"):
        for shards in getattr(program, stage).shards:
            assert Path(shards).resolve() in written, (stage, shards)
    assert Path(program.pretrain.init_from.wan).resolve().parent == (REPO / _named("preprocess-hdtf")["parameters"][
        "weights"]["wan_vae"]).resolve()  # the Wan transformer sits beside the VAE the deployments name
