"""`dualforce evaluate`: an exported model on a shard set's test split -> metrics, a table and plots.

Each held-out clip (training/heldout.py: the first window of each of the first `clips` clips of the split) is
generated from its own first frame (the shard's reference latent) and its own HuBERT rows, with a fixed seed,
through the streaming sampler and VAE decoder of `dualforce generate`, then measured against its ground truth by
training/eval_metrics (identity, LMD, pose / expression error, LSE-C / LSE-D, FID, FVD; a metric whose weights
are absent is reported as skipped with the reason, never guessed). The identity reference is the reference latent
image the model was given: the clip's frame 0 (what the reference latent encodes) when the window starts the clip,
else that latent decoded by the same VAE.

Latent-space rows need no weights and no face in the decoded frames, so they measure a dry-run model too: per
clip, the generated latents' MSE to the window's ground-truth latents and the struct stream's pose / mouth error
against the window's motion rows (per second); over the long generation, the latents' distance to the reference
latent (identity drift). Conditioning use (training/conditioning_use.py) on `conditioning_windows` windows of the
same split: the loss with the true speech / reference against another clip's and the null one, the bridge's effect
and the rollout drift, as ratios with their spread.

Long-sequence consistency (the review's ablation): one long generation of `long_seconds` driven by the split's
windows' HuBERT rows laid end to end (real speech, as many windows as it takes; the reference is the first
clip's), its identity similarity and head-pose drift per second. Windows are independent stretches, so the
speech jumps at window borders: the measure is the model's drift over time, not lip sync.

Written to OUT: evaluation.json (summary, per clip, long series), evaluation.md (the table), metric-*.png (a plot
per metric over time: frames for per-frame metrics, seconds for the long generation) and clips/<key>.mp4
(ground truth | generated, with the speech).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from training.eval_metrics.latent import LatentPair
from training.heldout import HeldOutClip, NoHeldOutClips, held_out_clips, no_clips_message

log = logging.getLogger(__name__)
REPORT_FILE = "evaluation.json"
TABLE_FILE = "evaluation.md"


@dataclass
class EvaluateOptions:
    split: Optional[str] = "test"  # None: val, then test, else train (a toy set)
    clips: int = 16
    sampler_steps: int = 20
    audio_guidance: float = 1.0
    seed: int = 0
    long_seconds: float = 60.0  # the long generation for long-sequence consistency (0: none)
    conditioning_windows: int = 8  # windows for the conditioning-use ratios (0: none)
    cache_window: Optional[int] = None  # the KV cache (training/generate.streaming_sampler; 0: unbounded)
    sink_frames: int = 1
    attention: Optional[str] = None  # "sdpa" / "flex" (None: the model's config)
    liveportrait: Optional[str] = None  # LivePortrait root: pose / expression error, pose drift
    syncnet: Optional[str] = None  # SyncNet weights: LSE-C / LSE-D
    i3d: Optional[str] = None  # I3D (Kinetics-400) weights: FVD
    fid_inception: Optional[str] = None  # pytorch-fid's Inception weights: FID
    wan_vae: Optional[str] = None  # override the VAE the model's provenance records
    wan_vae_subfolder: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True
    i3d_size: Optional[int] = None  # input sizes other than the standard 224 / 299: quick tests only
    inception_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.clips < 1 or self.sampler_steps < 1 or self.long_seconds < 0 or self.conditioning_windows < 0:
            raise ValueError(f"evaluate needs clips >= 1, sampler_steps >= 1, long_seconds >= 0, "
                             f"conditioning_windows >= 0; got {asdict(self)}")


@dataclass
class EvaluationReport:
    out_dir: Path
    summary: list[dict[str, Any]]  # MetricResult.to_json() per metric (set level)
    clips: list[dict[str, Any]]
    long_sequence: list[dict[str, Any]]
    seconds: float
    generate_s_per_clip: float
    conditioning: list[dict[str, Any]] = field(default_factory=list)  # conditioning-use ratios (MetricResult JSON)

    def value(self, name: str) -> Optional[float]:
        for r in self.summary + self.long_sequence + self.conditioning:
            if r["name"] == name:
                return r["value"]
        raise KeyError(name)


def _load(model_dir: str | Path, options: EvaluateOptions):
    from training.generate import load_recorded_wan_vae, load_speaking_model, pick_device

    device = pick_device(options.device)
    model = load_speaking_model(model_dir, device, options.attention)
    wan = load_recorded_wan_vae(model.provenance.get("training_data", []), options.wan_vae, options.wan_vae_subfolder,
                                device, "pass --wan-vae")
    return model, wan, device


def _sampler(options: EvaluateOptions, provenance: dict):
    from training.generate import streaming_sampler

    return streaming_sampler(provenance, options.sampler_steps, audio_guidance=options.audio_guidance,
                             cache_window=options.cache_window, sink_frames=options.sink_frames)


def _generated(model, wan, device, reference_latent: np.ndarray, features: np.ndarray, options: EvaluateOptions,
               bar=None, on_chunk=None) -> Iterator[np.ndarray]:
    from training.generate import stream_frames

    generator = torch.Generator(device=device).manual_seed(options.seed)
    yield from stream_frames(model, wan, torch.from_numpy(reference_latent)[None].to(device),
                             torch.from_numpy(features)[None].to(device), _sampler(options, model.provenance), generator,
                             on_latent_frame=bar.update if bar is not None else None, on_chunk=on_chunk)


def _sample_latents(model, device, reference_latent: np.ndarray, features: np.ndarray, options: EvaluateOptions,
                    bar, on_chunk) -> None:
    """The same sampling as `_generated` (same seed, same chunks) without the VAE decode."""
    from models.dualforce.sampler import stream

    generator = torch.Generator(device=device).manual_seed(options.seed)
    for chunk in stream(model, torch.from_numpy(reference_latent)[None].to(device),
                        torch.from_numpy(features)[None].to(device), _sampler(options, model.provenance), generator):
        on_chunk(chunk)
        bar.update(chunk.video_latents.shape[2])


def latent_pair(clip: HeldOutClip, chunks: list) -> Optional[LatentPair]:
    """The generated chunks' latents and struct rows beside the clip's shard window (None: the sample has none)."""
    if clip.video_latents is None or clip.struct is None or clip.keep_mask is None or not chunks:
        return None
    latents = torch.cat([c.video_latents for c in chunks], 2)[0].float().cpu().numpy()  # [16, L, h, w]
    rows = torch.cat([c.struct_rows for c in chunks], 1)[0].float().cpu().numpy()  # [T, S]
    return LatentPair(latents, clip.video_latents, rows, clip.struct, clip.keep_mask)


def conditioning_results(model, shards: str | Path, split: str, options: EvaluateOptions, device, out: Path) -> list:
    """The conditioning-use ratios on windows of the evaluated split as MetricResults, their plot as
    OUT/conditioning-use.png (skipped with the reason when the split has fewer than 2 windows)."""
    from training.conditioning_use import ConditioningUseConfig, held_out_windows, measure_conditioning_use
    from training.eval_metrics.results import MetricResult
    from training.plots import plot_conditioning_use

    if options.conditioning_windows == 0:
        return []
    cfg = ConditioningUseConfig(windows=max(2, options.conditioning_windows), split=split, seed=options.seed)
    windows, used = held_out_windows(shards, cfg.windows, split)
    if len(windows) < 2:
        return [MetricResult.skipped("conditioning use", f"the {split} split has {len(windows)} talking-head "
                                                         "window(s); the ratios need 2 or more")]
    use = measure_conditioning_use(model, windows, cfg, device=device, split=used)
    plot_conditioning_use(use, out / "conditioning-use.png", title=f"conditioning use on {used}")
    return use.metric_results()


def decode_reference(wan, reference_latent: np.ndarray) -> np.ndarray:
    """The reference image the model was given: its latent [16, 1, h, w] through the VAE decoder, uint8 [H, W, 3]."""
    from models.wan_vae import CausalStreamDecoder

    decoder = CausalStreamDecoder(wan)
    try:
        return decoder.push(torch.from_numpy(reference_latent)[None])[0, 0]
    finally:
        decoder.close()


def reference_image(wan, clip: HeldOutClip) -> np.ndarray:
    """The image the clip's reference latent was encoded from: its frame 0 when the window starts the clip (the
    held-out window usually does), else the latent decoded."""
    window = clip.meta.get("window") or [None]
    return clip.frames[0] if window[0] == 0 else decode_reference(wan, clip.reference_latent)


def long_drive(clips: list[HeldOutClip], frames: int) -> np.ndarray:
    """HuBERT rows for `frames` frames: the clips' windows end to end, cycled as often as needed."""
    rows, have = [], 0
    while have < frames:
        for clip in clips:
            rows.append(clip.audio_features)
            have += len(clip.audio_features)
            if have >= frames:
                break
    return np.concatenate(rows)[:frames]


