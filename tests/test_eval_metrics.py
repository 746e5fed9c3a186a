"""Evaluation metrics on real face clips: each gives its ideal value for a clip against itself, a worse one for
another person or a time-shuffled clip, and a reason instead of a number when its weights are absent.

Faces: LivePortrait's driving clips lp_d12 (512x512, 25 fps, with audio) and lp_d0 (another person). The
networks without public weights here (SyncNet, I3D, the FID Inception) are random ones of the real
architectures whose BatchNorm statistics are set from these frames (otherwise a random deep net maps every
input to nearly the same feature), saved to disk and read back through the real loaders.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from safetensors.torch import save_file

from models.dryrun_models import write_dryrun_motion_extractor
from models.fid_inception import FIDInceptionV3
from models.i3d import InceptionI3d
from models.syncnet import SyncNet
from models.weights import WeightsError
from tasks.media import iter_frames, read_audio
from tasks.steps.motion import extract_motion
from training.eval_metrics import (
    EvalClip,
    EvalModels,
    EvalWeights,
    FeatureInputs,
    MetricResult,
    evaluate_set,
    long_sequence_consistency,
)
from training.eval_metrics.faces import observe_faces
from training.eval_metrics.fid import fid_from_features, inception_features
from training.eval_metrics.frechet import GaussianStats, frechet_distance
from training.eval_metrics.fvd import fvd_from_features, i3d_features
from training.eval_metrics.identity import identity_similarity
from training.eval_metrics.landmarks import landmark_distances
from training.eval_metrics.latent import LatentPair
from training.eval_metrics.lipsync import audio_embeddings, lip_sync, offset_distances, sync_embeddings, sync_scores
from training.eval_metrics.mfcc import syncnet_mfcc
from training.eval_metrics.motion_error import motion_errors

torch.set_num_threads(2)

CLIP_FRAMES = 6
LONG_FRAMES = 50  # 2 s
SMALL = FeatureInputs(inception_size=75, i3d_size=64, i3d_window=3)  # small inputs both networks still take
SHUFFLE = np.array([3, 0, 5, 1, 4, 2])


def _first_frames(path, count: int) -> np.ndarray:
    frames = iter_frames(path, chunk=count)
    try:
        return np.array(next(frames))  # writable copy
    finally:
        frames.close()


@pytest.fixture(scope="module")
def long_clip(samples_dir) -> np.ndarray:
    return _first_frames(samples_dir / "more" / "lp_d12.mp4", LONG_FRAMES)  # [50, 512, 512, 3]


@pytest.fixture(scope="module")
def clip(long_clip) -> np.ndarray:
    return long_clip[:CLIP_FRAMES]


@pytest.fixture(scope="module")
def audio(samples_dir) -> np.ndarray:
    return read_audio(samples_dir / "more" / "lp_d12.mp4")[: LONG_FRAMES * 640]  # 16 kHz mono float32


@pytest.fixture(scope="module")
def other(samples_dir) -> np.ndarray:
    return _first_frames(samples_dir / "more" / "lp_d0.mp4", CLIP_FRAMES)  # another person, 512x512


@pytest.fixture(scope="module")
def faces(clip, other):
    return {"clip": observe_faces(clip), "other": observe_faces(other)}


def _no_face(frames: np.ndarray) -> np.ndarray:
    """The top-left 128x128 of real frames: wall behind the speaker, no face."""
    return np.ascontiguousarray(frames[..., :128, :128, :])


def _calibrated(model: nn.Module, run) -> nn.Module:
    """Set every BatchNorm's statistics to those of `run`'s inputs (one pass in train mode), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative: one pass sets the statistics of that pass
    model.train()
    run(model)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, long_clip, clip, other, audio):
    """Random networks of the real architectures written to disk, in the formats the public files come in."""
    root = tmp_path_factory.mktemp("eval_weights")
    torch.manual_seed(0)
    syncnet = _calibrated(SyncNet(), lambda m: sync_embeddings(m, long_clip[:8], audio))  # 3 windows
    save_file(syncnet.state_dict(), root / "syncnet.safetensors")
    inception = _calibrated(FIDInceptionV3(), lambda m: inception_features(m, np.concatenate([clip, other]), input_size=75))
    torch.save(inception.state_dict(), root / "pt_inception.pth")
    i3d = _calibrated(InceptionI3d(), lambda m: i3d_features(m, np.concatenate([clip, other]), window=3, size=64))
    save_file(i3d.state_dict(), root / "i3d.safetensors")
    write_dryrun_motion_extractor(root / "liveportrait")
    return EvalWeights(liveportrait=root / "liveportrait", syncnet=root / "syncnet.safetensors", i3d=root / "i3d.safetensors",
                       fid_inception=root / "pt_inception.pth")


