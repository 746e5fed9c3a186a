"""Video-frame rows <-> latent-frame groups, keep weights and causal audio windows."""
from __future__ import annotations

import pytest
import torch

from models.dualforce.frames import (
    audio_windows,
    group_rows,
    keep_weights,
    num_latent_frames,
    struct_row_valid,
    ungroup_rows,
    video_frames_of,
)


def test_grouping_follows_the_vae():
    assert [list(video_frames_of(j)) for j in range(3)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    rows = torch.arange(9.0).view(1, 9, 1)
    grouped = group_rows(rows)
    assert grouped[0, :, :, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert torch.equal(ungroup_rows(grouped), rows)
    assert struct_row_valid(3).tolist()[0] == [False, False, False, True]
    with pytest.raises(ValueError, match="4n\\+1"):
        num_latent_frames(8)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        group_rows(torch.zeros(9, 3))


def test_keep_weights():
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 3] = False
    keep[1, 0] = False
    video, struct = keep_weights(keep)
    assert video.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert struct[0].tolist() == [[0, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]]
    assert struct[1, 0].tolist() == [0, 0, 0, 0]


def test_audio_windows_are_causal():
    audio = torch.arange(1.0, 14.0).view(1, 13, 1)  # frame i has value i+1; 0 marks padding
    win = audio_windows(audio, context=2)  # W = 6
    assert win.shape == (1, 4, 6, 1)
    assert win[0, 0, :, 0].tolist() == [0, 0, 0, 0, 0, 1]
    assert win[0, 1, :, 0].tolist() == [0, 1, 2, 3, 4, 5]  # frames -1..4
    assert win[0, 3, :, 0].tolist() == [8, 9, 10, 11, 12, 13]  # frames 7..12
    for j in range(4):
        assert win[0, j].max() <= video_frames_of(j).stop  # nothing past the latent frame's own last frame
