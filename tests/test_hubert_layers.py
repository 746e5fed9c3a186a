"""HuBERT layer indexes: the last index is the normalised output (`last_hidden_state`) for base and large styles.

Why: HuBERT large (stable layer norm) puts the encoder's final LayerNorm after the last layer; the installed
transformers does not include it in `hidden_states[-1]`, so reading that index would skip it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.hubert_features import HubertLayers, load_hubert

torch.set_num_threads(2)

STYLES = {
    "large": dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True),
    "base": dict(do_stable_layer_norm=False, feat_extract_norm="group"),
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def styled(request, tmp_path_factory):
    """(style, HubertFeatureModel) saved with small random weights and read back through load_hubert."""
    from transformers import HubertModel

    from models.dryrun_models import tiny_hubert_config

    cfg = tiny_hubert_config()
    for k, v in dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                     **STYLES[request.param]).items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(f"{request.param}-style")
    HubertModel(cfg).save_pretrained(d)
    return request.param, load_hubert(d)


@pytest.fixture(scope="module")
def audio():
    return np.random.default_rng(0).standard_normal(16_000).astype(np.float32)  # 1 s -> 49 frames


def _reference(model, audio):
    with torch.inference_mode():
        return model.model(torch.from_numpy(audio)[None], output_hidden_states=True, return_dict=True)


def test_last_layer_is_last_hidden_state(styled, audio):
    style, model = styled
    assert model.model.config.do_stable_layer_norm is (style == "large")
    ref = _reference(model, audio)
    want = ref.last_hidden_state[0].numpy()
    for layers in (HubertLayers(), HubertLayers((-1,)), HubertLayers((model.num_layers,))):
        got = model.hidden_states(audio, layers, torch.device("cpu"))
        assert got.shape == want.shape == (49, 64)
        np.testing.assert_allclose(got, want, atol=1e-5)
    for i in range(model.num_layers):  # other indexes stay hidden_states[i]
        got = model.hidden_states(audio, HubertLayers((i,)), torch.device("cpu"))
        np.testing.assert_allclose(got, ref.hidden_states[i][0].numpy(), atol=1e-5)
    got = model.hidden_states(audio, HubertLayers((1, -1)), torch.device("cpu"))  # a mean mixes both kinds
    np.testing.assert_allclose(got, (ref.hidden_states[1][0].numpy() + want) / 2, atol=1e-5)


def test_installed_transformers_hidden_states_meaning(styled, audio):
    """Pins what the installed transformers returns: large-style hidden_states[-1] lacks the final LayerNorm.

    If this fails after a transformers upgrade, the meaning of hidden_states indexes changed: recheck
    HubertLayers and the transformers pin in pyproject.toml.
    """
    style, model = styled
    ref = _reference(model, audio)
    assert len(ref.hidden_states) == model.num_layers + 1
    raw, last = ref.hidden_states[-1], ref.last_hidden_state
    if style == "base":
        torch.testing.assert_close(raw, last, atol=1e-6, rtol=0)
        return
    assert (raw - last).abs().max().item() > 1e-2  # so the old `hidden_states[-1]` read was wrong here
    with torch.inference_mode():
        torch.testing.assert_close(model.model.encoder.layer_norm(raw), last, atol=1e-5, rtol=0)