@pytest.fixture(scope="module")
def models(weights) -> EvalModels:
    return EvalModels.load(weights)


# --- the result type ----------------------------------------------------------------------------------------------

def test_a_skipped_metric_has_a_reason_and_no_number():
    with pytest.raises(ValueError, match="skipped metric has no value"):
        MetricResult("fid", 3.0, status="skipped", reason="no weights")
    with pytest.raises(ValueError, match="needs a reason"):
        MetricResult("fid", None, status="skipped")
    with pytest.raises(ValueError):
        MetricResult("fid", None)
    ok = MetricResult("identity_similarity", 0.9, series=[0.9, math.nan])
    assert json.loads(json.dumps(ok.to_json()))["series"] == [0.9, None]


# --- Fréchet distance -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_a, n_b", [(100, 80), (30, 200), (10, 12)])  # more, mixed and fewer samples than dimensions
def test_frechet_distance_equals_the_sqrtm_formula(n_a, n_b):
    rng = np.random.default_rng(n_a)
    a = rng.normal(size=(n_a, 64)) * rng.uniform(0.5, 2.0, 64)
    b = rng.normal(size=(n_b, 64)) @ rng.normal(size=(64, 64)) * 0.2 + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb) - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real)
    got = frechet_distance(GaussianStats.of(a), GaussianStats.of(b))
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(frechet_distance(GaussianStats.of(a), GaussianStats.of(a))) < 1e-9
    shift = np.full(64, 0.5)  # a shifted copy: exactly the squared mean difference
    assert frechet_distance(GaussianStats.of(a), GaussianStats.of(a + shift)) == pytest.approx(64 * 0.25, rel=1e-9)


# --- identity ---------------------------------------------------------------------------------------------------------

def test_identity_is_one_for_the_reference_itself(clip):
    result = identity_similarity(np.stack([clip[0], clip[0]]), clip[0])
    assert result.ok and result.value == pytest.approx(1.0, abs=1e-6)
    assert result.series == pytest.approx([1.0, 1.0], abs=1e-6)


def test_identity_is_higher_for_the_same_person_than_for_another(clip, other, faces):
    own = identity_similarity(clip, clip[0], faces["clip"])
    stranger = identity_similarity(other, clip[0], faces["other"])
    assert own.series[0] == pytest.approx(1.0, abs=1e-6)  # frame 0 is the reference
    assert min(own.series) > max(stranger.series)
    assert own.value > stranger.value + 0.02
    assert own.details["frames_without_face"] == 0


def test_identity_without_a_face_in_the_reference_is_skipped(clip, faces):
    result = identity_similarity(clip[:2], _no_face(clip[0]), faces["clip"][:2])
    assert result.status == "skipped" and result.value is None
    assert result.reason == "no face found in the reference image"


# --- landmark distances -----------------------------------------------------------------------------------------------

