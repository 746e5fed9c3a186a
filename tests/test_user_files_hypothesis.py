"""The files users hand us, fuzzed: program / ablation YAML, an exported model's config.json, manifest rows.

Each parser either accepts the file or refuses it with the error its command turns into an exit code (2 / 6 / 7,
tests/test_cli_contract.py); any other exception is a defect of ours. The mutations start from the real files
(configs/program-lite.yaml, configs/ablations/review.yaml, a tiny model's config.json, a sample manifest row), so
most cases are near misses rather than noise. CI runs a fixed-seed sample; `--runslow` (or DUALFORCE_SLOW=1)
runs fresh random ones.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasets_manifest.schema import MANIFEST_SCHEMA, ClipRow, read_manifest, rows_to_table
from models.dualforce import DualForce
from models.dualforce.config import get_config
from models.weights import WeightsError
from training.ablation import load_matrix
from training.program import ConfigFileError, load_program

REPO = Path(__file__).resolve().parents[1]
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
CI = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=_HEALTH)
SLOW = settings(max_examples=600, deadline=None, suppress_health_check=_HEALTH)

# values a user's file may hold where we expect something else
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.sampled_from([0, -1, 1, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["../../etc", "!!python/none", "", " ", "null", "1e309", "∞"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping / list, to pick one to mutate."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with 1-3 of its values replaced, deleted, or given an extra sibling key."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "extra"]))
        if action == "replace":
            parent[path[-1]] = draw(ODD_VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(ODD_VALUES)
    return data


def _yaml(data: dict) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return json.dumps(data, default=str)


PROGRAM = yaml.safe_load((REPO / "configs" / "program-lite.yaml").read_text())
MATRIX = yaml.safe_load((REPO / "configs" / "ablations" / "review.yaml").read_text())


def _accepts_or_refuses(load, text: str, path: Path) -> None:
    path.write_text(text)
    try:
        load(path)
    except (ConfigFileError, pydantic.ValidationError):
        pass  # exit 6 with the file named (flows/cli.py _check_input_file)


def _check_program(text: str, tmp_path: Path) -> None:
    _accepts_or_refuses(load_program, text, tmp_path / "program.yaml")


def _check_matrix(text: str, tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir(exist_ok=True)
    _accepts_or_refuses(load_matrix, text, tmp_path / "configs" / "matrix.yaml")


@CI
@given(data=mutated(PROGRAM))
def test_program_files(data, tmp_path):
    _check_program(_yaml(data), tmp_path)


@CI
@given(data=mutated(MATRIX))
def test_ablation_files(data, tmp_path):
    _check_matrix(_yaml(data), tmp_path)


@CI
@given(text=st.text(max_size=200))
def test_program_files_of_any_text(text, tmp_path):
    _check_program(text, tmp_path)


# ---- an exported model's config.json -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    DualForce(get_config("tiny", audio_dim=32)).save_pretrained(root / "model")
    return root / "model"


def _load_model_with(config: dict, folder: Path, tmp_path: Path) -> None:
    """from_pretrained on a copy whose config.json is `config`: loads, or WeightsError (exit 7), nothing else."""
    target = tmp_path / "model"
    target.mkdir(exist_ok=True)
    for name in ("model.safetensors", "provenance.json"):
        dest = target / name
        if not dest.exists():
            dest.symlink_to(folder / name)
    (target / "config.json").write_text(json.dumps(config, allow_nan=True, default=str))
    try:
        model = DualForce.from_pretrained(target)
    except WeightsError:
        return
    # accepted: it must then be the model the weights describe (a config that loads is one that fits every tensor)
    assert sum(p.numel() for p in model.parameters()) > 0


MODEL_CONFIG = json.loads(json.dumps(
    {k: v for k, v in get_config("tiny", audio_dim=32).__dict__.items()}, default=list))


@CI
@given(config=mutated(MODEL_CONFIG))
def test_model_config_files(config, exported, tmp_path):
    _load_model_with(config, exported, tmp_path)


# ---- manifest rows ---------------------------------------------------------------------------------------------

ROW = {"clip_id": "hdtf_WRA_x_0", "dataset": "hdtf", "source": "youtube:abc", "start_s": 0.0, "end_s": 4.0,
       "face_box": [10.0, 10.0, 100.0, 120.0], "identity": "x", "split": "train", "attribution": ""}
TYPED = {  # what each column may hold in a parquet file of our schema (face_box: a 4-list there)
    "clip_id": st.one_of(st.text(max_size=40), st.sampled_from(["../../x", "a/b", "a_b", "", ".", "x" * 300])),
    "dataset": st.one_of(st.text(max_size=10), st.sampled_from(["hdtf", "../x", ""])),
    "source": st.text(max_size=30), "identity": st.text(max_size=10), "split": st.text(max_size=6),
    "attribution": st.text(max_size=10),
    "start_s": st.floats(allow_nan=True, allow_infinity=True),
    "end_s": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    "face_box": st.one_of(st.none(), st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4)),
}


@st.composite
def manifest_rows(draw) -> list[dict]:
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        row = dict(ROW)
        for key in draw(st.lists(st.sampled_from(sorted(TYPED)), max_size=4, unique=True)):
            row[key] = draw(TYPED[key])
        rows.append(row)
    return rows


def _check_manifest(rows: list[dict], tmp_path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    pq.write_table(table, tmp_path / "m.parquet")
    good, bad = read_manifest(tmp_path / "m.parquet")  # never raises for a row
    assert len(good) + len(bad) == len(rows) and sorted({e.index for e in bad}) == sorted(e.index for e in bad)
    ids = [r.clip_id for r in good]
    assert len(set(ids)) == len(ids)  # distinct ids: two rows never share a folder or a tar key
    for row in good:
        assert "/" not in row.clip_id and row.clip_id not in ("", ".", "..") and len(row.clip_id) <= 200
        assert math.isfinite(row.start_s) and row.start_s >= 0
        assert row.end_s is None or (math.isfinite(row.end_s) and row.end_s > row.start_s)
        assert row.face_box is None or (len(row.face_box) == 4 and all(math.isfinite(v) for v in row.face_box))
        assert ClipRow(**row.model_dump()) == row  # what we accepted round-trips
    pq.write_table(rows_to_table(good), tmp_path / "again.parquet")
    assert read_manifest(tmp_path / "again.parquet")[0] == good


@CI
@given(rows=manifest_rows())
def test_manifest_rows(rows, tmp_path):
    _check_manifest(rows, tmp_path)


@pytest.mark.slow
@SLOW
@given(program=mutated(PROGRAM), matrix=mutated(MATRIX), config=mutated(MODEL_CONFIG), rows=manifest_rows())
def test_user_files_at_length(program, matrix, config, rows, exported, tmp_path):
    _check_program(_yaml(program), tmp_path)
    _check_matrix(_yaml(matrix), tmp_path)
    _load_model_with(config, exported, tmp_path)
    _check_manifest(rows, tmp_path)