def evaluate_model(model_dir: str | Path, shards: str | Path, out_dir: str | Path,
                   options: EvaluateOptions = EvaluateOptions()) -> EvaluationReport:
    """See the module docstring; returns the report also written to OUT/evaluation.json."""
    from tqdm.auto import tqdm

    from training.eval_metrics import EvalClip, EvalModels, EvalWeights, FeatureInputs, evaluate_set, long_sequence_consistency
    from training.eval_metrics.consistency import unmeasurable_long_sequence
    from training.eval_metrics.latent import distance_to_reference, latent_identity_drift
    from training.shard_sets import shard_set_root
    from training.validation import write_side_by_side

    started = time.perf_counter()
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    root = shard_set_root(str(shards))
    held = held_out_clips(root, options.clips, options.split)
    if not held:  # before the model is loaded: nothing to do
        raise NoHeldOutClips(no_clips_message(root, options.split))
    model, wan, device = _load(model_dir, options)
    weights = EvalWeights(*(Path(p) if p else None for p in (options.liveportrait, options.syncnet, options.i3d,
                                                              options.fid_inception)))
    networks = EvalModels.load(weights, device="cpu")
    eval_clips, generate_s = [], 0.0
    for clip in tqdm(held, desc="evaluate: generate", unit="clip", disable=not options.progress):
        t0 = time.perf_counter()
        chunks: list = []
        generated = np.concatenate(list(_generated(model, wan, device, clip.reference_latent, clip.audio_features,
                                                   options, on_chunk=chunks.append)))[: len(clip.frames)]
        generate_s += time.perf_counter() - t0
        write_side_by_side(out / "clips" / f"{clip.key}.mp4", clip.frames, generated, clip.audio)
        eval_clips.append(EvalClip(clip.key, generated, reference_image(wan, clip), clip.frames, clip.audio,
                                   latents=latent_pair(clip, chunks)))
    sizes = {k: v for k, v in (("i3d_size", options.i3d_size), ("inception_size", options.inception_size)) if v}
    evaluations, summary = evaluate_set(eval_clips, networks, FeatureInputs(**sizes))
    long_results = []
    if options.long_seconds > 0:
        frames = 4 * math.ceil((round(options.long_seconds * 25) - 1) / 4) + 1
        features = long_drive(held, frames)
        reference = held[0].reference_latent[:, :1]
        distances: list[np.ndarray] = []

        def to_reference(chunk) -> None:
            distances.append(distance_to_reference(chunk.video_latents[0].float().cpu().numpy(), reference))

        reference_rgb = reference_image(wan, held[0])
        long_results = unmeasurable_long_sequence(reference_rgb, networks.motion_extractor)
        if long_results:
            log.warning("evaluate: the long generation's frames are not decoded: nothing given can measure them "
                        "(%s); its latents still give the latent identity drift", long_results[0].reason)
        with tqdm(total=(frames - 1) // 4 + 1, desc="evaluate: long generation", unit="latent frame",
                  disable=not options.progress) as bar:
            if long_results:
                _sample_latents(model, device, held[0].reference_latent, features, options, bar, to_reference)
            else:
                long_results = long_sequence_consistency(
                    _generated(model, wan, device, held[0].reference_latent, features, options, bar, to_reference),
                    reference_rgb, networks.motion_extractor)
        long_results.append(latent_identity_drift(np.concatenate(distances)))
    conditioning = conditioning_results(model, root, held[0].split, options, device, out)
    report = EvaluationReport(
        out, [r.to_json() for r in summary],
        [{"key": e.name, "results": [r.to_json() for r in e.results]} for e in evaluations],
        [r.to_json() for r in long_results], time.perf_counter() - started, generate_s / len(held),
        [r.to_json() for r in conditioning])
    _write_report(report, model_dir, shards, options, [c.split for c in held][0], model.provenance)
    return report