def test_landmark_distances_are_zero_against_itself_and_grow_with_mismatch(clip, other, faces):
    own = landmark_distances(clip, clip, faces["clip"], faces["clip"])
    assert [r.name for r in own] == ["lmd_mouth", "lmd_face"]
    assert [r.value for r in own] == [0.0, 0.0]
    shuffled = landmark_distances(clip[SHUFFLE], clip, [faces["clip"][i] for i in SHUFFLE], faces["clip"])
    stranger = landmark_distances(other, clip, faces["other"], faces["clip"])
    for s, o in zip(shuffled, stranger):
        assert 0.5 < s.value < o.value  # 512-crop pixels
    assert stranger[0].details["frames_compared"] == CLIP_FRAMES


def test_landmark_distances_are_in_512_crop_pixels_at_any_frame_size(clip, other, faces):
    at_512 = landmark_distances(other, clip, faces["other"], faces["clip"])
    half = [np.ascontiguousarray(f[:, ::2, ::2]) for f in (other, clip)]  # 256x256 frames of the same faces
    at_256 = landmark_distances(*half)
    for a, b in zip(at_512, at_256):
        assert b.value == pytest.approx(a.value, rel=0.25)  # re-detected at half size, then scaled back


def test_landmark_distances_without_faces_are_skipped(clip):
    results = landmark_distances(_no_face(clip[:2]), _no_face(clip[:2]))
    assert all(r.status == "skipped" and "no frame has a face" in r.reason for r in results)


# --- pose and expression error ----------------------------------------------------------------------------------------

def test_motion_errors_are_zero_against_itself_and_grow_with_mismatch(clip, other, models):
    extractor = models.motion_extractor
    own = motion_errors(clip, clip, extractor)
    assert [(r.name, r.value) for r in own] == [("pose_error_deg", 0.0), ("expression_error", 0.0)]
    assert "dry-run" in own[0].reason  # random weights are said to be random
    for worse in (motion_errors(clip[SHUFFLE], clip, extractor), motion_errors(other, clip, extractor)):
        assert all(r.value > 0 for r in worse)
        assert worse[0].value == pytest.approx(np.mean([worse[0].details[a] for a in ("pitch", "yaw", "roll")]))
    # GT motion already extracted (as the shards keep it) gives the same numbers without extracting it again
    known = motion_errors(other, clip, extractor, gt_motion=extract_motion(clip, extractor))
    assert [r.value for r in known] == [r.value for r in motion_errors(other, clip, extractor)]
    skipped = motion_errors(clip, clip, None)
    assert [r.status for r in skipped] == ["skipped", "skipped"] and "motion extractor" in skipped[0].reason


# --- lip sync ---------------------------------------------------------------------------------------------------------

def test_mfcc_matches_python_speech_features():
    """Golden values from python_speech_features 0.6 (mfcc(int16 signal, 16000), transposed) on this signal."""
    t = np.arange(int(16000 * 0.37)) / 16000
    signal = (0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.05 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)
    signal[100:300] = 0
    mfcc = syncnet_mfcc(signal)
    assert mfcc.shape == (13, 36)
    golden = {(0, 0): 19.44838, (1, 3): 9.331943, (5, 17): -38.192172, (12, 33): 24.663448, (0, 20): 20.547959}
    for (c, f), value in golden.items():
        assert mfcc[c, f] == pytest.approx(value, abs=1e-5)
    assert syncnet_mfcc(np.zeros(25 * 640, np.float32)).shape == (13, 4 * 25 - 1)  # 4 steps per video frame


def test_audio_windows_follow_the_audio_and_the_offset_search_finds_a_known_shift(models, audio):
    """With random weights the two streams share no meaning, so the search is tested on the audio stream alone: a
    delay of 3 frames moves the embeddings by exactly 3 windows, and matching them against the undelayed ones
    recovers offset -3 (0 against themselves)."""
    count = 15
    emb = audio_embeddings(models.syncnet, audio, count)
    delayed = audio_embeddings(models.syncnet, np.concatenate([np.zeros(3 * 640, np.float32), audio]), count)
    torch.testing.assert_close(delayed[3:], emb[:-3], atol=1e-4, rtol=1e-4)
    own = sync_scores(offset_distances(emb, emb))
    assert own["offset"] == 0 and own["lse_d"] < 1e-3 and own["lse_c"] > 1.0
    assert sync_scores(offset_distances(emb, delayed))["offset"] == -3
    assert sync_scores(offset_distances(delayed, emb))["offset"] == 3


