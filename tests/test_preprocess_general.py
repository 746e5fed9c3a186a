"""The general preprocess profile (download -> centre crop -> VAE -> video-only shards) on real clips: the crop is
the frame's centre at the right times, a sample holds the crop's frames at its window and their VAE latent, and
bad clips are turned away with a reason while the rest of the run completes."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_video
from prefect.exceptions import ParameterTypeError

from datasets_manifest.schema import ClipRow, rows_to_table
from tasks import contract
from tasks.errors import ClipRejected
from tasks.media import iter_frames, probe, read_frames, run_ffmpeg
from tasks.steps.center_crop import center_crop_clip

N = 1  # 5-frame windows: N + 1 = 2 latent frames
WINDOW = contract.video_frames(N + 1)
STRIDE = 150  # two windows per clip: the dry-run VAE costs ~0.3 s a frame on CPU
CLIPS = {"wide": "more/lp_s18.mp4",  # 1280x720 landscape, 30 fps, face off-centre
         "tall": "more/lp_d13.mp4"}  # 720x1280 portrait, 30 fps, no audio stream: the general profile needs none
VIDEO_ONLY_MEMBERS = {contract.VIDEO, contract.META, contract.VIDEO_LATENTS, contract.REFERENCE_LATENT}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0 ** 2 / max(mse, 1e-10))


@pytest.fixture(scope="module")
def run(prefect_test_server, samples_dir, tmp_path_factory):
    """One general-profile run over two good clips and three bad ones: (report, dataset folder, its parameters)."""
    from flows.preprocess import preprocess

    tmp = tmp_path_factory.mktemp("general")
    corrupt = tmp / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 200)
    audio_only = tmp / "audio_only.mp4"
    run_ffmpeg(["-y", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=2", "-c:a", "aac",
                str(audio_only)], "audio-only clip")
    short = make_video(tmp / "short.mp4", seconds=1, audio=False)  # 25 frames: less than the crop's 33
    rows = [ClipRow(clip_id=cid, dataset="g", source=str(samples_dir / rel), identity=cid) for cid, rel in CLIPS.items()]
    rows += [ClipRow(clip_id=cid, dataset="g", source=str(path), identity=cid)
             for cid, path in (("corrupt", corrupt), ("audio_only", audio_only), ("short", short))]
    manifest = tmp / "m.parquet"
    pq.write_table(rows_to_table(rows), manifest)
    kwargs = dict(dataset="g", manifest=str(manifest), output_root=str(tmp / "out"), profile="general",
                  weights={"models": "dryrun"}, windows={"window_frames": WINDOW, "window_stride": STRIDE},
                  runner={"batch_size": 8},
                  checks={"audit_fraction": 0.25})  # one of the 4 samples: the audit re-encodes with the VAE too
    report = preprocess(**kwargs)
    return report, tmp / "out" / "g", kwargs


def _crop_dir(base: Path, clip_id: str) -> Path:
    return base / "steps" / "center_crop" / clip_id


def _expected_centre(source: Path, picks: list[int]) -> dict[int, np.ndarray]:
    """Source frames `picks` (at the source's own rate), centre square cut and resized to 512 with cv2: the crop
    computed independently of ffmpeg's filters."""
    want, out, i = set(picks), {}, 0
    for chunk in iter_frames(source, chunk=16):
        for frame in chunk:
            if i in want:
                h, w = frame.shape[:2]
                side = min(h, w)
                x, y = (w - side) // 2, (h - side) // 2
                out[i] = cv2.resize(frame[y:y + side, x:x + side], (512, 512),
                                    interpolation=cv2.INTER_AREA if side >= 512 else cv2.INTER_CUBIC)
            i += 1
        if i > max(picks):
            break
    return out


@pytest.mark.parametrize("clip_id, every", [("wide", 7), ("tall", 11)])  # every: coprime with 5
def test_the_crop_is_the_centre_of_the_frame_at_25_fps(run, samples_dir, clip_id, every):
    report, base, _ = run
    source = samples_dir / CLIPS[clip_id]
    info = probe(source)
    assert info.fps == 30
    crop = read_frames(_crop_dir(base, clip_id) / "crop.mp4")
    crop_info = json.loads((_crop_dir(base, clip_id) / "crop.json").read_text())
    assert crop.shape[1:] == (512, 512, 3) and crop_info["frames"] == len(crop)
    assert crop_info["profile"] == "general" and crop_info["segments"] == [[0, len(crop)]]
    assert crop_info["source_size"] == [info.width, info.height]
    assert abs(len(crop) - info.duration_s * contract.FPS) <= 1  # resampled to 25 fps, not every source frame kept

    # output frame i shows the source frame nearest time i/25, i.e. source frame round(i * 30 / 25)
    nearest = {i: round(i * info.fps / contract.FPS) for i in range(0, len(crop), every)}
    nearest = {i: j for i, j in nearest.items() if j + 1 < round(info.duration_s * info.fps)}
    source_frames = _expected_centre(source, sorted({j + d for j in nearest.values() for d in (-1, 0, 1) if j + d >= 0}))
    psnr = {i: _psnr(crop[i], source_frames[j]) for i, j in nearest.items()}
    worst = min(psnr, key=psnr.get)
    assert psnr[worst] > 33, f"{clip_id} frame {worst}: PSNR {psnr[worst]:.1f} dB against the source's centre"
    # ... and not a neighbour: on average the nearest source frames match better than the ones 1/30 s before or
    # after (these clips move slowly: consecutive source frames differ by about as much as the codec loses)
    at = {d: np.mean([_psnr(crop[i], source_frames[j + d]) for i, j in nearest.items() if i > 0]) for d in (-1, 0, 1)}
    assert at[0] > max(at[-1], at[1]) + 1, f"{clip_id}: the crop's frames are not at times i/25 (mean PSNR {at})"


def test_a_sideways_phone_clip_is_cropped_upright(samples_dir, tmp_path):
    upright = tmp_path / "upright.mp4"
    run_ffmpeg(["-y", "-i", str(samples_dir / CLIPS["wide"]), "-t", "2", "-an", "-c:v", "libx264", "-crf", "18",
                str(upright)], "cut")
    stored = tmp_path / "stored_sideways.mp4"  # pixels turned 90 deg, a display matrix that turns them back
    run_ffmpeg(["-y", "-i", str(upright), "-vf", "transpose=1", "-c:v", "libx264", "-crf", "18", str(stored)], "rotate")
    phone = tmp_path / "phone.mp4"
    run_ffmpeg(["-y", "-display_rotation", "90", "-i", str(stored), "-c", "copy", str(phone)], "display matrix")
    assert abs(probe(phone).rotation) == 90
    a = center_crop_clip(upright, tmp_path / "a")
    b = center_crop_clip(phone, tmp_path / "b")
    assert a.box == b.box == (280, 0, 720) and a.frames == b.frames
    assert json.loads((b.clip_dir / "crop.json").read_text())["source_rotation"] in (90.0, -90.0)
    fa, fb = read_frames(a.video), read_frames(b.video)
    assert min(_psnr(x, y) for x, y in zip(fa[::10], fb[::10])) > 33


def test_a_sample_holds_the_crops_frames_at_its_window_and_their_vae_latent(run):
    from tasks.feature_models import dryrun_models, wan_vae
    from tasks.steps.shard import iter_samples
    from tasks.steps.vae_latents import VaeLatentConfig, encode_clip, encode_reference
    from training.loader import LoaderConfig, ShardLoader

    report, base, _ = run
    shards = base / "shards"
    spec = contract.ContractSpec(WINDOW, profile=contract.VIDEO_ONLY)
    samples = {s["__key__"]: s for s in iter_samples(shards, spec)}  # validated against the video-only contract
    assert sorted(samples) == ["tall_w000000", "tall_w000150", "wide_w000000", "wide_w000150"]
    for s in samples.values():
        assert set(s) - {"__key__", "meta"} == VIDEO_ONLY_MEMBERS
        assert s["meta"]["profile"] == contract.VIDEO_ONLY
        assert set(s["meta"]["steps"]) == {"download", "center_crop", "vae_latents"}
        assert s["meta"]["untrained_dryrun_models"] == ["vae_latents"]
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["profile"] == contract.VIDEO_ONLY and stats["samples"] == 4 and stats["window_frames"] == WINDOW

    sample = samples["wide_w000150"]
    crop = read_frames(_crop_dir(base, "wide") / "crop.mp4")
    window = crop[150:150 + WINDOW]
    video = read_frames(_bytes_file(sample[contract.VIDEO], base.parent / "w.mp4"))
    assert video.shape == window.shape
    assert min(_psnr(a, b) for a, b in zip(video, window)) > 35  # the crop's frames at the window, re-encoded once

    wan = wan_vae(dryrun_models())  # the dry run's seeded random VAE, as the audit re-encodes
    fresh = encode_clip(window, wan, VaeLatentConfig(window_frames=WINDOW)).latents[0].astype(np.float32)
    stored = np.load(io.BytesIO(sample[contract.VIDEO_LATENTS]), allow_pickle=False).astype(np.float32)
    assert stored.shape == (16, N + 1, 64, 64)
    assert np.abs(stored - fresh).max() <= 2e-2
    other = np.load(io.BytesIO(samples["wide_w000000"][contract.VIDEO_LATENTS]), allow_pickle=False).astype(np.float32)
    assert np.abs(other - fresh).max() > 5 * 2e-2  # the tolerance tells windows apart
    reference = np.load(io.BytesIO(sample[contract.REFERENCE_LATENT]), allow_pickle=False).astype(np.float32)
    assert np.abs(reference - encode_reference(wan, crop[0]).astype(np.float32)).max() <= 2e-2

    loader = ShardLoader(LoaderConfig(shards=[str(shards / "train" / "shard-*.tar")], window_frames=WINDOW,
                                      profile=contract.VIDEO_ONLY, shuffle_buffer=0, shuffle_shards=False))
    batches = list(loader.epoch_iter())
    assert sorted(b["sample_keys"][0] for b in batches) == sorted(samples)
    assert not loader.stats.rejected
    batch = next(b for b in batches if b["sample_keys"] == ["wide_w000150"])
    assert set(batch) == {"video_latents", "reference_latent", "sample_keys"}
    assert np.array_equal(batch["video_latents"][0].numpy(), stored.astype(np.float16))


def _bytes_file(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_bad_clips_are_rejected_with_a_reason_and_the_run_carries_on(run):
    from flows.preprocess import preprocess
    from flows.run_summary import preprocess_lines
    from tasks.ledger import read_ledger

    report, base, kwargs = run
    assert report["profile"] == "general" and report["clips_in"] == 5 and report["clips_out"] == 2
    assert {r["clip_id"]: (r["step"], r["reason"]) for r in report["rejected"]} == {
        "corrupt": ("download", "corrupt"), "audio_only": ("download", "no_video"), "short": ("center_crop", "too_short")}
    assert {c["step"] for c in report["step_counts"]} == {"download", "center_crop", "vae_latents", "shard"}
    assert report["gate"] is None  # no pose check: no 3D-latent gate
    assert report["audit"]["ok"] and {c["check"] for c in report["audit"]["checks"]} == {
        "lineage", "video", "latent", "reference"}  # against the centre crop and a fresh encode; no audio or struct
    assert sorted(p.name for p in _crop_dir(base, "wide").iterdir()) == ["_status.json", "crop.json", "crop.mp4"]
    assert Path(report["contact_sheet"]).is_file()  # centre crops have no landmarks to draw
    assert "2/5 clips made it through (general profile)" in preprocess_lines(report)[0]

    again = preprocess(**kwargs)  # the same run again reuses every step result and the shard set
    assert again["shards"]["skipped"]
    ran = [r for r in read_ledger(base).to_pylist() if r["run_id"] == again["run_id"] and r["action"] == "ran"]
    assert ran == []


def test_the_centre_crop_turns_unreadable_media_away(samples_dir, tmp_path):
    def reason(path: Path) -> ClipRejected:
        out = tmp_path / path.stem
        with pytest.raises(ClipRejected) as exc:
            center_crop_clip(path, out)
        assert not out.exists() or not any(out.iterdir())  # nothing half-written left behind
        return exc.value

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 200)
    assert reason(garbage).reason == "corrupt"
    audio_only = tmp_path / "audio_only.mp4"
    run_ffmpeg(["-y", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=1", "-c:a", "aac",
                str(audio_only)], "audio-only clip")
    assert reason(audio_only).reason == "no_video"
    # bytes overwritten mid-file: ffmpeg conceals the damage and exits 0; the crop says where it is
    cut = tmp_path / "cut.mp4"
    run_ffmpeg(["-y", "-i", str(samples_dir / CLIPS["wide"]), "-t", "3", "-an", "-c:v", "libx264", "-crf", "23",
                str(cut)], "cut")
    data = bytearray(cut.read_bytes())
    rng = np.random.default_rng(0)
    for i in len(data) // 2 + np.flatnonzero(rng.random(20_000) < 0.05):
        data[int(i)] = int(rng.integers(256))
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    rejected = reason(damaged)
    assert rejected.reason == "corrupt_stream" and "near" in rejected.detail and 0 < rejected.info["position_s"] < 3


def test_the_profile_and_its_steps_are_checked_before_any_work(prefect_test_server, samples_dir, tmp_path):
    from flows.preprocess import preprocess

    manifest = tmp_path / "m.parquet"
    pq.write_table(rows_to_table([ClipRow(clip_id="wide", dataset="g", source=str(samples_dir / CLIPS["wide"]),
                                          identity="a")]), manifest)
    common = dict(dataset="g", manifest=str(manifest), output_root=str(tmp_path / "out"))
    with pytest.raises(ParameterTypeError, match="profile"):  # refused before the run starts
        preprocess(profile="faces", **common)
    with pytest.raises(ValueError, match=r"unknown steps \['crop', 'motion'\] for the general profile; .*center_crop"):
        preprocess(profile="general", steps=["download", "crop", "motion"], **common)
    with pytest.raises(ValueError, match="a real run needs wan_vae \\("):  # the Wan VAE alone: no LivePortrait, HuBERT
        preprocess(profile="general", **common)
    state = preprocess(profile="general", weights={"wan_vae": str(tmp_path / "vae")}, return_state=True, **common)
    assert state.is_failed() and state.name == "BAD-WEIGHTS"
    assert "Wan VAE" in state.message and "LivePortrait" not in state.message and "HuBERT" not in state.message
    assert not (tmp_path / "out" / "g" / "steps").exists()


def test_the_audit_compares_a_video_only_sample_with_its_centre_crop(run, tmp_path):
    import shutil

    from tasks.audit import AuditModels, audit_shards

    _, base, _ = run
    steps = tmp_path / "steps"
    shutil.copytree(base / "steps", steps)
    clean = audit_shards(base / "shards", steps, AuditModels(), keys=["wide_w000150"])
    assert clean.ok and set(clean.checks) == {"lineage", "video"}  # no VAE given: the latent checks are skipped
    crop = steps / "center_crop" / "wide" / "crop.mp4"
    reversed_crop = tmp_path / "reversed.mp4"
    run_ffmpeg(["-y", "-i", str(crop), "-vf", "reverse", "-c:v", "libx264", "-crf", "18", str(reversed_crop)], "reverse")
    reversed_crop.replace(crop)
    tampered = audit_shards(base / "shards", steps, AuditModels(), keys=["wide_w000150"])
    assert not tampered.ok and {m.check for m in tampered.mismatches} == {"video"}


def test_a_shard_set_holds_one_sample_profile(tmp_path):
    from tasks.steps.shard import ShardClip, ShardConfig, write_shards

    def clip(clip_id: str, profile: str) -> ShardClip:
        row = ClipRow(clip_id=clip_id, dataset="g", source="x.mp4", identity=clip_id)
        return ShardClip(row=row, crop_dir=tmp_path, frames=0, step_versions={}, profile=profile)

    with pytest.raises(ValueError, match="one sample profile"):
        write_shards([clip("a", contract.TALKING_HEAD), clip("b", contract.VIDEO_ONLY)], tmp_path / "s",
                     ShardConfig(window_frames=WINDOW))
    with pytest.raises(ValueError, match="profile must be one of"):
        clip("c", "general")  # the preprocess profile's name is not a sample profile
