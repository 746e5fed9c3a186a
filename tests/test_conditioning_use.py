"""Conditioning-use metrics on models whose dependence on each input is known by construction, and the gate."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from models.dualforce import build_model
from models.dualforce.frames import group_rows
from tests.training_shards import write_shards
from training.conditioning_use import (
    ConditioningUseConfig,
    HeldOutWindow,
    held_out_windows,
    measure_conditioning_use,
    partners,
)
from training.gates import TrainingGateConfig, conditioning_gate

L, T, H = 3, 9, 4  # latent frames, video frames, latent size


def _windows(n=6, clips=3, seed=0, audio_dim=32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append(HeldOutWindow(f"w{i}", f"clip{i % clips}", {
            "video_latents": torch.randn(16, L, H, H, generator=g),
            "reference_latent": torch.randn(16, 1, H, H, generator=g),
            "struct": torch.randn(T, 133, generator=g),
            "audio_features": torch.randn(T, audio_dim, generator=g),
            "keep_mask": torch.ones(T, dtype=torch.bool)}))
    return out


class Oracle(nn.Module):
    """Predicts the velocity of the window whose `key_input` ("audio" or "reference") it is given (up to a small
    bias), and of zeros for an input it does not know: its loss depends on that input alone, by construction."""

    def __init__(self, windows, key_input: str):
        super().__init__()
        self.config = build_model("tiny").config
        self.bridges = nn.ModuleDict()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.key_input, self.windows = key_input, windows

    def audio_windows(self, audio):
        return audio  # the oracle looks the features up as they are

    def forward(self, xt_v, sig_v, xt_s, sig_s, reference, audio, given=None):
        x0_v, x0_s = torch.zeros_like(xt_v), torch.zeros_like(xt_s)
        for b in range(xt_v.shape[0]):
            key = audio[b] if self.key_input == "audio" else reference[b]
            member = "audio_features" if self.key_input == "audio" else "reference_latent"
            match = next((w for w in self.windows if torch.equal(w.tensors[member], key)), None)
            if match is not None:
                x0_v[b], x0_s[b] = match.tensors["video_latents"], group_rows(match.tensors["struct"][None])[0]
        x0_v, x0_s = x0_v + 0.1, x0_s + 0.1  # a small error of its own: the true input's loss is not 0
        sv, ss = sig_v[:, None, :, None, None], sig_s[:, :, None, None]
        return (xt_v - x0_v) / sv, (xt_s - x0_s) / ss  # eps_hat - x0_hat = (x_t - x0_hat) / sigma


CFG = ConditioningUseConfig(windows=6, batch_size=4, drift_sampler_steps=0)


def test_a_model_that_reads_the_speech_has_audio_use_above_1_and_reference_use_exactly_1():
    windows = _windows()
    report = measure_conditioning_use(Oracle(windows, "audio"), windows, CFG)
    audio = report.get("audio", "other clip's speech", "mouth")
    assert audio.ratio_q25 > 10 and audio.windows == 6  # the true speech is the only way to a small loss
    assert report.get("audio", "null speech", "video").ratio_median > 10
    for stream in ("video", "struct"):
        assert report.get("reference", "other identity", stream).ratio_median == 1.0  # ignored by construction


def test_a_model_that_reads_the_reference_has_reference_use_above_1_and_audio_use_exactly_1():
    windows = _windows()
    report = measure_conditioning_use(Oracle(windows, "reference"), windows, CFG)
    assert report.get("reference", "other identity", "video").ratio_q25 > 10
    assert report.get("audio", "other clip's speech", "mouth").ratio_median == 1.0
    assert report.get("audio", "null speech", "struct").ratio_median == 1.0


def test_the_real_model_ignores_every_input_at_init_and_reads_them_once_its_gates_open():
    torch.manual_seed(0)
    model = build_model("tiny")
    windows = _windows()
    report = measure_conditioning_use(model, windows, ConditioningUseConfig(windows=6, drift_sampler_steps=2))
    assert {f.ratio_median for f in report.figures} == {1.0}  # zero-gated paths and heads: exactly 1
    assert report.drift and len(report.drift["ratio"]) == L
    with torch.no_grad():  # open every zero-initialised path
        for name, p in model.zero_init_parameters().items():
            p.normal_(0, 0.5)
    opened = measure_conditioning_use(model, windows, CFG)
    for probe, altered, stream in (("audio", "other clip's speech", "mouth"), ("reference", "other identity", "video"),
                                   ("bridge", "bridge closed", "video")):
        assert abs(opened.get(probe, altered, stream).ratio_median - 1.0) > 1e-3, (probe, stream)
    assert model.bridges["0"].video_gate.abs().sum() > 0  # bridge_closed restored the gates


def test_partners_are_other_clips_and_one_clip_has_none():
    windows = _windows(n=4, clips=2)
    assert [windows[j].clip_id != w.clip_id for w, j in zip(windows, partners(windows))] == [True] * 4
    one = _windows(n=3, clips=1)
    assert partners(one) is None
    report = measure_conditioning_use(Oracle(one, "audio"), one, CFG)
    assert report.get("audio", "other clip's speech", "mouth") is None and "other-clip" in report.skipped
    assert report.get("audio", "null speech", "mouth").ratio_median > 1  # the null condition still measures


def test_held_out_windows_come_round_robin_over_clips_with_their_tensors(tmp_path):
    write_shards(tmp_path / "val", n_shards=2, per_shard=3, seed=4, split="val")
    windows, split = held_out_windows(tmp_path, 4)
    assert split == "val" and len(windows) == 4
    assert len({w.clip_id for w in windows}) == min(4, len({w.clip_id for w in windows}))
    from tasks import contract
    from tasks.steps.shard import iter_samples
    by_key = {s["__key__"]: s for s in iter_samples(tmp_path, split="val")}
    for w in windows:  # the tensors are the sample's own members
        src = contract.load_npy(by_key[w.key][contract.VIDEO_LATENTS])
        assert torch.equal(w.tensors["video_latents"], torch.from_numpy(src.astype("float32")))


def test_the_gate_stops_a_model_that_ignores_the_speech_and_passes_one_that_uses_both():
    windows = _windows()
    cfg = TrainingGateConfig(conditioning_step=5)
    ignores_speech = conditioning_gate(measure_conditioning_use(Oracle(windows, "reference"), windows, CFG), cfg, 5)
    assert not ignores_speech.go and "audio use below 1.05" in ignores_speech.summary
    assert "lipsync_loss_weight" in ignores_speech.recommendation and "audio_drop_prob" in ignores_speech.recommendation
    ignores_reference = conditioning_gate(measure_conditioning_use(Oracle(windows, "audio"), windows, CFG), cfg, 5)
    assert not ignores_reference.go and "reference use below" in ignores_reference.summary

    class Both(Oracle):  # right only with both the true speech and the true reference
        def forward(self, xt_v, sig_v, xt_s, sig_s, reference, audio, given=None):
            by_audio = Oracle.forward(self, xt_v, sig_v, xt_s, sig_s, reference, audio)
            self.key_input = "reference"
            by_ref = Oracle.forward(self, xt_v, sig_v, xt_s, sig_s, reference, audio)
            self.key_input = "audio"
            return (by_audio[0] + by_ref[0]) / 2, (by_audio[1] + by_ref[1]) / 2

    ok = conditioning_gate(measure_conditioning_use(Both(windows, "audio"), windows, CFG), cfg, 5)
    assert ok.go and ok.numbers["audio_use"] > 1.05 and ok.numbers["reference_use"] > 1.05
    assert json.dumps(ok.numbers) and any(r["metric"].startswith("audio use") for r in ok.rows)


def test_a_video_only_model_is_not_evaluated_rather_than_passed_as_using_its_inputs():
    model = build_model("tiny", video_only=True)
    report = measure_conditioning_use(model, _windows(), CFG)
    verdict = conditioning_gate(report, TrainingGateConfig(conditioning_step=1), 1)
    assert not verdict.evaluated and verdict.head == "NOT EVALUATED"


@pytest.mark.parametrize("bad", [dict(windows=1), dict(sigma_min=0.9, sigma_max=0.5), dict(batch_size=0)])
def test_config_is_checked(bad):
    with pytest.raises(ValueError):
        ConditioningUseConfig(**bad)