def test_lip_sync_scores_are_deterministic_and_skipped_without_weights(clip, audio, models):
    first = lip_sync(clip, audio[: CLIP_FRAMES * 640], models.syncnet)
    again = lip_sync(clip, audio[: CLIP_FRAMES * 640], models.syncnet)
    assert [r.name for r in first] == ["lse_d", "lse_c"]
    assert [(r.value, r.series) for r in first] == [(r.value, r.series) for r in again]
    assert first[0].value > 0 and first[1].value >= 0
    assert first[0].details["windows"] == CLIP_FRAMES - 5 and len(first[0].series) == CLIP_FRAMES - 5
    assert -15 <= first[0].details["offset_frames"] <= 15
    assert all(r.status == "skipped" and "SyncNet" in r.reason for r in lip_sync(clip, audio, None))
    assert all(r.status == "skipped" and "too short" in r.reason for r in lip_sync(clip[:5], audio, models.syncnet))


# --- FID and FVD ------------------------------------------------------------------------------------------------------

def test_fid_is_zero_for_the_same_frames_and_positive_for_another_person(clip, other, models):
    own = inception_features(models.inception, clip, input_size=75)
    stranger = inception_features(models.inception, other, input_size=75)
    same = fid_from_features(own, own[::-1].copy())  # a set metric: the order of frames does not matter
    worse = fid_from_features(stranger, own)
    assert abs(same.value) < 1e-6 * worse.value
    assert worse.value > 1.0
    assert fid_from_features(own, None).status == "skipped"


def test_fvd_is_zero_for_the_same_video_and_positive_when_time_is_shuffled(clip, other, models):
    def fvd_features(frames):
        return i3d_features(models.i3d, frames, window=SMALL.i3d_window, size=SMALL.i3d_size)  # 2 windows of 3

    own = fvd_features(clip)
    assert own.shape == (2, 400)
    shuffled, stranger = fvd_from_features(fvd_features(clip[SHUFFLE]), own), fvd_from_features(fvd_features(other), own)
    assert abs(fvd_from_features(own, own).value) < 1e-6 * shuffled.value
    assert shuffled.value > 0 and stranger.value > 0
    too_few = fvd_from_features(own[:1], own)
    assert too_few.status == "skipped" and "need 2+ windows" in too_few.reason


# --- long-sequence consistency ----------------------------------------------------------------------------------------

def test_consistency_series_per_second(long_clip, models):
    identity, drift = long_sequence_consistency(long_clip, long_clip[0], models.motion_extractor, sample_every=10)
    assert identity.name == "identity_per_second" and drift.name == "pose_drift_deg_per_second"
    assert len(identity.series) == len(drift.series) == 2  # 50 frames at 25 fps
    assert all(0.9 < s <= 1.0 + 1e-9 for s in identity.series)
    assert drift.series[0] >= 0 and drift.series[1] > 0 and "dry-run" in drift.reason


