"""The static crop (LivePortrait's driving-video convention per stable segment) on the real sample clips: one
box per segment, segments end where the face moves out or the shot cuts, the crop holds the source's pixels
at that box, and head motion stays in the video."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from datasets_manifest.schema import ClipRow
from tasks.crop_geometry import anchor_points
from tasks.crop_segments import DRIVING_PARAMS
from tasks.media import read_frames, run_ffmpeg
from tasks.steps.crop import CropConfig, crop_clip, crop_info, crop_segments
from tasks.steps.shard import ShardClip, ShardConfig, iter_samples, write_shards


@pytest.fixture(scope="module")
def sun8(samples_dir, tmp_path_factory):
    """The first 8 s of the real sun.mp4, re-encoded (a third of the clip: the same face, a third the cost)."""
    out = tmp_path_factory.mktemp("sun8") / "sun8.mp4"
    run_ffmpeg(["-y", "-i", str(samples_dir / "sun.mp4"), "-t", "8", "-c:v", "libx264", "-crf", "18", "-c:a", "aac",
                str(out)], "cut")
    return out


@pytest.fixture(scope="module")
def sun_static(sun8, tmp_path_factory):
    return crop_clip(sun8, tmp_path_factory.mktemp("static") / "sun")


def _segments(result):
    return crop_info(result.clip_dir)["segment_boxes"]


def test_one_box_per_segment_with_the_driving_convention(sun_static):
    info = crop_info(sun_static.clip_dir)
    assert info["mode"] == "static" and info["params"]["scale"] == DRIVING_PARAMS.scale == 2.2
    rects = np.load(sun_static.clip_dir / "rects.npy")
    segs = _segments(sun_static)
    assert segs[0]["start"] == 0 and segs[-1]["end"] == sun_static.frames
    for a, b in zip(segs, segs[1:]):
        assert a["end"] == b["start"]
    for g in segs:
        block = rects[g["start"]: g["end"]]
        assert (block == block[0]).all() and block[0, 3] == 0.0  # constant, no rotation
        x0, y0, side = g["box"]
        assert side % 2 == 0 and x0 % 2 == 0 and y0 % 2 == 0


def test_the_crop_holds_the_source_pixels_of_its_box(sun_static, sun8):
    """Frame k of crop.mp4 is source frame k cut at its segment's box (black outside) and scaled to 512."""
    source = read_frames(sun8, fps=25)
    crop = read_frames(sun_static.video)
    h, w = source.shape[1:3]
    for g in _segments(sun_static):
        x0, y0, side = g["box"]
        for k in (g["start"], (g["start"] + g["end"]) // 2, g["end"] - 1):
            canvas = np.zeros((side, side, 3), np.uint8)
            xs, ys = max(0, x0), max(0, y0)
            xe, ye = min(w, x0 + side), min(h, y0 + side)
            canvas[ys - y0: ye - y0, xs - x0: xe - x0] = source[k, ys:ye, xs:xe]
            want = cv2.resize(canvas, (512, 512), interpolation=cv2.INTER_AREA if side >= 512 else cv2.INTER_CUBIC)
            mse = np.mean((crop[k].astype(float) - want.astype(float)) ** 2)
            psnr = 10 * np.log10(255 ** 2 / mse)
            assert psnr > 30, (k, psnr)
            if k + 10 < len(source):  # and not a neighbouring frame's
                other = np.mean((crop[k].astype(float) - crop[k + 10].astype(float)) ** 2)
                assert mse < other


def test_a_shot_cut_ends_a_segment_and_no_window_crosses_it(samples_dir, tmp_path):
    cut = tmp_path / "cut.mp4"  # 3 s of sun, then 3 s of yongen at the same size: a hard cut at frame 75
    run_ffmpeg(["-y", "-t", "3", "-i", str(samples_dir / "sun.mp4"), "-t", "3", "-i", str(samples_dir / "yongen.mp4"),
                "-filter_complex", "[0:v]fps=25,setsar=1[a];[1:v]fps=25,scale=576:768,setsar=1[b];"
                "[0:a]aresample=44100[x];[1:a]aresample=44100[y];[a][x][b][y]concat=n=2:v=1:a=1[v][au]",
                "-map", "[v]", "-map", "[au]", "-c:v", "libx264", "-crf", "18", "-c:a", "aac", str(cut)], "cut")
    r = crop_clip(cut, tmp_path / "crop")
    segs = _segments(r)
    assert any(g["ends_by"] == "cut" and abs(g["end"] - 75) <= 1 for g in segs), segs
    spans = crop_segments(r.clip_dir)
    assert all(not (a < 75 < b) for a, b in spans), spans  # no kept segment spans the cut
    row = ClipRow(clip_id="cut", dataset="samples", source=str(cut), identity="x")
    clip = ShardClip(row=row, crop_dir=r.clip_dir, frames=r.frames, step_versions={}, segments=spans)
    write_shards([clip], tmp_path / "shards", ShardConfig(window_frames=17, stride=10), key="k")
    windows = [s["meta"]["window"] for s in iter_samples(tmp_path / "shards")]
    assert windows and all(not (w0 < 75 < w1) for w0, w1 in windows), windows
    assert all(any(a <= w0 and w1 <= b for a, b in spans) for w0, w1 in windows)


def test_segments_end_where_the_face_moves_out_of_its_box(samples_dir, tmp_path):
    """A camera pan over sun: still for 1 s, then the face travels 300 px (2.4 face widths) in 2 s, then still."""
    pan = tmp_path / "pan.mp4"
    run_ffmpeg(["-y", "-t", "4", "-i", str(samples_dir / "sun.mp4"), "-vf",
                "fps=25,pad=876:768:150:0:color=gray,crop=576:768:x='min(300,max(0,(t-1)*150))':y=0",
                "-c:v", "libx264", "-crf", "18", "-c:a", "aac", str(pan)], "pan")
    r = crop_clip(pan, tmp_path / "crop")
    segs = _segments(r)
    assert len(segs) >= 3, segs
    moved = [g for g in segs if g["ends_by"] == "face_moved"]
    assert moved and all(25 <= g["end"] <= 76 for g in moved), segs  # boundaries fall in the pan
    landmarks = np.load(r.clip_dir / "landmarks.npy")  # in crop pixels
    inside = (landmarks >= -1).all() and (landmarks <= 513).all()
    assert inside  # with a box per segment, the face never leaves the crop


def _head_motion(clip_dir):
    """Landmark centroid travel (largest per-axis std, crop pixels) and roll (std of the eye->lip angle, deg)."""
    lm = np.load(clip_dir / "landmarks.npy")  # [T, 68, 2] in crop pixels
    eyes, lip = zip(*(anchor_points(p) for p in lm))
    d = np.asarray(lip) - np.asarray(eyes)
    return lm.mean(axis=1).std(axis=0).max(), np.degrees(np.arctan2(d[:, 0], d[:, 1])).std()


@pytest.mark.parametrize("clip, measure", [("lp_s18", 0), ("lp_d3", 1)])
def test_head_motion_stays_in_the_static_crop(samples_dir, tmp_path, clip, measure):
    """The follow crop pins the face (translation and roll are taken out); the static crop keeps them.
    lp_s18: a landscape clip whose head travels; lp_d3: a driving clip whose head rolls (its track is silent)."""
    cfg = dict(silence_rms=0.0)
    src = tmp_path / f"{clip}.mp4"  # its first 5 s
    run_ffmpeg(["-y", "-i", str(samples_dir / "more" / f"{clip}.mp4"), "-t", "5", "-c:v", "libx264", "-crf", "18",
                "-c:a", "aac", str(src)], "cut")
    static = _head_motion(crop_clip(src, tmp_path / "s", CropConfig(**cfg)).clip_dir)
    follow = _head_motion(crop_clip(src, tmp_path / "f", CropConfig(mode="follow", **cfg)).clip_dir)
    assert static[measure] > 2 * follow[measure], (static, follow)


def test_a_fast_head_keeps_its_size_in_the_segment_boxes(samples_dir, tmp_path):
    """lp_d12: a close-up whose head bobs quickly across the frame but keeps its size. Landmarks that only
    follow the previous frame's drift (extents of 0.3x-1.4x the face's between two detections: 14 segments,
    most ended by a false "zoom", 43 of 182 frames usable); the drift guard re-detects at once, so segments
    end only where the face really leaves its box (it reaches the source's right edge near frame 55)."""
    src = tmp_path / "d12.mp4"  # its first 5 s
    run_ffmpeg(["-y", "-i", str(samples_dir / "more" / "lp_d12.mp4"), "-t", "5", "-c:v", "libx264", "-crf", "18",
                "-c:a", "aac", str(src)], "cut")
    r = crop_clip(src, tmp_path / "crop")
    segs = _segments(r)
    assert not [g for g in segs if g["ends_by"] == "zoom"], segs
    sides = [g["box"][2] for g in segs if g["dropped"] is None]
    assert max(sides) < 1.1 * min(sides), segs
    assert sum(e - s for s, e in crop_segments(r.clip_dir)) >= 0.85 * r.frames, segs
    landmarks = np.load(r.clip_dir / "landmarks.npy")  # crop pixels: the face keeps its size in its box
    extent = np.sqrt(np.prod(landmarks.max(axis=1) - landmarks.min(axis=1), axis=1))
    assert extent.min() > 0.7 * np.median(extent) and extent.max() < 1.35 * np.median(extent)
