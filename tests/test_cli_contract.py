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
IN_A_PROCESS = {"evaluate"}  # commands run as `python -m flows.cli`: a flow inside
# cases run through `./run` itself, the user's entry point (these also log through Prefect's console handler,
# which outlives pytest's capture in-process)
THROUGH_RUN = {"generate-image-not-an-image", "generate-audio-not-media", "plan-no-manifest"}


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
    (root / "bad.json").write_text("{not json")
    (root / "number.json").write_text("42")
    (root / "bad.csv").write_text("a,b\n1,2\n")
    (root / "garbage.parquet").write_text("this is not parquet\n")
    (root / "empty").mkdir()
    (root / "user-folder").mkdir()
    (root / "user-folder" / "notes.txt").write_text("mine")
    (root / "broken-run").mkdir()
    (root / "broken-run" / "train_config.json").write_text("{not json")
    (root / "unindexed-shards").mkdir()
    (root / "indexed-shards").mkdir()
    (root / "indexed-shards" / "index.parquet").write_text("an index, with no steps/ beside it")
    # found by tests/test_user_files_hypothesis.py: a None where a count goes, a mapping field given a scalar
    program = (REPO / "configs" / "program-lite.yaml").read_text()
    (root / "null-steps.yaml").write_text(program.replace("total_steps: 100000", "total_steps: null"))
    matrix = (REPO / "configs" / "ablations" / "review.yaml").read_text()
    (root / "scalar-overrides.yaml").write_text(matrix + "\n  - {name: bad, review_item: bridge, train: {model_overrides: 3}}\n")
    (root / "unknown-variant.yaml").write_text("base: {}\nvariants: {a: {no_such_field: 1}}\n")
    from datasets_manifest import manifest_command

    manifest_command("samples", str(samples_dir), str(root / "samples.parquet"))
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


def _generate(world, *extra, model=None, image=None, audio=None):
    return ["generate", "--model", str(model or world / "model"), "--image", str(image or world / "face.png"),
            "--audio", str(audio or world / "speech.mp4"), *extra, "-o", "OUT/out.mp4"]


def _evaluate(world, *extra):
    return ["evaluate", "--model", str(world / "model"), "--shards", str(world / "train-only"), *extra, "-o", "OUT/eval"]


def _pre(command, manifest, *extra, dataset="t", models="dryrun"):
    return [command, dataset, "--manifest", str(manifest), "--out", "OUT/p", *(["--models", models] if models else []),
            *extra]


def _pipe(world, *extra, manifest=None, dataset="t", preprocess='{"weights": {"models": "dryrun"}}'):
    return ["pipeline", dataset, "--manifest", str(manifest or world / "samples.parquet"), "--out", "OUT/p",
            "--preprocess", preprocess, *extra]


def _train(world, **config):
    return ["train", "--config", json.dumps({"shards": [str(world / "train-only")], "out_dir": "OUT/t", "window_frames": 9,
                                             **config})]


