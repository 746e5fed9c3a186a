"""Exported models: save_pretrained -> from_pretrained is bit-identical; `dualforce export` turns a training run's
checkpoint (EMA or module weights) into that folder, with its provenance; nothing is unpickled."""
from __future__ import annotations

import json

import pytest
import torch

from models.dualforce import DualForce, SamplerConfig, build_model, generate
from models.dualforce.serialization import CONFIG_FILE, WEIGHTS_FILE
from models.weights import WeightsError
from tests.test_dualforce_model import activate_zero_paths, make_inputs, run
from tests.training_shards import train_config, train_in_process, write_shards
from training import checkpoint
from training.export import ExportError, export_run
from training.train_config import TrainConfig

torch.set_num_threads(1)


def test_save_and_load_are_bit_identical(tmp_path):
    model = build_model("tiny", bridge_strategy="full", struct_tokens_per_frame=3).eval()
    activate_zero_paths(model)
    model.save_pretrained(tmp_path / "m", provenance={"step": 7})
    loaded = DualForce.from_pretrained(tmp_path / "m")
    assert model.provenance == {} and loaded.provenance == {"step": 7}
    assert loaded.config == model.config and not loaded.training
    inp = make_inputs(model, seed=2)
    with torch.no_grad():
        (v0, s0), (v1, s1) = run(model, inp), run(loaded, inp)
    assert torch.equal(v0, v1) and torch.equal(s0, s1)
    ref, audio = inp["reference_latent"][:1], inp["audio"][:1]
    a = generate(model, ref, audio, SamplerConfig(steps=2), torch.Generator().manual_seed(0))
    b = generate(loaded, ref, audio, SamplerConfig(steps=2), torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # safetensors + JSON only: the folder holds no pickle
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "provenance.json"]
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["struct_tokens_per_frame"] == 3
    # the weights get the mode the umask gives the other files (safetensors alone writes 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_a_folder_that_does_not_fit_is_refused(tmp_path):
    build_model("tiny").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(dict(cfg, video_dims=3)))
    with pytest.raises(WeightsError, match="does not know: video_dims"):  # the CLI's exit 7, before any build
        DualForce.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(dict(cfg, video_blocks=4)))  # one block more than saved
    with pytest.raises(WeightsError, match="missing keys"):  # from the file's header, before its data is read
        DualForce.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not an exported DualForce model"):
        DualForce.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run of 2 steps with EMA and the weights file, as `dualforce train` leaves it."""
    root = tmp_path_factory.mktemp("export")
    write_shards(root / "shards", n_shards=1, per_shard=2, seed=3)
    (root / "run").mkdir()
    (root / "run" / "notes.txt").write_text("mine")  # a user's file in the out_dir train is given: it stays
    train_in_process(TrainConfig.from_dict(train_config(root / "shards", root / "run", total_steps=2, ckpt_every=2,
                                                        ema_decay=0.5, save_weights=True)))
    return root / "run"


def test_export_takes_the_ema_by_default_and_the_module_on_request(trained_run, tmp_path):
    from safetensors.torch import load_file

    from training.safe_checkpoint import load_weights_only

    tag_dir = trained_run / "checkpoints" / "step00000002"
    ema = load_weights_only(tag_dir / "trainer_state_rank0.pt")["ema"]
    module = load_file(str(tag_dir / checkpoint.WEIGHTS_FILE))
    assert any(not torch.equal(ema[k], module[k]) for k in ema)  # EMA and module really differ after 2 steps

    result = export_run(trained_run, tmp_path / "ema")
    assert (result.step, result.weights) == (2, "ema")
    exported = DualForce.from_pretrained(tmp_path / "ema")
    assert all(torch.equal(exported.state_dict()[k], ema[k]) for k in ema)
    provenance = exported.provenance
    assert provenance["checkpoint"] == "step00000002" and provenance["weights"] == "ema"
    assert provenance["training_data"][0]["shards"].endswith("shard-*.tar")

    result = export_run(trained_run, tmp_path / "module", weights="module")
    exported = DualForce.from_pretrained(tmp_path / "module")
    assert result.weights == "module" and result.source == checkpoint.WEIGHTS_FILE
    assert all(torch.equal(exported.state_dict()[k], module[k]) for k in module)
    # without the weights file, DeepSpeed's module states are read (weights-only) and give the same tensors
    (tag_dir / checkpoint.WEIGHTS_FILE).rename(tmp_path / "aside.safetensors")
    try:
        result = export_run(trained_run, tmp_path / "from-states", weights="module")
    finally:
        (tmp_path / "aside.safetensors").rename(tag_dir / checkpoint.WEIGHTS_FILE)
    assert result.source == "mp_rank_00_model_states.pt"
    from_states = DualForce.from_pretrained(tmp_path / "from-states").state_dict()
    assert all(torch.equal(from_states[k], module[k]) for k in module)


def test_export_command_and_its_errors(trained_run, tmp_path, capsys):
    from flows.cli import main

    assert main(["export", str(trained_run), "-o", str(tmp_path / "out"), "--weights", "module"]) == 0
    assert "exported step 2 (module weights" in capsys.readouterr().out
    assert (tmp_path / "out" / WEIGHTS_FILE).is_file()
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert main(["export", str(trained_run), "-o", str(tmp_path / "x"), "--tag", "step00000099"]) == 2
    with pytest.raises(ExportError, match="does not hold this run's model"):
        cfg = json.loads((trained_run / "train_config.json").read_text())
        (tmp_path / "wide").mkdir()
        (tmp_path / "wide" / "train_config.json").write_text(json.dumps(dict(cfg, model_overrides={"video_dim": 96})))
        (tmp_path / "wide" / "checkpoints").symlink_to(trained_run / "checkpoints")
        export_run(tmp_path / "wide", tmp_path / "y", weights="module")


def test_re_export_replaces_an_earlier_export_and_leaves_the_run_alone(trained_run, tmp_path):
    from safetensors.torch import load_file

    assert (trained_run / "notes.txt").read_text() == "mine"  # training wrote beside it, never over it
    out = tmp_path / "model"
    assert export_run(trained_run, out).weights == "ema"
    export_run(trained_run, out, weights="module")  # over the earlier export: replaced
    module = load_file(str(trained_run / "checkpoints" / "step00000002" / checkpoint.WEIGHTS_FILE))
    exported = DualForce.from_pretrained(out)
    assert exported.provenance["weights"] == "module"
    assert all(torch.equal(exported.state_dict()[k], module[k]) for k in module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .model.tmp-* / .model.old-* left


def test_export_command_refuses_a_folder_that_is_not_an_export(trained_run, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("notes")
    assert main(["export", str(trained_run), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is not an earlier DualForce export (it holds mine.txt)" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
