"""The input contract of every command, as a table: usage errors exit 2 before any work, unusable inputs 6 naming
the input, broken model / weight folders 7 listing the problem; never a traceback, nothing written outside the
output folder, an earlier output intact after a failed re-run. Through `main()` in-process, so the table is fast."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import main
from models.dualforce import DualForce
from models.dualforce.config import get_config
from tasks.feature_models import dryrun_models
from tasks.reasons import shorten
from tests.test_generate import _provenance

REPO = Path(__file__).resolve().parents[1]
IN_A_PROCESS = {"evaluate"}  # commands run as `python -m flows.cli`: the entry point itself


@pytest.fixture(scope="module")
def world(tmp_path_factory, samples_dir):
    """Inputs every case starts from: a tiny exported model, a face, speech, a program file, a shard set's stats."""
    root = tmp_path_factory.mktemp("contract")
    torch.manual_seed(0)
    DualForce(get_config("tiny", audio_dim=32)).save_pretrained(root / "model", _provenance(dryrun_models()))
    shutil.copy(samples_dir / "yongen.mp4", root / "speech.mp4")
    (root / "not-an-image.png").write_text("this is text, not a picture\n")
    (root / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(64))
    (root / "python-tag.yaml").write_text("name: x\nstages: !!python/object/apply:os.system ['echo pwned']\n")
    (root / "a-list.yaml").write_text("- concept\n- pretrain\n")
    (root / "broken.yaml").write_text("name: [unclosed\n")
    (root / "unknown-key.yaml").write_text("name: x\nno_such_field: 1\n")
    train_only = root / "train-only"
    train_only.mkdir()
    (train_only / "stats.json").write_text(json.dumps(
        {"samples": 4, "shards": 1, "clips": 4, "per_split": {"train": {"samples": 4, "shards": 1, "clips": 4}}}))
    return root


def _model_with(world: Path, name: str, edit) -> Path:
    """A copy of the exported model with one file changed by `edit(folder)`."""
    folder = world / f"model-{name}"
    if not folder.exists():
        shutil.copytree(world / "model", folder)
        edit(folder)
    return folder


def _absurd_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["video_dim"] = 1_000_000_000
    (folder / "config.json").write_text(json.dumps(config))


def _missing_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, folder / "model.safetensors")


def _generate(world, *extra, model=None):
    return ["generate", "--model", str(model or world / "model"), "--image", str(world / "face.png"),
            "--audio", str(world / "speech.mp4"), "-o", "OUT/out.mp4", *extra]


# (case id, argv builder (world) -> list, exit code, text the message must hold)
CASES = [
    ("generate-steps-0", lambda w: _generate(w, "--steps", "0"), 2, "argument --steps"),
    ("generate-steps-word", lambda w: _generate(w, "--steps", "many"), 2, "argument --steps"),
    ("generate-seconds-negative", lambda w: _generate(w, "--seconds", "-1"), 2, "argument --seconds"),
    ("generate-chunk-frames-0", lambda w: _generate(w, "--chunk-frames", "0"), 2, "argument --chunk-frames"),
    ("generate-cache-window-negative", lambda w: _generate(w, "--cache-window", "-3"), 2, "argument --cache-window"),
    ("generate-attention-unknown", lambda w: _generate(w, "--attention", "magic"), 2, "argument --attention"),
    ("generate-absurd-config", lambda w: _generate(w, model=_model_with(w, "absurd", _absurd_config)), 7,
     "config.json"),
    ("generate-not-safetensors", lambda w: _generate(w, model=_model_with(
        w, "garbage", lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file" * 10))), 7,
     "model.safetensors"),
    ("generate-truncated-weights", lambda w: _generate(w, model=_model_with(
        w, "truncated", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:5000]))), 7, "model.safetensors"),
    ("generate-missing-tensor", lambda w: _generate(w, model=_model_with(w, "missing", _missing_tensor)), 7,
     "missing keys"),
    ("generate-config-not-json", lambda w: _generate(w, model=_model_with(
        w, "badjson", lambda f: (f / "config.json").write_text("{video_dim: 3"))), 7, "config.json"),
    ("generate-no-model", lambda w: _generate(w, model=w / "no-such-model"), 2, "no-such-model"),
    ("program-python-tag", lambda w: ["program", str(w / "python-tag.yaml")], 6, "python-tag.yaml"),
    ("program-not-a-mapping", lambda w: ["program", str(w / "a-list.yaml")], 6, "a-list.yaml"),
    ("program-broken-yaml", lambda w: ["program", str(w / "broken.yaml")], 6, "broken.yaml"),
    ("program-unknown-key", lambda w: ["program", str(w / "unknown-key.yaml")], 6, "no_such_field"),
    ("program-no-file", lambda w: ["program", str(w / "nope.yaml")], 2, "nope.yaml"),
    ("ablate-python-tag", lambda w: ["ablate", str(w / "python-tag.yaml")], 6, "python-tag.yaml"),
    ("ablate-not-a-mapping", lambda w: ["ablate", str(w / "a-list.yaml")], 6, "a-list.yaml"),
    ("ablate-broken-yaml", lambda w: ["ablate", str(w / "broken.yaml")], 6, "broken.yaml"),
    ("ablate-no-file", lambda w: ["ablate", str(w / "nope.yaml")], 2, "nope.yaml"),
    ("evaluate-no-test-split", lambda w: ["evaluate", "--model", str(w / "model"), "--shards", str(w / "train-only"),
                                          "--split", "test", "-o", "OUT/eval"], 6, "--split train"),
    ("evaluate-not-a-shard-set", lambda w: ["evaluate", "--model", str(w / "model"), "--shards", str(w / "model"),
                                            "-o", "OUT/eval"], 6, "not a shard set"),
    ("evaluate-clips-0", lambda w: ["evaluate", "--model", str(w / "model"), "--shards", str(w / "train-only"), "--clips", "0",
                                    "-o", "OUT/eval"], 2, "argument --clips"),
    ("evaluate-steps-0", lambda w: ["evaluate", "--model", str(w / "model"), "--shards", str(w / "train-only"), "--steps", "0",
                                    "-o", "OUT/eval"], 2, "argument --steps"),
    ("train-config-not-json", lambda w: ["train", "--config", "{window: 3"], 2, "JSON"),
    ("train-config-a-list", lambda w: ["train", "--config", "[1, 2]"], 2, "list"),
    ("model-info-init-from-bogus", lambda w: ["model-info", "--init-from", "somewhere"], 2, "wan:PATH"),
]


