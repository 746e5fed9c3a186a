"""A face image is cut as the crop step cuts a clip: the same box convention, the same pixels for the same box."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.crop_geometry import CropParams
from tasks.errors import ClipRejected
from tasks.face_image import crop_face_image, read_image, warp_face
from tasks.media import read_frames
from tasks.steps.crop import CROP_RECTS, CropConfig


@pytest.fixture(scope="module")
def source_and_crop(samples_dir, yongen_crop):
    source = read_frames(samples_dir / "yongen.mp4", fps=25)[: yongen_crop.frames]
    crop = read_frames(yongen_crop.video)
    return source, crop, np.load(yongen_crop.clip_dir / CROP_RECTS)


def test_box_of_a_frame_agrees_with_the_crop_steps_segment_box(source_and_crop):
    source, _, rects = source_and_crop
    for k in (0, len(source) // 2):
        got = crop_face_image(source[k])
        assert got.faces == 1 and got.crop.shape == (512, 512, 3)
        size = rects[k, 2]
        # a one-frame box vs the segment's average box: the head moves a little inside the segment
        assert np.hypot(*(got.rect[:2] - rects[k, :2])) < 0.03 * size and abs(got.rect[2] / size - 1) < 0.06
        assert got.rect[3] == rects[k, 3] == 0.0  # the static convention: no rotation
        # the crop's landmarks sit where the driving-crop convention puts a face: centred, below the middle
        eyes_y, chin_y = got.landmarks[36:48, 1].mean(), got.landmarks[8, 1]
        assert 180 < eyes_y < 280 < chin_y < 420 and abs(got.landmarks[:, 0].mean() - 256) < 30


def test_same_box_same_pixels_as_the_crop_step(source_and_crop):
    """The warp the image crop uses, given the crop step's box for frame 0, reproduces the crop step's frame 0."""
    source, crop, rects = source_and_crop
    warped, _ = warp_face(source[0], rects[0], 512)
    own = np.abs(warped.astype(int) - crop[0]).mean()
    later = np.abs(warped.astype(int) - crop[-1]).mean()
    assert own < 3.0 and later > 3 * own, (own, later)


def test_size_and_follow_mode(source_and_crop):
    source, _, _ = source_and_crop
    small = crop_face_image(source[0], CropConfig(params=CropParams(dsize=64)))
    assert small.crop.shape == (64, 64, 3)
    follow = crop_face_image(source[0], CropConfig(mode="follow"))
    assert follow.rect[2] != pytest.approx(crop_face_image(source[0]).rect[2])  # LivePortrait's source scale 2.3


def test_no_face_and_unreadable_image(tmp_path):
    with pytest.raises(ClipRejected, match="no_face"):
        crop_face_image(np.full((200, 300, 3), 128, np.uint8))
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ClipRejected, match="unreadable_image"):
        read_image(tmp_path / "x.png")
