"""`dualforce generate`: frames = speech seconds x 25, the speech muxed in, the mp4 holds the sampler's frames, the
extractors come from the model's provenance, and bad inputs get clear errors and exit codes.

A tiny DualForce exported with the dry-run extractors' provenance, at a 64x64 crop (8x8 latents) to stay fast; the
face and the speech are real (yongen.mp4's first frame; its speech resampled to 22.05 kHz stereo)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from models.dualforce import DualForce
from models.dualforce.config import get_config
from tasks.feature_models import dryrun_models
from tasks.media import probe, read_audio, read_frames, run_ffmpeg

torch.set_num_threads(2)
SECONDS = 1.12  # 28 frames: not a 4n+1 count, so the last latent frame's extra frame is cut


def _provenance(models, crop_size=64, **extractors):
    record = {"hubert": models.hubert, "hubert_layers": [-1], "wan_vae": models.wan_vae, **extractors}
    return {"checkpoint": "step4", "step": 4, "weights": "module",
            "training_data": [{"profile": "talking_head", "crop_size": crop_size, "extractors": record,
                               "untrained_dryrun_models": ["audio_features", "motion", "vae_latents"]}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, samples_dir):
    root = tmp_path_factory.mktemp("generate")
    models = dryrun_models()
    torch.manual_seed(0)
    model = DualForce(get_config("tiny", audio_dim=32))
    with torch.no_grad():  # weights that move the latents (a fresh model's zero heads would leave pure noise)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "model", _provenance(models))
    face = read_frames(samples_dir / "yongen.mp4")[0]
    cv2.imwrite(str(root / "face.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    run_ffmpeg(["-y", "-ss", "0.5", "-t", str(SECONDS), "-i", str(samples_dir / "yongen.mp4"), "-vn", "-ac", "2",
                "-ar", "22050", str(root / "speech.wav")], "speech")
    return root, models, model


def _generate(root, out, **kw):
    from training.generate import GenerateOptions, generate_video

    return generate_video(root / "model", root / "face.png", root / "speech.wav", out,
                          GenerateOptions(steps=2, progress=False, **kw))


@pytest.fixture(scope="module")
def generated(inputs):
    root, _, _ = inputs
    return _generate(root, root / "out.mp4", seed=3)


def test_mp4_frames_are_speech_seconds_times_25_with_the_speech(inputs, generated):
    root, _, _ = inputs
    result = generated
    info = probe(result.path)
    frames = read_frames(result.path)
    assert result.frames == len(frames) == round(SECONDS * 25) == 28 and frames.shape[1:] == (64, 64, 3)
    assert result.latent_frames == 8  # 4 * 7 + 1 = 29 >= 28
    assert info.has_audio and info.fps == 25
    speech = read_audio(root / "speech.wav")  # the same speech, as ffmpeg makes it 16 kHz mono
    muxed = read_audio(result.path)
    n = min(len(speech), len(muxed))
    assert abs(len(muxed) - 28 * 640) <= 640
    corr = np.corrcoef(speech[:n], muxed[:n])[0, 1]
    shifted = np.corrcoef(speech[: n - 800], muxed[800:n])[0, 1]  # 50 ms off: the check can fail
    assert corr > 0.95 and shifted < 0.8, (corr, shifted)
    record = json.loads(result.record.read_text())
    assert record["frames"] == 28 and record["untrained_dryrun"] is True and record["step"] == 4
    assert record["extractors"]["crop_size"] == 64 and result.dryrun
    # the face it used, beside the mp4: the crop of the image's face, where it was found
    face = cv2.cvtColor(cv2.imread(record["face"]["crop"]), cv2.COLOR_BGR2RGB)
    assert record["face"]["crop"] == str(result.path) + ".face.png" and record["face"]["faces_found"] == 1
    from tasks.crop_geometry import CropParams
    from tasks.face_image import crop_face_image, read_image
    from tasks.steps.crop import CropConfig

    expected = crop_face_image(read_image(root / "face.png"), CropConfig(params=CropParams(dsize=64)))
    assert np.array_equal(face, expected.crop) and record["face"]["center_xy"] == pytest.approx(expected.rect[:2])


def test_mp4_holds_the_samplers_frames(inputs, generated, tmp_path):
    """The written frames are the VAE decode of what the sampler makes from this face's latent and this speech's
    HuBERT rows with this seed (up to H.264), not some other seed's."""
    from models.dualforce.sampler import SamplerConfig, generate
    from models.hubert_features import load_hubert
    from models.wan_vae import load_wan_vae, output_to_frames
    from tasks.crop_geometry import CropParams
    from tasks.face_image import crop_face_image, read_image
    from tasks.media import VideoWriter
    from tasks.steps.crop import CropConfig
    from tasks.steps.vae_latents import encode_reference
    from training.generate import speech_features, speech_for_frames

    root, models, model = inputs
    written = read_frames(generated.path)
    wan = load_wan_vae(models.wan_vae)
    face = crop_face_image(read_image(root / "face.png"), CropConfig(params=CropParams(dsize=64)))
    reference = torch.from_numpy(encode_reference(wan, face.crop).astype(np.float32))[None]
    audio, frames = speech_for_frames(root / "speech.wav")
    features = torch.from_numpy(speech_features(audio, frames, load_hubert(models.hubert), (-1,)).astype(np.float32))[None]

    def decoded(seed):
        latents, _ = generate(model, reference, features, SamplerConfig(steps=2), torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            return output_to_frames(wan.vae.decode(wan.denormalise(latents)).sample)[0][:frames]

    def encoded(frames_uint8, name):  # through the same (bit-exact) H.264 settings
        with VideoWriter(tmp_path / name, 64, 64) as writer:
            writer.write(frames_uint8)
        return read_frames(tmp_path / name)

    assert np.array_equal(written, encoded(decoded(3), "seed3.mp4"))
    assert not np.array_equal(written, encoded(decoded(4), "seed4.mp4"))


def test_extractors_from_provenance_and_overrides(inputs):
    from training.generate import GenerateError, GenerateOptions, extractors_for

    _, models, _ = inputs
    got = extractors_for(_provenance(models, wan_vae_subfolder="vae"), GenerateOptions())
    assert (got.hubert, got.wan_vae, got.wan_vae_subfolder, got.crop_size) == (models.hubert, models.wan_vae, "vae", 64)
    assert got.untrained_dryrun_models == ["audio_features", "motion", "vae_latents"]
    assert extractors_for(_provenance(models), GenerateOptions(hubert="/h", hubert_layers=(9,))).hubert_layers == (9,)
    with pytest.raises(GenerateError, match="--hubert and --wan-vae"):
        extractors_for({"training_data": []}, GenerateOptions())
    two = _provenance(models)
    two["training_data"].append(dict(two["training_data"][0], extractors={"hubert": "/other", "wan_vae": "/v"}))
    with pytest.raises(GenerateError, match="different extractors"):
        extractors_for(two, GenerateOptions())


def test_streaming_sampler_bounds_the_cache_by_the_training_window(inputs):
    from training.generate import GenerateError, streaming_sampler

    _, models, _ = inputs
    trained = _provenance(models)
    trained["training_data"][0]["window_frames"] = 21  # 6 latent frames
    assert streaming_sampler(trained, 4).cache_window == 4  # sink 1 + window 4 + chunk 1 = 6
    assert streaming_sampler(trained, 4, chunk_frames=2, sink_frames=0).cache_window == 4
    assert streaming_sampler(trained, 4, cache_window=0).cache_window is None  # asked for: unbounded
    assert streaming_sampler(_provenance(models), 4).cache_window is None  # window not recorded: unbounded
    with pytest.raises(GenerateError, match="more than the 6 the model was trained on"):
        streaming_sampler(trained, 4, cache_window=5)


def test_cli_exit_codes_for_bad_inputs(inputs, tmp_path, capsys):
    from flows.cli import main

    root, models, _ = inputs
    common = ["generate", "--model", str(root / "model"), "--audio", str(root / "speech.wav"), "--steps", "1",
              "--no-progress"]
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((128, 128, 3), 200, np.uint8))
    assert main([*common, "--image", str(blank), "-o", str(tmp_path / "a.mp4")]) == 6
    assert "no_face" in capsys.readouterr().err and not (tmp_path / "a.mp4").exists()
    assert main([*common, "--image", str(root / "face.png"), "--wan-vae", str(tmp_path / "absent"),
                 "-o", str(tmp_path / "b.mp4")]) == 7
    DualForce(get_config("tiny", video_only=True)).save_pretrained(tmp_path / "video_only", _provenance(models))
    args = ["generate", "--model", str(tmp_path / "video_only"), "--image", str(root / "face.png"), "--audio",
            str(root / "speech.wav"), "-o", str(tmp_path / "c.mp4")]
    assert main(args) == 2 and "video-only" in capsys.readouterr().err
    DualForce(get_config("tiny", audio_dim=48)).save_pretrained(tmp_path / "wide", _provenance(models))
    args[2] = str(tmp_path / "wide")
    assert main(args) == 2 and "32-wide" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.mp4"))


def test_the_record_names_the_cache_window_it_chose(inputs, tmp_path):
    from training.generate import GenerateOptions, generate_video, streaming_sampler

    root, models, model = inputs
    provenance = _provenance(models)
    provenance["training_data"][0]["window_frames"] = 17  # 5 latent frames: the window bounds the cache
    model.save_pretrained(tmp_path / "model", provenance)
    result = generate_video(tmp_path / "model", root / "face.png", root / "speech.wav", tmp_path / "o.mp4",
                            GenerateOptions(steps=2, progress=False))
    record = json.loads(result.record.read_text())
    chosen = streaming_sampler(provenance, 2).cache_window
    assert isinstance(chosen, int) and record["sampler"]["cache_window"] == chosen
    assert record["options"]["cache_window"] is None  # what the user asked for: nothing
