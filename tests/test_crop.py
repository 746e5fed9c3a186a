"""Step 2 on real clips: geometry, lengths, centring, and every rejection reason."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import soundfile as sf
from conftest import make_video
from scipy.ndimage import gaussian_filter1d

from tasks.contract import AUDIO_SAMPLES_PER_FRAME, FPS
from tasks.crop_geometry import (
    CropParams,
    StreamingRectSmoother,
    crop_matrix,
    rect_from_landmarks,
    smooth_rects,
    transform_points,
)
from tasks.errors import ClipRejected
from tasks.face_landmarks import get_landmarker
from tasks.media import iter_frames, probe, read_frames, run_ffmpeg
from tasks.steps.crop import CropConfig, _detect_near, crop_clip, warp_yuv420

# The crop puts the eye-lip box centre 0.125 * 512 = 64 px above the face centre (vy_ratio -0.125), so the
# face's landmark centroid should sit near (256, 320). Tolerance: 8% of the crop side (41 px) on each axis.
EXPECTED_FACE = np.array([256.0, 256.0 + 0.125 * 512])
TOL = 0.08 * 512


def _face_points(lm: np.ndarray) -> np.ndarray:
    """A plausible 68-point face: eye corners, mouth corners and a jaw ring around a centre."""
    pts = np.zeros((68, 2))
    ring = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    pts[:] = np.stack([50 * np.cos(ring), 60 * np.sin(ring)], 1)
    pts[36], pts[39], pts[42], pts[45] = [-30, -15], [-10, -15], [10, -15], [30, -15]
    pts[48], pts[54] = [-20, 30], [20, 30]
    return pts + lm


def test_rect_recovers_roll_and_centre():
    pts = _face_points(np.array([300.0, 200.0]))
    for deg in (-25.0, 0.0, 15.0):
        a = math.radians(deg)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        rp = (pts - [300, 200]) @ rot.T + [300, 200]
        cx, cy, size, angle = rect_from_landmarks(rp, CropParams())
        assert math.degrees(angle) == pytest.approx(deg, abs=1e-6)
        # square from the rotated extent (100 x 120 -> 120) times scale 2.3
        assert size == pytest.approx(120 * 2.3, rel=1e-6)
        # with vy=-0.125 the centre moves up along the face's own vertical axis by 0.125 * size
        up = np.array([-math.sin(a), math.cos(a)]) * (-0.125 * size)
        assert np.allclose([cx, cy], np.array([300, 200]) + up, atol=1e-6)
        m = crop_matrix(np.array([cx, cy, size, angle]), 512)
        assert np.allclose(transform_points(np.array([[cx, cy]]), m), [[256, 256]], atol=1e-9)
        # the eye line comes out horizontal: roll is removed
        out = transform_points(rp, m)
        assert out[36, 1] == pytest.approx(out[45, 1], abs=1e-6)


def test_smoothing_removes_jitter_and_keeps_constants():
    rng = np.random.default_rng(0)
    base = np.tile([200.0, 150.0, 300.0, 0.1], (100, 1))
    noisy = base + rng.normal(0, [3, 3, 5, 0.01], base.shape)
    smoothed = smooth_rects(noisy, 2.0)
    assert np.std(np.diff(smoothed[:, 0])) < 0.3 * np.std(np.diff(noisy[:, 0]))
    assert np.allclose(smooth_rects(base, 2.0), base)
    # an angle crossing +-pi is unwrapped, not averaged through zero
    wrap = np.tile([0.0, 0.0, 1.0, 0.0], (10, 1))
    wrap[:, 3] = [3.1, 3.12, 3.13, -3.14, -3.13, -3.12, -3.1, -3.09, -3.08, -3.07]
    assert np.all(np.abs(np.cos(smooth_rects(wrap, 1.0)[:, 3]) + 1) < 0.01)


def test_streaming_smoother_equals_offline_smoothing():
    rng = np.random.default_rng(3)
    rects = np.tile([200.0, 150.0, 300.0, 3.1], (60, 1)) + rng.normal(0, [3, 3, 5, 0.05], (60, 4))
    rects[:, 3] = (rects[:, 3] + np.pi) % (2 * np.pi) - np.pi  # wraps across +-pi
    stream = StreamingRectSmoother(2.0)
    assert not stream.ready(0)
    lead = 4  # frames before the first face take its rect, as the offline path fills them
    for _ in range(lead):
        stream.push(None)
    for i, r in enumerate(rects):
        stream.push(r)
        if i + lead >= stream.radius:  # frame k is ready once rects up to k + radius arrived
            k = i + lead - stream.radius
            assert stream.ready(k) and not stream.ready(k + 1)
    filled = np.concatenate([np.repeat(rects[:1], lead, 0), rects])
    for end in (len(filled), 50):  # the whole sequence, and one trimmed to 50 frames (audio shorter)
        online = np.stack([stream.smoothed(i, end) for i in range(end)])
        unwrapped = filled[:end].copy()
        unwrapped[:, 3] = np.unwrap(unwrapped[:, 3])
        expect = gaussian_filter1d(unwrapped, sigma=2.0, axis=0, mode="nearest")  # the reference Gaussian
        np.testing.assert_allclose(online, expect, atol=1e-9)
        np.testing.assert_allclose(smooth_rects(filled[:end], 2.0), expect, atol=1e-9)


def test_yuv_warp_keeps_chroma_on_its_luma():
    """Chroma is warped at half scale on its own grid: on a linear ramp, each warped chroma sample must equal
    the mean of the 2x2 warped luma block it belongs to."""
    w, h, d = 64, 48, 64
    gx, gy = 2.5, 1.5  # steep ramps: a half-pixel slip of the chroma grid shows as > 1 level
    ys, xs = np.mgrid[0:h, 0:w]
    luma = gx * xs + gy * ys + 10
    cys, cxs = np.mgrid[0 : h // 2, 0 : w // 2]
    chroma = gx * (2 * cxs + 0.5) + gy * (2 * cys + 0.5) + 10
    frame = np.concatenate([luma.ravel(), chroma.ravel(), chroma.ravel()]).astype(np.float32)
    m = crop_matrix(np.array([32.0, 24.0, 30.0, 0.3]), d)  # rotated, scaled up ~2x

    out = warp_yuv420(frame.round().astype(np.uint8), w, h, m, d).astype(np.float64)
    y_out = out[: d * d].reshape(d, d)
    u_out = out[d * d : d * d + (d // 2) ** 2].reshape(d // 2, d // 2)
    block_mean = y_out.reshape(d // 2, 2, d // 2, 2).mean(axis=(1, 3))
    inner = (slice(4, d // 2 - 4), slice(4, d // 2 - 4))
    err = np.abs(u_out[inner] - block_mean[inner])
    assert err.max() <= 1.0 and err.mean() < 0.35  # uint8 rounding of both planes
    # and the luma itself is the warp of the ramp (not shifted): check against the exact inverse map
    inv = cv2.invertAffineTransform(m)
    yy, xx = np.mgrid[0:d, 0:d]
    src_x = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    src_y = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    np.testing.assert_allclose(y_out, np.round(gx * src_x + gy * src_y + 10), atol=1.01)


@pytest.mark.parametrize("upscale", [1.0, 2.5])
def test_near_face_search_at_reduced_scale_finds_the_same_face(upscale, samples_dir):
    """The near-face search shrinks its region until the tracked face is ~110 px; the box it reports, in
    frame pixels, must match a search of the whole frame at full size (same face, same place, same size)."""
    frame = next(iter_frames(samples_dir / "sun.mp4", chunk=1, pix_fmt="gray"))[0]
    frame = cv2.resize(frame, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
    lm = get_landmarker("dlib")
    full = lm.detect(frame)
    assert len(full) == 1
    face = full[0]
    near_full_res = _detect_near(lm, frame, face, 1.0, face_px=face.size)  # scale 1: the frame as it is
    near_scaled = _detect_near(lm, frame, face, 1.0, face_px=110.0)
    assert len(near_full_res) == len(near_scaled) == 1
    for found in (near_full_res[0], near_scaled[0]):
        assert np.abs(found.center - face.center).max() < 0.1 * face.size
        assert abs(found.size / face.size - 1) < 0.15
    if upscale > 1:  # the search really ran smaller: the scaled box is quantised to the coarser grid
        assert near_scaled[0] != near_full_res[0]


def test_near_face_search_enlarges_a_face_too_small_for_hog(samples_dir):
    """A tracked face of ~45 px (a 135 px face in a tall source at detection size) is below HOG's 80 px
    window: the near search enlarges its region instead, and reports the box in frame pixels."""
    frame = next(iter_frames(samples_dir / "sun.mp4", chunk=1, pix_fmt="gray"))[0]
    lm = get_landmarker("dlib")
    face = lm.detect(frame)[0]
    s = 45.0 / face.size
    small = cv2.resize(frame, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    assert lm.detect(small) == []  # HOG alone cannot see it
    found = _detect_near(lm, small, face.scaled(s), 1.0, face_px=110.0)
    assert len(found) == 1
    assert np.abs(found[0].center - face.scaled(s).center).max() < 0.15 * 45
    assert abs(found[0].size / 45.0 - 1) < 0.2


def test_real_clip_geometry_lengths_and_centring(yongen_crop):
    r = yongen_crop
    info = probe(r.video)
    assert (info.width, info.height, info.fps) == (512, 512, 25.0)
    frames = read_frames(r.video)
    # yongen: 10.7 s of video but only 8.0 s of audio -> trimmed to the audio
    assert r.source_frames == 268 and r.frames == 200 and frames.shape == (200, 512, 512, 3)
    assert info.duration_s * FPS == pytest.approx(r.frames, abs=1)
    audio, sr = sf.read(r.audio)
    assert sr == 16000 and audio.ndim == 1 and len(audio) == r.frames * AUDIO_SAMPLES_PER_FRAME
    assert np.abs(audio).max() > 0.05  # real speech, not silence
    lm = np.load(r.landmarks)
    assert lm.shape == (200, 68, 2) and lm.dtype == np.float32
    # re-detect the face on the output frames, independently of the crop's own landmarks
    det = get_landmarker("dlib")
    for i in (0, 100, 199):
        boxes = det.detect(frames[i])
        assert len(boxes) == 1
        centre = det.landmarks(frames[i], boxes[0]).mean(0)
        assert np.all(np.abs(centre - EXPECTED_FACE) <= TOL), (i, centre)
        assert np.abs(lm[i].mean(0) - centre).max() < 12  # stored landmarks agree with a fresh detection


def test_30fps_source_becomes_25fps(samples_dir, tmp_path):
    # lp_d19's audio track is digital silence (RMS 0): allowed here, this test is about frame rates
    r = crop_clip(samples_dir / "more" / "lp_d19.mp4", tmp_path / "d19", CropConfig(silence_rms=0.0))
    info = probe(r.video)
    assert info.fps == 25.0 and (info.width, info.height) == (512, 512)
    assert r.frames == pytest.approx(8.3 * 25, abs=3)
    assert len(read_frames(r.video)) == r.frames
    assert sf.info(r.audio).frames == r.frames * AUDIO_SAMPLES_PER_FRAME


@pytest.mark.parametrize(
    "make, cfg, reason",
    [
        ("no_audio", CropConfig(), "no_audio"),
        ("noise", CropConfig(), "no_face"),
        ("corrupt", CropConfig(), "corrupt"),
        ("side_by_side", CropConfig(), "multiple_faces"),
        ("d12", CropConfig(min_face_px=400), "face_too_small"),
        ("d12", CropConfig(min_frames=1000), "too_short"),
        ("yongen", CropConfig(av_mismatch="reject"), "av_length_mismatch"),
    ],
)
def test_rejections_carry_a_reason(make, cfg, reason, samples_dir, tmp_path):
    src = {
        "no_audio": lambda: samples_dir / "more" / "lp_d0.mp4",
        "noise": lambda: make_video(tmp_path / "noise.mp4", seconds=2, source="testsrc2"),
        "corrupt": lambda: _corrupt(tmp_path / "bad.mp4"),
        "side_by_side": lambda: _side_by_side(samples_dir / "more" / "lp_d12.mp4", tmp_path / "two.mp4"),
        "d12": lambda: samples_dir / "more" / "lp_d12.mp4",
        "yongen": lambda: samples_dir / "yongen.mp4",
    }[make]()
    with pytest.raises(ClipRejected) as exc:
        crop_clip(src, tmp_path / "out", cfg)
    assert exc.value.reason == reason
    assert exc.value.detail
    assert not (tmp_path / "out" / "crop.mp4").exists()
    assert not list((tmp_path / "out").glob("*.tmp*"))  # the warp runs while tracking: nothing half-written


def _corrupt(path):
    path.write_bytes(np.random.default_rng(1).bytes(50_000))
    return path


def _side_by_side(src, path):
    run_ffmpeg(["-y", "-t", "2", "-i", str(src), "-filter_complex", "[0:v]split[a][b];[a][b]hstack",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)], "side by side")
    return path


@pytest.mark.parametrize("side", ["left", "right"])
def test_manifest_face_box_picks_the_face_to_follow(side, samples_dir, tmp_path):
    two = _side_by_side(samples_dir / "more" / "lp_d12.mp4", tmp_path / "two.mp4")  # 1024x512, two faces
    box = [40.0, 20.0, 472.0, 492.0] if side == "left" else [552.0, 20.0, 984.0, 492.0]
    # the follow mode: in 2 s this driving clip's head moves too far for one static box (tests of the static
    # mode's segments are in test_crop_static.py)
    r = crop_clip(two, tmp_path / "out", CropConfig(mode="follow"), face_box=box)  # no multiple_faces rejection
    cx = np.load(r.clip_dir / "rects.npy")[:, 0]
    assert ((cx < 512) if side == "left" else (cx > 512)).all()
    with pytest.raises(ClipRejected) as exc:  # a box where no face is
        crop_clip(two, tmp_path / "none", face_box=[0.0, 0.0, 30.0, 30.0])
    assert exc.value.reason == "no_face"


def test_a_late_first_face_gives_the_same_crop_through_the_second_decode(samples_dir, tmp_path, monkeypatch):
    """The follow mode: frames before the first face wait in memory for its crop; past PENDING_BYTES the warp moves to a second
    decode after tracking. Both paths must give the same video, landmarks and rects."""
    import tasks.steps.crop as crop_module

    late = tmp_path / "late.mp4"  # 1.2 s of black, then the face: the first detection that finds it is frame 30
    run_ffmpeg(["-y", "-t", "3", "-i", str(samples_dir / "more" / "lp_d12.mp4"), "-filter_complex",
                "[0:v]fps=25,drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='lt(t,1.2)'[v]",
                "-map", "[v]", "-map", "0:a", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(late)],
               "late face clip")
    decodes = []

    def counted(*args, **kwargs):
        decodes.append(kwargs.get("pix_fmt"))
        return iter_frames(*args, **kwargs)

    monkeypatch.setattr(crop_module, "iter_frames", counted)
    one_pass = crop_clip(late, tmp_path / "one", CropConfig(min_face_ratio=0.5, mode="follow"))
    assert len(decodes) == 1  # a 30-frame lead fits the default buffer: one decode
    monkeypatch.setattr(crop_module, "PENDING_BYTES", 1)
    two_pass = crop_clip(late, tmp_path / "two", CropConfig(min_face_ratio=0.5, mode="follow"))
    assert len(decodes) == 3  # the lead overflowed: the warp took a second decode
    assert one_pass.frames == two_pass.frames == 75
    for name in ("rects.npy", "landmarks.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    assert (tmp_path / "one" / "crop.mp4").read_bytes() == (tmp_path / "two" / "crop.mp4").read_bytes()
    rects = np.load(tmp_path / "one" / "rects.npy")
    np.testing.assert_array_equal(rects[0], rects[20])  # frames before the face take the first face's crop
