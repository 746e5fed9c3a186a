"""`dualforce generate`: an exported model + one face image + speech -> an mp4, streamed.

The face image is cut as the crop step cuts clips (tasks/face_image.py) and VAE-encoded as the reference; the speech
(any file ffmpeg reads, any rate and channels -> 16 kHz mono) becomes HuBERT rows aligned to video frames exactly
as the audio step aligns them; the KV-cache sampler makes latent frames chunk by chunk, the Wan VAE decodes each as
it comes (CausalStreamDecoder) and the frames go straight to the encoder with the speech muxed in. Which HuBERT,
Wan VAE and crop size come from the model's provenance.json (written by `dualforce export`), so the model, the
image and the speech are enough; flags override them. T = round(speech seconds x 25) frames are written: the
sampler makes 4(L-1)+1 >= T (whole latent frames; the audio rows past the speech are zero-padded as the audio step
pads) and the writer keeps the first T. A beside-file `<out>.json` records what was used and how long it took.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from models.dualforce import DualForce
from models.dualforce.frames import num_latent_frames
from models.dualforce.sampler import GeneratedChunk, SamplerConfig, check_cache_fits, default_cache_window, stream
from models.wan_vae import CausalStreamDecoder, WanVae
from tasks.contract import AUDIO_SAMPLES_PER_FRAME, FPS, SAMPLE_RATE
from tasks.errors import ClipRejected

log = logging.getLogger(__name__)


class GenerateError(ValueError):
    """The model cannot generate as asked (a video-only model, unknown extractors, widths that do not fit)."""


@dataclass
class GenerateOptions:
    seconds: Optional[float] = None  # use the first this-many seconds of the speech (None: all of it)
    steps: int = 20  # Euler steps per latent frame
    audio_guidance: float = 1.0  # classifier-free guidance scale on the speech (1: none)
    reference_guidance: float = 1.0  # ... on the reference image (1: none)
    seed: int = 0
    chunk_frames: int = 1  # latent frames denoised together
    cache_window: Optional[int] = None  # latent frames the KV cache keeps (None: what the training window allows; 0: all)
    sink_frames: int = 1  # first latent frames a bounded cache keeps (the reference always stays)
    attention: Optional[str] = None  # "sdpa" / "flex" (None: the model's config)
    device: Optional[str] = None  # None: CUDA when available
    hubert: Optional[str] = None  # override the provenance's extractors
    hubert_layers: Optional[tuple[int, ...]] = None
    wan_vae: Optional[str] = None
    wan_vae_subfolder: Optional[str] = None
    progress: bool = True

    def sampler(self, provenance: dict[str, Any]) -> SamplerConfig:
        return streaming_sampler(provenance, steps=self.steps, chunk_frames=self.chunk_frames,
                                 audio_guidance=self.audio_guidance, reference_guidance=self.reference_guidance,
                                 cache_window=self.cache_window, sink_frames=self.sink_frames)


def trained_latent_frames(provenance: dict[str, Any]) -> Optional[int]:
    """Latent frames of the shortest talking-head training window (provenance.json); None when not recorded."""
    windows = [int(d["window_frames"]) for d in talking_head_data(provenance.get("training_data", []))
               if d.get("window_frames")]
    return num_latent_frames(min(windows)) if windows else None


def streaming_sampler(provenance: dict[str, Any], steps: int, chunk_frames: int = 1, audio_guidance: float = 1.0,
                      reference_guidance: float = 1.0, cache_window: Optional[int] = None,
                      sink_frames: int = 1) -> SamplerConfig:
    """The sampler for a long stream: a bounded KV cache as wide as the model's training window allows (memory flat,
    frame distances within what training saw), unless `cache_window` says otherwise (0: unbounded)."""
    trained = trained_latent_frames(provenance)
    window = cache_window or None
    if cache_window is None and trained is not None:
        window = default_cache_window(trained, sink_frames, chunk_frames)
    cfg = SamplerConfig(steps=steps, chunk_frames=chunk_frames, audio_guidance=audio_guidance,
                        reference_guidance=reference_guidance, cache_window=window, sink_frames=sink_frames)
    if trained is not None:
        try:
            check_cache_fits(cfg, trained)
        except ValueError as exc:
            raise GenerateError(str(exc)) from None
    return cfg


@dataclass
class Extractors:
    """What the model's training data was made with (provenance.json), after any override."""

    hubert: str
    hubert_layers: tuple[int, ...]
    wan_vae: str
    wan_vae_subfolder: Optional[str]
    crop_size: int
    untrained_dryrun_models: list[str] = field(default_factory=list)


