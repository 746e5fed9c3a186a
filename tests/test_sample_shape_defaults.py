"""One window length (`window_frames`) and one HuBERT width with one default each, from models/sample_shape.py:
every layer that has a default (the shard writer, the VAE step, the preprocess options and CLI, the storage plan,
the deployments, the trainer, the model) agrees with it, and configs that use the old names still load."""
import inspect
import json

import pytest
import yaml
from conftest import REPO
from pydantic import ValidationError
from training_shards import CROP, write_shards

from datasets_manifest.summary import shard_bytes_per_window, storage_bytes_per_second
from flows.cli import build_parser, preprocess_options_of
from flows.cli_checks import InputRejected, check_train_inputs
from flows.preprocess_options import WindowOptions
from models.dualforce.config import DualForceConfig
from models.sample_shape import HUBERT_LARGE_DIM, WINDOW_FRAMES
from tasks import contract
from tasks.steps.shard import ShardConfig
from tasks.steps.vae_latents import VaeLatentConfig
from training.train_config import TrainConfig


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_every_window_default_is_the_one_window_frames():
    args = build_parser().parse_args(["preprocess", "d", "--manifest", "m.parquet", "--out", "o"])
    defaults = {
        "ShardConfig": ShardConfig().window_frames,
        "VaeLatentConfig": VaeLatentConfig().window_frames,
        "WindowOptions": WindowOptions().window_frames,
        "preprocess --window-frames": preprocess_options_of(args).windows.window_frames,
        "WindowOptions.shard_config": WindowOptions().shard_config().window_frames,
        "storage plan": _default(shard_bytes_per_window, "window_frames"),
        "storage rates": _default(storage_bytes_per_second, "window_frames"),
        "tasks.contract": contract.WINDOW_FRAMES,
    }
    assert defaults == dict.fromkeys(defaults, WINDOW_FRAMES)
    assert contract.latent_frames(WINDOW_FRAMES) == 9 and contract.video_frames(9) == WINDOW_FRAMES


def test_the_deployments_window_settings_are_the_default():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    found = []
    for dep in spec["deployments"]:
        params = dep.get("parameters", {})
        if "windows" in params and "window_frames" in params["windows"]:
            found.append(params["windows"]["window_frames"])
        if "config" in params and "window_frames" in params["config"]:
            found.append(params["config"]["window_frames"])
    assert found and set(found) == {WINDOW_FRAMES}


def test_every_audio_width_default_is_hubert_large():
    train = TrainConfig(shards=["-"], out_dir="-", window_frames=WINDOW_FRAMES)
    assert train.audio_dim == DualForceConfig().audio_dim == HUBERT_LARGE_DIM == contract.HUBERT_LARGE_DIM == 1024
    assert _default(shard_bytes_per_window, "hubert_dim") == HUBERT_LARGE_DIM
    assert train.model_config().audio_dim == HUBERT_LARGE_DIM


def test_training_configs_with_the_old_window_names_still_load():
    old = TrainConfig.from_dict({"shards": ["s"], "out_dir": "o", "window": 17, "train_window": 9})
    new = TrainConfig.from_dict({"shards": ["s"], "out_dir": "o", "window_frames": 17, "train_window_frames": 9})
    assert old == new and new.effective_window_frames == 9
    with pytest.raises(ValueError, match="both window_frames and window"):
        TrainConfig.from_dict({"shards": ["s"], "out_dir": "o", "window": 17, "window_frames": 17})


def test_window_options_read_the_old_window_n_and_refuse_a_length_that_is_not_4n_plus_1():
    assert WindowOptions(window_n=8).window_frames == 33 == WindowOptions.model_validate({"window_n": 8}).window_frames
    assert WindowOptions(window_n=1).shard_config().window_frames == 5
    for bad in ({"window_frames": 32}, {"window_frames": 0}, {"window_n": 8, "window_frames": 33}):
        with pytest.raises(ValidationError):
            WindowOptions(**bad)
    with pytest.raises(ValueError, match="4n\\+1"):
        ShardConfig(window_frames=32)


def test_a_raw_training_config_takes_the_fields_it_leaves_out_from_its_shard_set(tmp_path):
    """`dualforce train --config`: the window and the audio width come from the shard set, as program's do; what
    the config states wins, old key names included."""
    root = tmp_path / "heads"
    write_shards(root / "train", n_shards=1, per_shard=2, window_frames=17, audio_dim=48)
    (root / "stats.json").write_text(json.dumps({"window_frames": 17, "crop_size": CROP, "profile": "talking_head"}))
    raw = {"shards": [str(root / "train" / "shard-*.tar")], "out_dir": str(tmp_path / "run")}
    filled = check_train_inputs(raw, None)
    assert (filled["window_frames"], filled["audio_dim"], filled["crop_size"]) == (17, 48, CROP)
    assert TrainConfig.from_dict(filled).model_config().audio_dim == 48
    stated = check_train_inputs({**raw, "window": 9, "train_window": 5}, None)
    assert (stated["window_frames"], stated["train_window_frames"], stated["audio_dim"]) == (9, 5, 48)
    with pytest.raises(InputRejected, match="both window_frames and window"):
        check_train_inputs({**raw, "window": 9, "window_frames": 9}, None)
    bare = {"shards": [str(tmp_path / "loose" / "shard-*.tar")], "out_dir": "o"}  # no shard set: nothing to fill
    with pytest.raises(InputRejected, match="window_frames"):
        check_train_inputs(bare, None)
