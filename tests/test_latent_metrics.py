"""The latent-space evaluation rows: values against hand computations on constructed latents and struct rows."""
from __future__ import annotations

import numpy as np
import pytest

from models.dualforce.aux_losses import mouth_columns, pose_columns
from models.struct_layout import STRUCT_DIM
from training.eval_metrics.latent import (
    LatentPair,
    distance_to_reference,
    latent_identity_drift,
    latent_mse,
    latent_rows,
    latent_seconds,
    struct_errors,
)


def test_latent_frames_fall_in_the_second_their_last_video_frame_is_in():
    # latent frame k ends at video frame 4k: frames 0..6 end at 0..24 (second 0), frame 7 at 28 (second 1)
    assert latent_seconds(9).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1]


def test_latent_mse_per_second_and_overall():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(16, 9, 4, 4)).astype(np.float32)
    generated = truth.copy()
    generated[:, 7:] += 2.0  # only the second second is off, by 2 everywhere: MSE 4 there
    r = latent_mse(generated, truth)
    assert r.series == pytest.approx([0.0, 4.0])
    assert r.value == pytest.approx(4.0 * 2 / 9)
    assert r.details["latent_frames"] == 9
    longer = np.concatenate([generated, generated[:, :3]], axis=1)  # compared on the common frames only
    assert latent_mse(longer, truth).value == pytest.approx(r.value)


def test_struct_errors_split_pose_from_mouth_and_skip_lost_faces():
    frames = 30
    truth = np.zeros((frames, STRUCT_DIM), np.float32)
    generated = truth.copy()
    generated[:, pose_columns(STRUCT_DIM)] = 1.0  # pose off by 1: MSE 1
    generated[:, mouth_columns(STRUCT_DIM)[:1]] = 3.0  # one mouth column off by 3
    keep = np.ones(frames, bool)
    keep[:5] = False
    generated[:5] = 100.0  # lost-face frames do not count
    pose, mouth = struct_errors(generated, truth, keep)
    assert pose.name == "struct_pose_error" and pose.value == pytest.approx(1.0)
    assert mouth.value == pytest.approx(9.0 / len(mouth_columns(STRUCT_DIM)))
    assert pose.details["frames"] == 25 and len(pose.series) == 2
    none_kept = struct_errors(generated, truth, np.zeros(frames, bool))
    assert all(r.status == "skipped" for r in none_kept)


def test_identity_drift_is_the_rise_of_the_distance_to_the_reference():
    reference = np.zeros((16, 1, 2, 2), np.float32)
    latents = np.zeros((16, 13, 2, 2), np.float32)
    latents[:, 7:] = 1.0  # the second second drifted by 1 everywhere
    per_frame = distance_to_reference(latents, reference)
    assert per_frame.tolist() == [0.0] * 7 + [1.0] * 6
    drift = latent_identity_drift(per_frame)
    assert drift.series == [0.0, 1.0] and drift.value == 1.0


def test_rows_are_skipped_without_truth_and_refuse_mismatched_sizes():
    assert [r.status for r in latent_rows(None)] == ["skipped"] * 3
    pair = LatentPair(np.zeros((16, 3, 4, 4)), np.zeros((16, 3, 8, 8)), np.zeros((9, STRUCT_DIM)),
                      np.zeros((9, STRUCT_DIM)), np.ones(9, bool))
    with pytest.raises(ValueError, match="differ in size"):
        latent_rows(pair)
