"""check_real_weights: lists every missing path at once; passes on the dry-run layout."""
from __future__ import annotations

import pytest

from models.dryrun_models import write_dryrun_motion_extractor
from models.weights import WeightsError, check_real_weights


def test_lists_all_missing(tmp_path):
    with pytest.raises(WeightsError) as err:
        check_real_weights(tmp_path / "lp", "nobody/no-hubert", tmp_path / "wan", wan_vae_subfolder="vae")
    msg = str(err.value)
    assert str(tmp_path / "lp" / "pretrained_weights/liveportrait/base_models/motion_extractor.pth") in msg
    assert "HuBERT: 'nobody/no-hubert'" in msg and f"Wan VAE: directory {tmp_path / 'wan'}" in msg


def test_local_dirs_checked_for_config_and_weights(tmp_path):
    write_dryrun_motion_extractor(tmp_path)
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text("{}")
    (tmp_path / "vae" / "vae").mkdir(parents=True)
    (tmp_path / "vae" / "vae" / "config.json").write_text("{}")
    (tmp_path / "vae" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsError) as err:
        check_real_weights(tmp_path, tmp_path / "hub", tmp_path / "vae", "vae")
    assert "HuBERT: no weight file" in str(err.value) and "Wan VAE" not in str(err.value)
    assert "motion extractor" not in str(err.value)
    (tmp_path / "hub" / "model.safetensors").write_bytes(b"x")
    check_real_weights(tmp_path, tmp_path / "hub", tmp_path / "vae", "vae")  # no error