def _plan(world, *extra):
    return ["plan", "t", "--cpus", "4", "--gpus", "1", "--manifest", str(world / "samples.parquet"), *extra]


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
    ("model-info-unknown-config", lambda w: ["model-info", "huge"], 2, "huge"),
    ("model-info-init-from-missing", lambda w: ["model-info", "tiny", "--init-from", f"wan:{w / 'nope'}"], 7, "nope"),
    ("model-info-init-from-not-weights", lambda w: ["model-info", "tiny", "--init-from", f"wan:{w / 'bad.json'}"], 7,
     "bad.json"),
    ("model-info-init-from-empty-folder", lambda w: ["model-info", "tiny", "--init-from", f"wan:{w / 'empty'}"], 7,
     "empty"),
    ("model-info-layers-bogus", lambda w: ["model-info", "tiny", "--init-from", f"wan:{w / 'empty'}", "--layers", "0,x"],
     2, "0,x"),
    # manifest
    ("manifest-unknown-dataset", lambda w: ["manifest", "nosuch", str(w / "empty"), "-o", "OUT/m.parquet"], 2, "nosuch"),
    ("manifest-no-source", lambda w: ["manifest", "hdtf", str(w / "nope"), "-o", "OUT/m.parquet"], 2, "nope"),
    ("manifest-celebvhq-not-json", lambda w: ["manifest", "celebvhq", str(w / "bad.json"), "-o", "OUT/m.parquet"], 6,
     "bad.json"),
    ("manifest-talkvid-a-number", lambda w: ["manifest", "talkvid", str(w / "number.json"), "-o", "OUT/m.parquet"], 6,
     "number.json"),
    ("manifest-panda70m-wrong-columns", lambda w: ["manifest", "panda70m", str(w / "bad.csv"), "-o", "OUT/m.parquet"],
     6, "videoID"),
    ("manifest-hdtf-empty-folder", lambda w: ["manifest", "hdtf", str(w / "empty"), "-o", "OUT/m.parquet"], 6, "empty"),
    ("manifest-out-is-a-folder", lambda w: ["manifest", "samples", str(w / "empty"), "-o", str(w / "user-folder")], 2,
     "is a folder"),
    ("manifest-mead-no-videos", lambda w: ["manifest", "mead", str(w / "empty"), "-o", "OUT/m.parquet"], 6,
     "no MEAD videos"),
    ("manifest-seed-word", lambda w: ["manifest", "hdtf", str(w / "empty"), "-o", "OUT/m.parquet", "--seed", "x"], 2,
     "argument --seed"),
    # preprocess / backfill: refused before the flow (and its embedded server) starts
    ("preprocess-no-manifest", lambda w: _pre("preprocess", w / "nope.parquet"), 2, "nope.parquet"),
    ("preprocess-manifest-not-parquet", lambda w: _pre("preprocess", w / "garbage.parquet"), 6, "garbage.parquet"),
    ("preprocess-workers-0", lambda w: _pre("preprocess", w / "samples.parquet", "--workers", "0"), 2,
     "argument --workers"),
    ("preprocess-batch-size-0", lambda w: _pre("preprocess", w / "samples.parquet", "--batch-size", "0"), 2,
     "argument --batch-size"),
    ("preprocess-window-frames-0", lambda w: _pre("preprocess", w / "samples.parquet", "--window-frames", "0"), 2,
     "argument --window-frames"),
    ("preprocess-window-frames-not-4n+1", lambda w: _pre("preprocess", w / "samples.parquet", "--window-frames", "32"),
     2, "must be 4n+1"),
    ("preprocess-audit-fraction-2", lambda w: _pre("preprocess", w / "samples.parquet", "--audit-fraction", "2"), 2,
     "argument --audit-fraction"),
    ("preprocess-dataset-escapes", lambda w: _pre("preprocess", w / "samples.parquet", dataset="../evil"), 2, "../evil"),
    ("preprocess-unknown-step", lambda w: _pre("preprocess", w / "samples.parquet", "--steps", "crop", "teleport"), 2,
     "teleport"),
    ("preprocess-real-run-without-weights", lambda w: _pre("preprocess", w / "samples.parquet", models=None), 2,
     "--liveportrait-root"),
    ("preprocess-unknown-profile", lambda w: _pre("preprocess", w / "samples.parquet", "--profile", "cartoon"), 2,
     "argument --profile"),
    ("backfill-no-manifest", lambda w: _pre("backfill", w / "nope.parquet"), 2, "nope.parquet"),
    ("backfill-manifest-not-parquet", lambda w: _pre("backfill", w / "garbage.parquet"), 6, "garbage.parquet"),
    ("backfill-workers-0", lambda w: _pre("backfill", w / "samples.parquet", "--workers", "0"), 2, "argument --workers"),
    ("backfill-unknown-step", lambda w: _pre("backfill", w / "samples.parquet", "--steps", "teleport"), 2, "teleport"),
    ("backfill-dataset-escapes", lambda w: _pre("backfill", w / "samples.parquet", dataset="a/b"), 2, "a/b"),
    # pipeline
    ("pipeline-no-manifest", lambda w: _pipe(w, manifest=w / "nope.parquet"), 2, "nope.parquet"),
    ("pipeline-unknown-models", lambda w: _pipe(w, preprocess='{"weights": {"models": "magic"}}'), 2, "weights.models"),
    ("pipeline-unknown-group", lambda w: _pipe(w, preprocess='{"nope": 1}'), 2, "--preprocess nope"),
    ("pipeline-unknown-train-key", lambda w: _pipe(w, "--train", '{"no_such": 1}'), 2, "--train no_such"),
    ("pipeline-gates-not-json", lambda w: _pipe(w, "--gates", "{x"), 2, "--gates"),
    ("pipeline-nproc-0", lambda w: _pipe(w, "--nproc-per-node", "0"), 2, "argument --nproc-per-node"),
    ("pipeline-dataset-escapes", lambda w: _pipe(w, dataset="../x"), 2, "../x"),
    # train
    ("train-config-no-file", lambda w: ["train", "--config", str(w / "nope.json")], 2, "nope.json"),
    ("train-config-unknown-key", lambda w: ["train", "--config", '{"no_such_key": 1}'], 2, "no_such_key"),
    ("train-config-lr-negative", lambda w: _train(w, lr=-1), 2, "lr=-1"),
    ("train-config-steps-0", lambda w: _train(w, total_steps=0), 2, "total_steps=0"),
    ("train-shards-missing", lambda w: _train(w, shards=[str(w / "nope")]), 2, "nope"),
    ("train-shards-hold-none", lambda w: _train(w, shards=[str(w / "empty")]), 6, "holds no shard"),
    ("train-gates-unknown-key", lambda w: _train(w) + ["--gates", '{"nope": 1}'], 2, "--gates nope"),
    ("train-nproc-0", lambda w: _train(w) + ["--nproc-per-node", "0"], 2, "argument --nproc-per-node"),
    ("program-review-timeout-0", lambda w: ["program", str(w / "broken.yaml"), "--review-timeout", "0"], 2,
     "argument --review-timeout"),
    ("program-null-count", lambda w: ["program", str(w / "null-steps.yaml")], 6, "total_steps"),
    ("ablate-scalar-overrides", lambda w: ["ablate", str(w / "scalar-overrides.yaml")], 6, "model_overrides"),
    ("ablate-unknown-variant-key", lambda w: ["ablate", str(w / "unknown-variant.yaml")], 6, "unknown-variant.yaml"),
    # audit
    ("audit-no-shards", lambda w: ["audit", str(w / "nope")], 2, "nope"),
    ("audit-not-a-shard-set", lambda w: ["audit", str(w / "unindexed-shards")], 6, "index.parquet"),
    ("audit-no-steps", lambda w: ["audit", str(w / "indexed-shards")], 2, "--steps-root"),
    ("audit-fraction-2", lambda w: ["audit", str(w / "indexed-shards"), "--fraction", "2"], 2, "--fraction"),
    ("audit-fraction-0", lambda w: ["audit", str(w / "indexed-shards"), "--fraction", "0"], 2, "argument --fraction"),
    # export
    ("export-no-run", lambda w: ["export", str(w / "nope"), "-o", "OUT/e"], 2, "not a training run"),
    ("export-empty-folder", lambda w: ["export", str(w / "empty"), "-o", "OUT/e"], 2, "not a training run"),
    ("export-broken-config", lambda w: ["export", str(w / "broken-run"), "-o", "OUT/e"], 6, "train_config.json"),
    ("export-into-a-users-folder", lambda w: ["export", str(w / "broken-run"), "-o", str(w / "user-folder")], 2,
     "user-folder"),
    ("export-weights-unknown", lambda w: ["export", str(w / "broken-run"), "-o", "OUT/e", "--weights", "best"], 2,
     "argument --weights"),
    # generate: the inputs
    ("generate-no-image", lambda w: _generate(w, image=w / "nope.png"), 2, "nope.png"),
    ("generate-no-audio", lambda w: _generate(w, audio=w / "nope.wav"), 2, "nope.wav"),
    ("generate-image-not-an-image", lambda w: _generate(w, image=w / "not-an-image.png"), 6, "not-an-image.png"),
    ("generate-audio-not-media", lambda w: _generate(w, audio=w / "bad.json"), 6, "bad.json"),
    ("generate-out-a-folder", lambda w: _generate(w)[:-1] + [str(w / "user-folder")], 2, "user-folder"),
    ("evaluate-long-seconds-negative", lambda w: _evaluate(w, "--long-seconds", "-1"), 2, "argument --long-seconds"),
    ("evaluate-conditioning-windows-negative", lambda w: _evaluate(w, "--conditioning-windows", "-1"), 2,
     "argument --conditioning-windows"),
    # plan
    ("plan-cpus-0", lambda w: ["plan", "t", "--cpus", "0", "--gpus", "1"], 2, "--cpus"),
    ("plan-gpus-negative", lambda w: ["plan", "t", "--cpus", "4", "--gpus", "-1"], 2, "--gpus"),
    ("plan-no-manifest", lambda w: ["plan", "t", "--cpus", "4", "--gpus", "1", "--manifest", str(w / "nope.parquet")], 2,
     "nope.parquet"),
    ("plan-manifest-not-parquet", lambda w: ["plan", "t", "--cpus", "4", "--gpus", "1", "--manifest",
                                             str(w / "garbage.parquet")], 6, "garbage.parquet"),
    ("plan-rate-without-value", lambda w: _plan(w, "--rate", "crop"), 2, "--rate"),
    ("plan-no-ledger", lambda w: _plan(w, "--ledger", str(w / "nope")), 2, "nope"),
    # server: refused before anything starts
    ("server-port-0", lambda w: ["server", "up", "--port", "0", "--state-dir", "OUT/state"], 2, "argument --port"),
    ("server-port-too-big", lambda w: ["server", "up", "--port", "99999", "--state-dir", "OUT/state"], 2,
     "argument --port"),
    ("server-poll-negative", lambda w: ["server", "up", "--poll-seconds", "-1", "--state-dir", "OUT/state"], 2,
     "argument --poll-seconds"),
    ("server-state-dir-a-file", lambda w: ["server", "up", "--state-dir", str(w / "bad.json")], 2, "bad.json"),
    ("server-down-timeout-0", lambda w: ["server", "down", "--timeout", "0", "--state-dir", "OUT/state"], 2,
     "argument --timeout"),
    ("server-down-nothing-there", lambda w: ["server", "down", "--state-dir", "OUT/state"], 0, "nothing to stop"),
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
    if args[0] in IN_A_PROCESS or name in THROUGH_RUN:
        entry = [str(REPO / "run")] if name in THROUGH_RUN else [sys.executable, "-m", "flows.cli"]
        run = subprocess.run([*entry, *args], capture_output=True, text=True, timeout=300,
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
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))  # nor any output
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["out"]  # nor in the working dir


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