def test_consistency_of_a_still_clip_is_perfect_and_chunks_read_like_one_array(long_clip, models):
    still = np.broadcast_to(long_clip[0], long_clip.shape)
    identity, drift = long_sequence_consistency(iter([still[:30], still[30:]]), long_clip[0], models.motion_extractor,
                                                sample_every=25)
    assert identity.series == pytest.approx([1.0, 1.0], abs=1e-6)
    assert drift.series == pytest.approx([0.0, 0.0], abs=1e-3)
    # reference without a face: identity skipped, pose drift the same whether the frames come whole or in chunks
    whole = long_sequence_consistency(long_clip, _no_face(long_clip[0]), models.motion_extractor, sample_every=5)
    chunked = long_sequence_consistency(iter([long_clip[:7], long_clip[7:31], long_clip[31:]]), _no_face(long_clip[0]),
                                        models.motion_extractor, sample_every=5)
    assert whole[0].status == "skipped" and whole[0].reason == "no face found in the reference image"
    assert len(whole[1].series) == 2  # the extractor's batches differ, so equal to float32 round-off
    assert whole[1].series == pytest.approx(chunked[1].series, rel=1e-4)


# --- the suite --------------------------------------------------------------------------------------------------------

def test_suite_on_gt_against_itself_gives_ideal_values(clip, audio, models):
    longer_gt_motion = extract_motion(np.concatenate([clip, clip[:2]]), models.motion_extractor)  # cut to the clip
    rng = np.random.default_rng(0)
    latents, rows = rng.normal(size=(16, 3, 4, 4)), rng.normal(size=(9, 133))
    pair = EvalClip("lp_d12", generated=clip, reference=clip[0], gt=np.concatenate([clip, clip[:2]]),
                    audio=audio[: CLIP_FRAMES * 640], gt_motion=longer_gt_motion,
                    latents=LatentPair(latents, latents, rows, rows, np.ones(9, bool)))
    evaluations, summary = evaluate_set([pair], models, SMALL)
    by_name = {r.name: r for r in summary}
    assert list(by_name) == ["identity_similarity", "lmd_mouth", "lmd_face", "pose_error_deg", "expression_error",
                             "lse_d", "lse_c", "latent_mse", "struct_pose_error", "struct_mouth_error", "fid", "fvd"]
    assert by_name["latent_mse"].value == 0.0 and by_name["struct_mouth_error"].value == 0.0
    assert all(r.ok for r in summary), [(r.name, r.reason) for r in summary if not r.ok]
    assert by_name["identity_similarity"].value > 0.95
    assert by_name["lmd_mouth"].value == 0.0 and by_name["lmd_face"].value == 0.0
    for name in ("pose_error_deg", "expression_error"):  # GT motion came from a batch of 8 frames, not 6: round-off
        assert by_name[name].value == pytest.approx(0.0, abs=1e-4), name
    assert abs(by_name["fid"].value) < 1e-6 and abs(by_name["fvd"].value) < 1e-6
    assert by_name["lse_d"].value == evaluations[0].results[5].value
    assert all(r.seconds > 0 for r in evaluations[0].results)


def test_suite_skips_what_has_no_weights_and_refuses_weights_that_do_not_fit(clip, tmp_path, weights):
    models = EvalModels.load(EvalWeights(syncnet=tmp_path / "absent.safetensors"))
    assert models.absent["syncnet"] == f"weights not found: {tmp_path / 'absent.safetensors'}"
    assert models.absent["i3d"] == "weights not given (pass --i3d)"
    pair = EvalClip("no-weights", generated=clip[:2], reference=clip[0], gt=clip[:2].copy(),
                    audio=np.zeros(2 * 640, np.float32))
    _, summary = evaluate_set([pair], models)
    status = {r.name: (r.status, r.reason) for r in summary}
    assert status["lmd_mouth"] == ("ok", "")  # dlib's models ship with the package
    assert status["pose_error_deg"] == ("skipped", "motion_extractor: weights not given (pass --liveportrait-root)")
    assert status["lse_d"][0] == "skipped" and "absent.safetensors" in status["lse_d"][1]
    assert status["fid"] == ("skipped", "inception: weights not given (pass --fid-inception)")
    assert status["fvd"] == ("skipped", "i3d: weights not given (pass --i3d)")
    with pytest.raises(WeightsError, match="SyncNet"):  # a file that is there but wrong is an error, not a skip
        EvalModels.load(EvalWeights(syncnet=weights.i3d))
