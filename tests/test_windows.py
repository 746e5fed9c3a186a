"""Windows hold the frames their label says: starts, streamed cutting, and every shard sample's video
against the crop's frames at its window (the bug that shipped: later windows held much earlier frames)."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import soundfile as sf

from datasets_manifest.schema import ClipRow
from tasks import contract
from tasks.media import iter_frames, read_frames
from tasks.steps.shard import ShardClip, ShardConfig, _iter_windows, iter_samples, write_shards
from tasks.windows import iter_window_starts, iter_windows, window_starts


def _stamped(frames: int) -> np.ndarray:
    """Frames whose pixels are their own index: any wrong frame in a window shows at once."""
    return np.arange(frames, dtype=np.int32)[:, None, None] * np.ones((1, 2, 2), np.int32)


def _chunked(frames: np.ndarray, chunk: int):
    for i in range(0, len(frames), chunk):
        yield frames[i: i + chunk]


@pytest.mark.parametrize("length", [1, 9, 17, 40, 101, 250])
def test_every_window_is_the_frames_at_its_start(length):
    frames = _stamped(length)
    for n, stride, chunk in itertools.product([1, 2, 4, 8], [None, 1, 3, 20, 33, 100], [1, 5, 8, 32, 64]):
        window = 4 * n + 1
        starts = window_starts(length, window, stride)
        got = list(iter_windows(_chunked(frames, chunk), starts, window))
        assert [s for s, _ in got] == starts, (n, stride, chunk)
        for s, w in got:
            assert np.array_equal(w[:, 0, 0], np.arange(s, s + window)), (length, n, stride, chunk, s)


def test_starts_stay_inside_segments():
    segs = [(0, 40), (40, 45), (45, 120)]
    starts = window_starts(100, 17, 10, segs)
    assert starts == [0, 10, 20, 45, 55, 65, 75]  # none in the 5-frame segment; none past frame 100
    assert all(any(a <= s and s + 17 <= b for a, b in segs) for s in starts)
    frames = _stamped(100)
    for s, w in iter_windows(_chunked(frames, 7), starts, 17):
        assert np.array_equal(w[:, 0, 0], np.arange(s, s + 17))
    assert list(itertools.islice(iter_window_starts(9, 4), 3)) == [0, 4, 8]  # unbounded: the stream decides


def test_descending_starts_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        list(iter_windows(_chunked(_stamped(40), 8), [10, 0], 9))


@pytest.fixture(scope="module")
def crop_frames(yongen_crop):
    return read_frames(yongen_crop.video)  # [200, 512, 512, 3]


@pytest.mark.parametrize("n,stride,chunk", [(4, 100, 32), (4, 50, 8), (2, 33, 32), (8, None, 5), (1, 70, 16)])
def test_real_crop_windows_equal_the_decoded_crop(yongen_crop, crop_frames, n, stride, chunk):
    cfg = ShardConfig(window_frames=4 * n + 1, stride=stride)
    clip = ShardClip(row=_row(), crop_dir=yongen_crop.clip_dir, frames=yongen_crop.frames, step_versions={})
    got = list(_iter_windows(clip, cfg, chunk=chunk))
    assert [s for s, _ in got] == window_starts(yongen_crop.frames, cfg.window_frames, stride)
    for s, w in got:
        assert np.array_equal(w, crop_frames[s: s + cfg.window_frames]), (n, stride, chunk, s)


def _row():
    return ClipRow(clip_id="yongen", dataset="samples", source="/s/yongen.mp4", identity="yongen", start_s=0.0)


def _small(frames: np.ndarray) -> np.ndarray:
    """[T, 512, 512, 3] -> [T, 64, 64, 3] block means: cheap to compare against every frame of the clip."""
    t, h, w, c = frames.shape
    return frames.reshape(t, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


@pytest.mark.parametrize("n,stride", [(4, 100), (2, 45)])  # the dry-run's settings, and a stride > chunk
def test_every_shard_sample_holds_its_windows_video_and_audio(yongen_crop, crop_frames, tmp_path, n, stride):
    cfg = ShardConfig(window_frames=4 * n + 1, stride=stride)
    clip = ShardClip(row=_row(), crop_dir=yongen_crop.clip_dir, frames=yongen_crop.frames, step_versions={})
    write_shards([clip], tmp_path, cfg, key="k")
    clip_audio, _ = sf.read(yongen_crop.audio, dtype="int16")
    crop_small = _small(crop_frames)
    starts = []
    for sample in iter_samples(tmp_path, contract.ContractSpec(window_frames=cfg.window_frames, require_features=False)):
        start, end = sample["meta"]["window"]
        starts.append(start)
        path = tmp_path / "w.mp4"
        path.write_bytes(sample[contract.VIDEO])
        video = read_frames(path)
        small = _small(video)
        for k, frame in enumerate(video):
            own = _psnr(frame, crop_frames[start + k])
            assert own > 35.0, (start, k, own)
            # the frame is its label's, not another part of the clip's: every farther crop frame matches worse
            near = _psnr(small[k], crop_small[start + k])
            others = [_psnr(small[k], crop_small[j]) for j in range(len(crop_small)) if abs(j - start - k) >= 3]
            assert near > max(others), (start, k, near, max(others))
        audio, _ = sf.read(io.BytesIO(sample[contract.AUDIO]), dtype="int16")
        assert np.array_equal(audio, clip_audio[start * 640: end * 640])
    assert starts == window_starts(yongen_crop.frames, cfg.window_frames, stride)


def test_iter_frames_chunks_do_not_change_the_frames(yongen_crop, crop_frames):
    again = np.concatenate(list(iter_frames(yongen_crop.video, chunk=7)))
    assert np.array_equal(again, crop_frames)
