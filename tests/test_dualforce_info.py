"""Size report: lite parameters counted on the meta device; tiny FLOPs measured."""
from __future__ import annotations

import pytest

from models.dualforce import measure, model_info


def test_lite_params_on_meta_device():
    size = measure("lite", flops=False)
    assert 1.4e9 < size.total_params < 1.7e9
    assert sum(size.params.values()) == size.total_params
    assert size.params["video_blocks"] > size.params["struct_blocks"] > size.params["bridges"] > 0
    text = model_info("lite", flops=False)
    assert "video_blocks" in text and f"{size.total_params:,}" in text


def test_tiny_flops_reported():
    small, big = measure("tiny", latent_size=(16, 16)), measure("tiny", latent_size=(32, 32))
    assert small.train_step_flops > 0
    # 4x the tokens: linear layers scale 4x, attention 16x -> between 4x and 16x the FLOPs
    assert 4 * small.train_step_flops < big.train_step_flops < 16 * small.train_step_flops


@pytest.mark.slow
def test_lite_flops():
    size = measure("lite")
    assert 3e13 < size.train_step_flops < 8e13