def _inputs(world: Path) -> list[Path]:
    """The input files, less the broken model copies the cases make on first use."""
    return sorted(p.relative_to(world) for p in world.rglob("*") if not p.relative_to(world).parts[0].startswith("model-"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_exit_code_and_one_clear_line(case, world, tmp_path, monkeypatch, capsys):
    name, argv, code, names = case
    if name.startswith("generate") and not (world / "face.png").exists():
        import cv2

        from tasks.media import read_frames

        frame = read_frames(world / "speech.mp4")[0]
        cv2.imwrite(str(world / "face.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    before = _inputs(world)
    monkeypatch.chdir(tmp_path)
    args = [a.replace("OUT/", str(tmp_path / "out") + "/") for a in argv(world)]
    if args[0] in IN_A_PROCESS:  # a flow inside: its Prefect console handler outlives pytest's capture
        run = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
        got, message = run.returncode, run.stderr + run.stdout
    else:
        try:
            got = main(args)
        except SystemExit as exc:
            got = exc.code
        text = capsys.readouterr()
        message = text.err + text.out
    assert got == code, f"{name}: exit {got}, expected {code}:\n{message}"
    assert names in message, f"{name}: the message does not name {names!r}:\n{message}"
    assert "Traceback" not in message
    assert _inputs(world) == before  # nothing written beside the inputs
    assert not (tmp_path / "out" / "out.mp4").exists()


def test_a_failed_generate_leaves_an_earlier_output_intact(world, tmp_path):
    out = tmp_path / "out.mp4"
    args = ["--image", str(world / "face.png"), "--audio", str(world / "speech.mp4"), "-o", str(out), "--steps", "1",
            "--seconds", "0.5", "--no-progress"]
    assert main(["generate", "--model", str(world / "model"), *args]) == 0
    earlier = out.read_bytes(), (tmp_path / "out.mp4.json").read_bytes()
    garbage = _model_with(world, "garbage",
                          lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file" * 10))
    assert main(["generate", "--model", str(garbage), *args]) == 7
    assert (out.read_bytes(), (tmp_path / "out.mp4.json").read_bytes()) == earlier


@pytest.mark.parametrize("text,limit", [
    ("pretrain converged at step 400 (loss 0.08); every gate judged GO; joint starts from its video DiT", 60),
    ("word " * 100, 200),
    ("x" * 300, 200),
])
def test_reasons_are_shortened_at_a_clause_never_mid_word(text, limit):
    short = shorten(text, limit)
    assert len(short) <= limit and short.endswith("...")
    kept = short[:-3]
    assert " ".join(text.split()).startswith(kept)
    if " " in text.strip():
        assert text[len(kept)] in " ;,."  # the cut is at a boundary, not inside a word
    assert shorten("short reason", limit) == "short reason"
