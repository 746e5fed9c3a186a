"""Real clips that decode wrongly unless we look: sideways phone clips, damaged bytes mid-file, silent audio,
small faces in tall sources. Each gets the right outcome and a reason that says where and why."""
from __future__ import annotations

import numpy as np
import pytest

from datasets_manifest.schema import ClipRow
from tasks.errors import ClipRejected
from tasks.media import decode_errors, probe, read_audio, read_frames, run_ffmpeg
from tasks.steps.crop import crop_clip
from tasks.steps.download import DownloadConfig, download_clip


@pytest.fixture(scope="module")
def sun3(samples_dir, tmp_path_factory):
    """The first 3 s of the real sun.mp4 (576x768 portrait, one face), re-encoded."""
    out = tmp_path_factory.mktemp("sun3") / "sun3.mp4"
    run_ffmpeg(["-y", "-i", str(samples_dir / "sun.mp4"), "-t", "3", "-c:v", "libx264", "-crf", "18",
                "-c:a", "aac", str(out)], "cut")
    return out


def _psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def test_a_sideways_phone_clip_comes_out_upright(sun3, tmp_path):
    stored = tmp_path / "stored_sideways.mp4"  # pixels rotated 90 deg, a display matrix that turns them back
    run_ffmpeg(["-y", "-i", str(sun3), "-vf", "transpose=1", "-c:v", "libx264", "-crf", "18", "-c:a", "copy",
                str(stored)], "rotate")
    phone = tmp_path / "phone.mp4"
    run_ffmpeg(["-y", "-display_rotation", "90", "-i", str(stored), "-c", "copy", str(phone)], "display matrix")
    info = probe(phone)
    assert abs(info.rotation) == 90 and (info.width, info.height) == (576, 768)  # the displayed size
    assert np.abs(read_frames(phone)[0].astype(int) - read_frames(sun3)[0].astype(int)).mean() < 3  # upright
    upright = crop_clip(sun3, tmp_path / "upright")
    rotated = crop_clip(phone, tmp_path / "phone_crop")
    assert rotated.frames == upright.frames
    assert abs(rotated.median_face_px - upright.median_face_px) < 0.1 * upright.median_face_px
    boxes = [np.load(r.clip_dir / "rects.npy") for r in (rotated, upright)]
    assert np.abs(boxes[0] - boxes[1]).max() <= 0.02 * boxes[1][:, 2].max()  # the same box, to a few pixels
    assert _psnr(read_frames(rotated.video)[10], read_frames(upright.video)[10]) > 22


@pytest.fixture(scope="module")
def damaged(samples_dir, tmp_path_factory):
    """sun.mp4 with bytes overwritten in the middle of the file (it still plays; ffmpeg conceals and exits 0)."""
    data = bytearray((samples_dir / "sun.mp4").read_bytes())
    rng = np.random.default_rng(0)
    mid = len(data) // 2
    hits = mid + np.flatnonzero(rng.random(60_000) < 0.05)
    for i in hits:
        data[int(i)] = int(rng.integers(256))
    out = tmp_path_factory.mktemp("damaged") / "damaged.mp4"
    out.write_bytes(bytes(data))
    return out


def test_damaged_bytes_mid_file_are_rejected_as_corrupt_stream_with_the_position(damaged, tmp_path):
    with pytest.raises(ClipRejected) as exc:
        crop_clip(damaged, tmp_path / "crop")
    assert exc.value.reason == "corrupt_stream"
    pos = exc.value.info["position_s"]
    assert pos is not None and 4.0 < pos < 18.0, exc.value.detail  # the middle of a 22 s clip, not its start
    assert f"near {pos:.2f} s" in exc.value.detail
    assert not (tmp_path / "crop" / "crop.mp4").exists()


def test_a_trimmed_download_does_not_bake_damage_into_a_clean_clip(damaged, tmp_path):
    row = ClipRow(clip_id="d", dataset="samples", source=str(damaged), start_s=2.0, end_s=20.0, identity="sun")
    with pytest.raises(ClipRejected) as exc:
        download_clip(row, tmp_path / "dl", DownloadConfig(cache_dir=tmp_path / "cache"))
    assert exc.value.reason == "corrupt_stream"
    assert 2.0 < exc.value.info["position_s"] < 16.0, exc.value.detail
    assert not list((tmp_path / "dl").glob("*.mp4"))


def test_clean_clips_report_no_decode_errors(sun3, samples_dir):
    log = run_ffmpeg(["-i", str(samples_dir / "sun.mp4"), "-f", "null", "-"], "decode")
    assert decode_errors(log) == []
    assert len(read_audio(sun3)) > 0


@pytest.mark.parametrize("clip", ["made", "lp_d19"])
def test_silent_audio_is_rejected_at_the_crop(sun3, samples_dir, tmp_path, clip):
    """Before any model runs on it; lp_d19.mp4 of the samples really has a silent track."""
    silent = tmp_path / "silent.mp4" if clip == "made" else samples_dir / "more" / "lp_d19.mp4"
    if clip == "made":
        run_ffmpeg(["-y", "-i", str(sun3), "-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono", "-map", "0:v",
                    "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", str(silent)], "silence")
    with pytest.raises(ClipRejected) as exc:
        crop_clip(silent, tmp_path / "crop")
    assert exc.value.reason == "silent_audio"
    assert not (tmp_path / "crop" / "crop.mp4").exists()


@pytest.mark.parametrize("scale, reason", [(1.0, None), (0.4, "face_too_small")])
def test_small_faces_in_a_tall_source_are_found_and_labelled_truthfully(sun3, tmp_path, scale, reason):
    """sun's face (~125 px) inside a 1080x1920 portrait frame: at detection size (640 px tall) it is ~42 px,
    below HOG's window. Found by the finer search, it is kept; at 0.4x (~50 px) it is too small, not absent."""
    tall = tmp_path / "tall.mp4"
    w, h = round(576 * scale / 2) * 2, round(768 * scale / 2) * 2
    run_ffmpeg(["-y", "-i", str(sun3), "-vf", f"scale={w}:{h},pad=1080:1920:(ow-iw)/2:(oh-ih)/3",
                "-c:v", "libx264", "-crf", "18", "-c:a", "copy", str(tall)], "tall")
    if reason is None:
        r = crop_clip(tall, tmp_path / "crop")
        assert 100 < r.median_face_px < 150
    else:
        with pytest.raises(ClipRejected) as exc:
            crop_clip(tall, tmp_path / "crop")
        assert exc.value.reason == reason, exc.value.detail
        assert "median face" in exc.value.detail