@dataclass
class StreamStats:
    latent_frames: int = 0
    sampling_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class GenerateResult:
    path: Path
    frames: int
    latent_frames: int
    seconds: float  # wall time, all of it
    sampling_s: float
    decode_s: float
    prepare_s: float  # models loaded, image cropped and encoded, speech features
    dryrun: bool
    record: Path  # the beside-file <out>.json

    @property
    def latent_frames_per_s(self) -> float:
        return self.latent_frames / max(self.sampling_s + self.decode_s, 1e-9)


def talking_head_data(training_data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shard sets (export.training_data's entries) that record the extractors their samples were made with."""
    return [d for d in training_data if d.get("profile", "talking_head") == "talking_head" and d.get("extractors")]


def recorded_extractors(training_data: list[dict[str, Any]], overridden: bool = False) -> dict[str, Any]:
    """The one extractor record of a run's talking-head shard sets ({} when none records it); sets made with
    different extractors are an error unless the caller names its own (`overridden`)."""
    records = talking_head_data(training_data)
    distinct = {json.dumps(d["extractors"], sort_keys=True) for d in records}
    if len(distinct) > 1 and not overridden:
        raise GenerateError(f"the model was trained on shard sets made with different extractors ({sorted(distinct)}); "
                            "name the ones to use with --hubert and --wan-vae")
    return records[0]["extractors"] if records else {}


def extractors_for(provenance: dict[str, Any], options: GenerateOptions) -> Extractors:
    """The talking-head training data's extractors from provenance.json, each overridable by an option."""
    records = talking_head_data(provenance.get("training_data", []))
    found = recorded_extractors(records, overridden=bool(options.hubert and options.wan_vae))
    hubert = options.hubert or found.get("hubert")
    wan_vae = options.wan_vae or found.get("wan_vae")
    if not hubert or not wan_vae:
        missing = " and ".join(n for n, v in (("--hubert", hubert), ("--wan-vae", wan_vae)) if not v)
        raise GenerateError(f"the model's provenance.json does not record which HuBERT / Wan VAE made its training "
                            f"data; pass {missing}")
    layers = options.hubert_layers or tuple(found.get("hubert_layers") or (-1,))
    crop_sizes = {int(d.get("crop_size") or provenance.get("crop_size") or 512) for d in records} or {
        int(provenance.get("crop_size") or 512)}
    dryrun = untrained_dryrun_of(records)
    return Extractors(hubert, tuple(layers), wan_vae, options.wan_vae_subfolder or found.get("wan_vae_subfolder"),
                      max(crop_sizes), dryrun)


def speech_for_frames(path: str | Path, seconds: Optional[float] = None) -> tuple[np.ndarray, int]:
    """16 kHz mono float32 speech (cut to `seconds`) and its frame count T = round(duration x 25)."""
    from tasks.media import MediaError, read_audio

    try:
        audio = read_audio(path, SAMPLE_RATE)
    except MediaError as exc:
        raise ClipRejected("unreadable_audio", f"{path}: {exc}") from exc
    if seconds is not None:
        audio = audio[: int(round(seconds * SAMPLE_RATE))]
    frames = int(round(len(audio) / AUDIO_SAMPLES_PER_FRAME))
    if frames < 1:
        raise ClipRejected("no_audio", f"{path}: no speech to drive the video ({len(audio)} samples)")
    return audio, frames


def speech_features(audio: np.ndarray, frames: int, hubert, layers: tuple[int, ...]) -> np.ndarray:
    """HuBERT rows [4(L-1)+1, D] for the whole latent frames covering `frames` video frames (the audio step's
    alignment; rows past the speech are of zero padding, as the audio step pads)."""
    from models.hubert_features import HubertLayers
    from tasks.steps.audio_features import AudioFeatureConfig, extract_audio_features

    covered = 4 * ((frames + 2) // 4) + 1  # the fewest 4(L-1)+1 frames >= frames
    result = extract_audio_features(audio, covered, hubert, AudioFeatureConfig(layers=HubertLayers(tuple(layers))))
    if result.status in ("no_audio", "silent"):
        raise ClipRejected("silent_audio" if result.status == "silent" else "no_audio",
                           f"the speech is {result.status} (RMS {result.rms:.2e}): nothing to drive the mouth")
    return result.features


def stream_frames(model: DualForce, wan: WanVae, reference_latent: torch.Tensor, audio_features: torch.Tensor,
                  cfg: SamplerConfig, generator: torch.Generator, stats: Optional[StreamStats] = None,
                  on_latent_frame: Optional[Callable[[int], None]] = None,
                  on_chunk: Optional[Callable[[GeneratedChunk], None]] = None) -> Iterator[np.ndarray]:
    """Decoded uint8 frames [n, H, W, 3] of the sampler's chunks, as each chunk finishes (batch 1); `on_chunk`
    sees each chunk's latents and struct rows before its frames are decoded (evaluate's latent-space rows).

    reference_latent [1, 16, 1, h, w], audio_features [1, T, A] with T = 4(L-1)+1."""
    stats = stats if stats is not None else StreamStats()
    decoder = CausalStreamDecoder(wan)
    chunks = stream(model, reference_latent, audio_features, cfg, generator)
    try:
        while True:
            start = time.perf_counter()
            chunk = next(chunks, None)
            stats.sampling_s += time.perf_counter() - start
            if chunk is None:
                break
            if on_chunk is not None:
                on_chunk(chunk)
            start = time.perf_counter()
            frames = decoder.push(chunk.video_latents)[0]
            stats.decode_s += time.perf_counter() - start
            stats.latent_frames += chunk.video_latents.shape[2]
            if on_latent_frame is not None:
                on_latent_frame(chunk.video_latents.shape[2])
            yield frames
    finally:
        decoder.close()


def pick_device(device: Optional[str]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_speaking_model(model_dir: str | Path, device: torch.device, attention: Optional[str] = None) -> DualForce:
    """An exported model in bf16 on CUDA (fp32 on CPU), on the `attention` path if named; a video-only (pretrain)
    model takes no speech: refused."""
    model = DualForce.from_pretrained(model_dir, device=device,
                                      dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if attention:
        model.set_attention_backend(attention)
    if model.config.video_only:
        raise GenerateError(f"{model_dir} is a video-only model (the pretrain stage): it takes no speech; export "
                            "a joint-stage run to generate talking heads")
    return model


def load_recorded_wan_vae(training_data: list[dict[str, Any]], override: Optional[str], subfolder: Optional[str],
                          device: torch.device, where: str) -> WanVae:
    """The Wan VAE the talking-head training data records (or `override`); `where` names what to set when absent."""
    from models.wan_vae import load_wan_vae

    record = recorded_extractors(training_data, overridden=bool(override))
    vae = override or record.get("wan_vae")
    if not vae:
        raise GenerateError(f"the training data does not record its Wan VAE; {where}")
    return load_wan_vae(vae, subfolder or record.get("wan_vae_subfolder"), device=device)


def untrained_dryrun_of(training_data: list[dict[str, Any]]) -> list[str]:
    """The steps whose extractors were the dry-run's untrained ones, over every shard set of the training data."""
    return sorted({m for d in training_data for m in d.get("untrained_dryrun_models", [])})


def load_generation_models(model_dir: str | Path, options: GenerateOptions):
    """(model, extractors, hubert, wan) for a model folder; every width checked against the others."""
    from models.hubert_features import load_hubert
    from models.wan_vae import load_wan_vae

    device = pick_device(options.device)
    model = load_speaking_model(model_dir, device, options.attention)
    extractors = extractors_for(model.provenance, options)
    hubert = load_hubert(extractors.hubert, device=device)
    wan = load_wan_vae(extractors.wan_vae, extractors.wan_vae_subfolder, device=device)
    if hubert.hidden_size != model.config.audio_dim:
        raise GenerateError(f"HuBERT {extractors.hubert} gives {hubert.hidden_size}-wide features; the model takes "
                            f"{model.config.audio_dim}")
    if wan.z_dim != model.config.latent_channels:
        raise GenerateError(f"the Wan VAE has {wan.z_dim} latent channels; the model takes {model.config.latent_channels}")
    return model, extractors, hubert, wan


def _is_our_record(record: Path) -> bool:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"video", "latent_frames", "options", "extractors"} <= set(data)


def check_video_target(out: str | Path) -> None:
    """Raise GenerateError unless `out` is new or an earlier output of ours (the mp4 with our `<out>.json` record
    beside it): a file we did not write is never replaced."""
    out = Path(out)
    record = out.with_name(out.name + ".json")
    if out.is_dir():
        raise GenerateError(f"{out} is a folder; -o names the mp4 to write")
    if record.exists() and not _is_our_record(record):
        raise GenerateError(f"{record} is not a record of an earlier generate; refusing to replace it: choose "
                            f"another output name")
    if (out.exists() or out.is_symlink()) and not record.exists():
        raise GenerateError(f"{out} exists and is not an earlier output of generate (no {record.name} beside it); "
                            f"refusing to replace it: choose another output name")


def generate_video(model_dir: str | Path, image: str | Path, speech: str | Path, out: str | Path,
                   options: GenerateOptions = GenerateOptions()) -> GenerateResult:
    """Write `out` (H.264 + AAC, 25 fps, crop_size^2) and `<out>.json`; see the module docstring. An existing
    `out` is replaced only when it is an earlier output of ours (check_video_target)."""
    import cv2
    from tqdm.auto import tqdm

    from tasks.crop_geometry import CropParams
    from tasks.face_image import crop_face_image, read_image
    from tasks.media import VideoWriter, write_wav
    from tasks.steps.crop import CropConfig
    from tasks.steps.vae_latents import encode_reference

    started = time.perf_counter()
    out = Path(out)
    check_video_target(out)  # before any work
    for flag, path in (("--image", image), ("--audio", speech)):  # before the models are loaded
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    model, extractors, hubert, wan = load_generation_models(model_dir, options)
    dryrun = bool(extractors.untrained_dryrun_models) or hubert.untrained_dryrun or wan.untrained_dryrun
    if dryrun:
        log.warning("DRY-RUN model: the extractors (and the model) are small random or toy-trained ones; the video "
                    "is noise, the plumbing is real")
    size = extractors.crop_size
    face = crop_face_image(read_image(image), CropConfig(params=CropParams(dsize=size)))
    cx, cy, side = (float(v) for v in face.rect[:3])
    log.info("generate: the face at (%.0f, %.0f), %.0f px wide, the largest of %d found in %s", cx, cy, side,
             face.faces, image)
    reference = torch.from_numpy(encode_reference(wan, face.crop).astype(np.float32))[None]  # [1, 16, 1, h, w]
    audio, frames = speech_for_frames(speech, options.seconds)
    features = speech_features(audio, frames, hubert, extractors.hubert_layers)  # [4(L-1)+1, D]
    device = next(model.parameters()).device
    audio_features = torch.from_numpy(features.astype(np.float32))[None].to(device)
    latent_frames = num_latent_frames(len(features))
    prepared = time.perf_counter()

    generator = torch.Generator(device=device).manual_seed(options.seed)
    stats = StreamStats()
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with tempfile.TemporaryDirectory(prefix=".generate-", dir=out.parent) as tmp:
        speech_wav = write_wav(Path(tmp) / "speech.wav", audio[: frames * AUDIO_SAMPLES_PER_FRAME])
        with tqdm(total=latent_frames, unit="latent frame", desc="generate", disable=not options.progress) as bar, \
                VideoWriter(out, size, size, fps=FPS, audio=speech_wav) as writer:
            for chunk_frames in stream_frames(model, wan, reference.to(device), audio_features,
                                              options.sampler(model.provenance),
                                              generator, stats, bar.update):
                keep = chunk_frames[: frames - written]
                if len(keep):
                    writer.write(keep)
                    written += len(keep)
        face_png = out.with_name(out.name + ".face.png")  # the reference the model was given, as it saw it
        cv2.imwrite(str(Path(tmp) / "face.png"), cv2.cvtColor(face.crop, cv2.COLOR_RGB2BGR))
        os.replace(Path(tmp) / "face.png", face_png)
    result = GenerateResult(out, written, stats.latent_frames, time.perf_counter() - started, stats.sampling_s,
                            stats.decode_s, prepared - started, dryrun, out.with_name(out.name + ".json"))
    _write_record(result, model_dir, image, speech, options, extractors, model.provenance,
                  {"crop": str(face_png), "center_xy": [cx, cy], "size_px": side,
                   "angle_deg": math.degrees(float(face.rect[3])), "faces_found": face.faces})
    return result


def _write_record(result: GenerateResult, model_dir, image, speech, options: GenerateOptions, extractors: Extractors,
                  provenance: dict, face: dict[str, Any]) -> None:
    record = {
        "video": str(result.path), "frames": result.frames, "fps": FPS, "latent_frames": result.latent_frames,
        "model": str(Path(model_dir).resolve()), "image": str(image), "face": face, "speech": str(speech),
        "checkpoint": provenance.get("checkpoint"), "step": provenance.get("step"), "weights": provenance.get("weights"),
        "options": asdict(options), "sampler": asdict(options.sampler(provenance)),  # the cache window it chose
        "extractors": asdict(extractors), "untrained_dryrun": result.dryrun,
        "seconds": {"total": result.seconds, "prepare": result.prepare_s, "sampling": result.sampling_s,
                    "decode": result.decode_s},
        "latent_frames_per_s": result.latent_frames_per_s,
    }
    tmp = result.record.with_name(f".{result.record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(result.record)