def _write_report(report: EvaluationReport, model_dir, shards, options: EvaluateOptions, split: str,
                  provenance: dict) -> None:
    from training.eval_plots import plot_metric_series
    from training.generate import untrained_dryrun_of

    data = {"model": str(Path(model_dir).resolve()), "shards": str(shards), "split": split,
            "step": provenance.get("step"), "weights": provenance.get("weights"), "options": asdict(options),
            "summary": report.summary, "clips": report.clips, "long_sequence": report.long_sequence,
            "conditioning": report.conditioning,
            "seconds": report.seconds, "generate_s_per_clip": report.generate_s_per_clip,
            "untrained_dryrun_models": untrained_dryrun_of(provenance.get("training_data", []))}
    out = report.out_dir
    tmp = out / f".{REPORT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out / REPORT_FILE)
    (out / TABLE_FILE).write_text(table_markdown(data) + "\n")
    plot_metric_series(data, out)


def table_markdown(data: dict[str, Any]) -> str:
    """The evaluation table: one row per metric (set level, then the long generation's), value or why skipped."""
    lines = [f"## Evaluation of step {data.get('step')} on {data['split']} ({len(data['clips'])} clips)", ""]
    if data.get("untrained_dryrun_models"):
        lines += [f"Trained on shards from untrained dry-run extractors ({', '.join(data['untrained_dryrun_models'])}): "
                  "the numbers test the plumbing.", ""]
    lines += ["| metric | value | status | note | seconds |", "|---|---|---|---|---|"]
    for r in data["summary"] + data["long_sequence"] + data.get("conditioning", []):
        value = "" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"| {r['name']} | {value} | {r['status']} | {r['reason']} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def summary_lines(data: dict[str, Any], out_dir: str | Path) -> list[str]:
    """What `evaluate` prints: how many metrics have a value first, then the files that are really there."""
    rows = data["summary"] + data["long_sequence"] + data.get("conditioning", [])
    computed = [r for r in rows if r["status"] == "ok"]
    skipped = sorted({r["reason"] for r in rows if r["status"] != "ok"})
    lines = [f"{len(computed)} of {len(rows)} metrics computed"
             + (f"; skipped because: {'; '.join(skipped)}" if skipped else "")]
    out = Path(out_dir)
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if not p.name.startswith(".") and (p.is_file() or any(p.iterdir())))
    lines.append(f"written to {out}: {', '.join(written) or 'nothing'}")
    return lines
