"""ffmpeg frame pipes: pixel formats agree with each other, decoding runs ahead, stopping early leaks nothing."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from tasks.media import VideoWriter, iter_frames, probe, read_frames, yuv420_bytes, yuv420_planes


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ffmpeg-reader" and t.is_alive()]


def test_gray_and_yuv420p_carry_the_same_luma(samples_dir):
    src = samples_dir / "more" / "lp_d12.mp4"
    info = probe(src)
    w, h = info.width, info.height
    gray = read_frames(src, pix_fmt="gray")
    yuv = read_frames(src, pix_fmt="yuv420p")
    rgb = read_frames(src)
    assert gray.shape == (len(rgb), h, w) and yuv.shape == (len(rgb), yuv420_bytes(w, h))
    y0, u0, v0 = yuv420_planes(yuv[0], w, h)
    assert u0.shape == v0.shape == ((h + 1) // 2, (w + 1) // 2)
    # gray is the luma plane stretched from video range (16-235) to full range
    full_range = np.clip((y0.astype(np.float64) - 16) * 255 / 219, 0, 255)
    assert np.abs(full_range - gray[0]).max() <= 1.0
    # and it is the luma of the RGB frame, up to rounding in the two conversions
    luma = 0.299 * rgb[0, ..., 0] + 0.587 * rgb[0, ..., 1] + 0.114 * rgb[0, ..., 2]
    assert np.abs(luma - gray[0]).mean() < 1.5


def test_stopping_early_stops_the_decoder_and_its_reader(samples_dir):
    before = len(_readers())
    frames = iter_frames(samples_dir / "sun.mp4", chunk=4)
    first = next(frames)
    assert first.shape[0] == 4
    frames.close()  # a caller that breaks out of the loop
    assert len(_readers()) == before


def test_prefetch_keeps_order_and_count(samples_dir):
    src = samples_dir / "more" / "lp_d12.mp4"
    a = np.concatenate(list(iter_frames(src, scale_to=(32, 32), chunk=3, prefetch=1)))
    b = np.concatenate(list(iter_frames(src, scale_to=(32, 32), chunk=7, prefetch=4)))
    np.testing.assert_array_equal(a, b)


def test_writer_takes_planar_yuv_frames(samples_dir, tmp_path):
    src = samples_dir / "more" / "lp_d12.mp4"
    info = probe(src)
    frames = read_frames(src, pix_fmt="yuv420p")[:10]
    with VideoWriter(tmp_path / "out.mp4", info.width, info.height, input_pix_fmt="yuv420p") as writer:
        writer.write(frames)
        with pytest.raises(ValueError, match="yuv420p frames must be"):
            writer.write(frames[:, :-1])
    back = read_frames(tmp_path / "out.mp4", pix_fmt="yuv420p")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 2.0  # crf 18: close to the input
