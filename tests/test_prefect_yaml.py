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


def test_a_wrong_parameter_is_caught():
    from prefect.exceptions import ParameterTypeError

    flow = _load_flow("flows/preprocess.py:preprocess")
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters({"dataset": "hdtf", "manifest": "m", "output_root": "o", "batch_size": "lots"})
