"""HuBERT alignment: exactly T rows at edge lengths, pad/trim rules, flags, chunked vs unchunked."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.dryrun_models import write_dryrun_hubert
from models.hubert_features import HubertLayers, load_hubert, num_features
from models.weights import WeightsError
from tasks.errors import ClipRejected
from tasks.media import read_audio
from tasks.steps.audio_features import (
    EDGE_PAD,
    AudioFeatureConfig,
    audio_features_for_clip,
    extract_audio_features,
    require_usable,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hubert(tmp_path_factory):
    d = write_dryrun_hubert(tmp_path_factory.mktemp("hubert"))
    return load_hubert(d)


def _speech(samples_dir, seconds: float) -> np.ndarray:
    audio = read_audio(samples_dir / "sun.mp4")
    return audio[: int(seconds * 16000)]


def test_front_end_arithmetic():
    assert EDGE_PAD == 40
    for T in (1, 2, 3, 100, 1001):
        assert num_features(T * 640 + 2 * EDGE_PAD) == 2 * T


def test_loader_flags_and_errors(hubert, tmp_path):
    assert hubert.untrained_dryrun and hubert.do_normalize and hubert.hidden_size == 32
    with pytest.raises(WeightsError, match="not found"):
        load_hubert(tmp_path / "absent")
    with pytest.raises(WeightsError, match="local_files_only"):
        load_hubert("nobody/no-such-hubert")


@pytest.mark.parametrize("T", [1, 4, 5, 8, 9])
def test_exact_rows_at_edge_lengths(hubert, samples_dir, T):
    audio = _speech(samples_dir, 1.0)[: T * 640]
    res = extract_audio_features(audio, T, hubert)
    assert res.features.shape == (T, 32) and res.features.dtype == np.float16
    assert res.status == "ok" and res.valid_rows.all() and res.pad_samples == 0 and res.trim_samples == 0
    assert np.isfinite(res.features.astype(np.float32)).all()
    assert res.meta["untrained_dryrun"] is True


def test_rows_are_pooled_pairs_of_50hz_features(hubert, samples_dir):
    T = 6
    audio = _speech(samples_dir, 1.0)[: T * 640]
    res = extract_audio_features(audio, T, hubert)
    norm = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    x = torch.from_numpy(np.pad(norm, (40, 40)).astype(np.float32))[None]
    with torch.inference_mode():
        f50 = hubert.model(x).last_hidden_state[0].numpy()
    assert f50.shape[0] == 12
    np.testing.assert_allclose(res.features.astype(np.float32), (f50[0::2] + f50[1::2]) / 2, atol=2e-3, rtol=2e-3)


def test_longer_audio_is_trimmed(hubert, samples_dir):
    T = 10
    audio = _speech(samples_dir, 2.0)
    res = extract_audio_features(audio, T, hubert)
    exact = extract_audio_features(audio[: T * 640], T, hubert)
    assert res.trim_samples == len(audio) - T * 640 and res.status == "ok"
    np.testing.assert_array_equal(res.features, exact.features)


def test_shorter_audio_is_padded_and_flagged(hubert, samples_dir):
    T = 10
    audio = _speech(samples_dir, 1.0)[: 8 * 640 + 100]  # 8 full frames + 100 samples
    res = extract_audio_features(audio, T, hubert)
    assert res.features.shape == (T, 32)
    assert res.pad_samples == T * 640 - len(audio)
    assert res.valid_rows.tolist() == [True] * 8 + [False] * 2
    assert res.status == "padded"  # 1.8 frames of padding <= max_pad_frames
    far = extract_audio_features(audio[: 5 * 640], T, hubert)
    assert far.status == "av_length_mismatch" and far.valid_rows.sum() == 5
    with pytest.raises(ClipRejected) as err:
        require_usable(far)
    assert err.value.reason == "av_length_mismatch"
    assert require_usable(res) is res.features


def test_missing_and_silent_audio_are_flagged(hubert, tmp_path):
    none = extract_audio_features(None, 7, hubert)
    assert none.status == "no_audio" and none.features is None and not none.valid_rows.any()
    with pytest.raises(ClipRejected, match="no_audio"):
        require_usable(none)
    missing_file = audio_features_for_clip(tmp_path / "audio.wav", 7, hubert)
    assert missing_file.status == "no_audio"
    silent = extract_audio_features(np.zeros(7 * 640, np.float32), 7, hubert)
    assert silent.status == "silent" and silent.features.shape == (7, 32)
    with pytest.raises(ClipRejected) as err:
        require_usable(silent)
    assert err.value.reason == "silent_audio"
    with pytest.raises(ValueError, match="NaN"):
        extract_audio_features(np.full(640, np.nan, np.float32), 1, hubert)


def test_chunked_matches_unchunked_layer_norm_front_end(tmp_path, samples_dir):
    """HuBERT-large style front end (per-frame LayerNorm): chunk features line up exactly before attention."""
    from transformers import HubertModel

    from models.dryrun_models import tiny_hubert_config

    cfg = tiny_hubert_config()
    cfg.feat_extract_norm, cfg.do_stable_layer_norm = "layer", True
    torch.manual_seed(0)
    HubertModel(cfg).save_pretrained(tmp_path / "large-style")
    model = load_hubert(tmp_path / "large-style")
    assert not model.untrained_dryrun and not model.do_normalize  # no marker, no preprocessor config
    T = 50
    audio = _speech(samples_dir, 2.0)
    l0 = AudioFeatureConfig(layers=HubertLayers((0,)), chunk_seconds=60.0)
    a = extract_audio_features(audio, T, model, l0).features.astype(np.float32)
    b = extract_audio_features(audio, T, model, dataclasses.replace(l0, chunk_seconds=0.6, context_seconds=0.4))
    np.testing.assert_allclose(b.features.astype(np.float32), a, atol=3e-3)
    last = dataclasses.replace(l0, layers=HubertLayers((-1,)))
    fa = extract_audio_features(audio, T, model, last).features.astype(np.float32)
    fb = extract_audio_features(audio, T, model, dataclasses.replace(last, chunk_seconds=0.6, context_seconds=0.4))
    fb = fb.features.astype(np.float32)
    assert not np.allclose(fa, fb, atol=1e-3)  # attention does see past the chunk: chunking is an approximation
    assert np.linalg.norm(fb - fa) / np.linalg.norm(fa) < 0.1


def test_chunked_group_norm_front_end_uses_utterance_stats(hubert, samples_dir):
    """HuBERT-base style front end normalises over time (GroupNorm): chunks use whole-utterance statistics."""
    T = 50
    audio = _speech(samples_dir, 2.0)
    l0 = AudioFeatureConfig(layers=HubertLayers((0,)), chunk_seconds=60.0)
    a = extract_audio_features(audio, T, hubert, l0).features.astype(np.float32)
    b = extract_audio_features(audio, T, hubert, dataclasses.replace(l0, chunk_seconds=0.6, context_seconds=0.4))
    np.testing.assert_allclose(b.features.astype(np.float32), a, atol=3e-3)
    assert type(hubert.model.feature_extractor.conv_layers[0].layer_norm) is torch.nn.GroupNorm  # restored
    full = dataclasses.replace(l0, layers=HubertLayers((0, 1, 2)))
    fa = extract_audio_features(audio, T, hubert, full).features.astype(np.float32)
    fb = extract_audio_features(audio, T, hubert, dataclasses.replace(full, chunk_seconds=0.6, context_seconds=0.4))
    rel = np.linalg.norm(fb.features.astype(np.float32) - fa) / np.linalg.norm(fa)
    assert 0 < rel < 0.1, rel


def test_equal_length_chunks_batched_equal_chunks_one_at_a_time(hubert, samples_dir, monkeypatch):
    """4 s in 0.6 s chunks: the middle chunks share one length and go through HuBERT as batches of up to 4; each
    chunk's rows are the same as when it runs alone, and land at the same place."""
    import tasks.steps.audio_features as af

    T = 100
    cfg = AudioFeatureConfig(layers=HubertLayers((0, 1, 2)), chunk_seconds=0.6, context_seconds=0.4)
    audio = _speech(samples_dir, 4.0)
    batched = extract_audio_features(audio, T, hubert, cfg).features.astype(np.float32)
    monkeypatch.setattr(af, "CHUNK_BATCH", 1)
    alone = extract_audio_features(audio, T, hubert, cfg).features.astype(np.float32)
    np.testing.assert_allclose(batched, alone, atol=2e-3)  # float16 storage: one rounding step
    assert np.abs(batched - alone).mean() < 1e-4
    pieces = np.stack([audio[:16000], audio[16000:32000], audio[32000:48000]]).astype(np.float32)
    together = hubert.hidden_states(pieces, cfg.layers, torch.device("cpu"))
    for piece, rows in zip(pieces, together):
        np.testing.assert_allclose(rows, hubert.hidden_states(piece, cfg.layers, torch.device("cpu")), atol=1e-5)
