"""Validation samples during training: every K steps rank 0 generates a few fixed held-out clips and writes what a
person needs to judge them.

Each clip (training/heldout.py: the first window of each of the first clips of the val split) is generated from
its own first frame (the shard's reference latent) and its own HuBERT rows, with a fixed seed, by the weights one
would sample from (the EMA when the run keeps one), through the same streaming sampler + VAE decoder as
`dualforce generate`. Written under RUN_DIR/samples/:
  step{N:06d}-{key}.mp4   ground truth | generated, side by side, the clip's speech muxed in
  step{N:06d}.png         contact sheet: per clip a row of ground-truth frames over the generated ones
  step{N:06d}.json        what was generated (clips, weights, sampler settings, seconds)
and the sheet goes to TensorBoard. The flow publishes the newest as artifacts; the review gate shows them.
ZeRO-3 partitions the weights across ranks, so rank 0 alone cannot sample: such a run says so and writes none
(export a checkpoint and `dualforce generate` instead).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from pydantic import ConfigDict

from training.heldout import HeldOutClip, held_out_clips

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
SAMPLES_DIR = "samples"
SHEET_FRAMES = 6  # frames per clip in the contact sheet
TILE = 160


@dataclass
class ValidationConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # as a flow parameter: a misspelt key is an error, not dropped

    every: int = 0  # steps between validation samples (0: none)
    clips: int = 2  # held-out clips generated each time
    split: Optional[str] = None  # None: val, then test, else (a toy set) train
    shards: Optional[str] = None  # a shard set folder (default: the run's first shard set)
    sampler_steps: int = 10  # Euler steps per latent frame
    audio_guidance: float = 1.0
    seed: int = 0
    wan_vae: Optional[str] = None  # override the VAE the shard set records
    wan_vae_subfolder: Optional[str] = None
    # held-out windows for the conditioning-use ratios in each round's record (training/conditioning_use.py; the
    # rollout drift is left to evaluate and the gate, it costs a stream per frame); 0: none
    conditioning_windows: int = 0

    def __post_init__(self) -> None:
        if self.every < 0 or self.clips < 1 or self.sampler_steps < 1 or self.conditioning_windows < 0 \
                or self.conditioning_windows == 1:
            raise ValueError(f"validation needs every >= 0, clips >= 1, sampler_steps >= 1, conditioning_windows 0 "
                             f"or >= 2; got {asdict(self)}")


def sample_stem(step: int) -> str:
    return f"step{step:06d}"


ROW_LABELS = ("truth", "generated", "time")  # the left column of each sheet row
ROW_LABEL_WIDTH = 96


def sheet_row(truth: np.ndarray, generated: np.ndarray, label: str) -> np.ndarray:
    """Ground-truth frames over generated frames at the same SHEET_FRAMES times, each strip labelled on the left,
    each time under its tiles ("0.32 s (frame 8)"), the clip's caption below."""
    import cv2

    from tasks.contact_sheet import LABEL, caption_bar
    from tasks.contract import FPS

    picks = np.linspace(0, len(truth) - 1, SHEET_FRAMES).round().astype(int)

    def strip(frames):
        return np.concatenate([cv2.resize(frames[i], (TILE, TILE), interpolation=cv2.INTER_AREA) for i in picks], 1)

    times = np.concatenate([caption_bar(TILE, f"{i / FPS:.2f} s (frame {i})") for i in picks], 1)
    body = np.concatenate([strip(truth), strip(generated), times, caption_bar(TILE * SHEET_FRAMES, label)], 0)
    left = np.concatenate([caption_bar(ROW_LABEL_WIDTH, text, height=h)
                           for text, h in zip(ROW_LABELS + ("",), (TILE, TILE, LABEL, LABEL))], 0)
    return np.concatenate([left, body], 1)


def side_by_side_frames(truth: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """[T, LABEL + H, 2W, 3]: ground truth | generated, under a bar naming each half."""
    from tasks.contact_sheet import caption_bar

    width = truth.shape[2]
    bar = np.concatenate([caption_bar(width, "truth"), caption_bar(width, "generated")], 1)  # [LABEL, 2W, 3]
    pair = np.concatenate([truth, generated[: len(truth)]], axis=2)
    return np.concatenate([np.broadcast_to(bar, (len(pair),) + bar.shape), pair], axis=1)


def write_side_by_side(path: Path, truth: np.ndarray, generated: np.ndarray, audio: np.ndarray) -> Path:
    """`side_by_side_frames` as one H.264 video with the speech (16 kHz mono float) muxed in, written atomically."""
    from tasks.media import VideoWriter, write_wav

    frames = side_by_side_frames(truth, generated)
    with tempfile.TemporaryDirectory(prefix=".side-by-side-", dir=path.parent) as tmp:
        speech = write_wav(Path(tmp) / "speech.wav", audio)
        with VideoWriter(path, frames.shape[2], frames.shape[1], audio=speech) as writer:
            writer.write(frames)
    return path


class Validator:
    """The held-out clips and the VAE, loaded once; `run` writes one validation round."""

    def __init__(self, vcfg: ValidationConfig, shard_pattern: str, training_data: list[dict[str, Any]],
                 device: "torch.device"):
        from training.generate import load_recorded_wan_vae, untrained_dryrun_of
        from training.shard_sets import shard_set_root

        self.cfg, self.device = vcfg, device
        root = shard_set_root(vcfg.shards or shard_pattern)
        self.clips: list[HeldOutClip] = held_out_clips(root, vcfg.clips, vcfg.split)
        if not self.clips:
            raise ValueError(f"validation: {root} has no talking-head sample to generate")
        self.wan = load_recorded_wan_vae(training_data, vcfg.wan_vae, vcfg.wan_vae_subfolder, device,
                                         f"set validation.wan_vae (validation on {root})")
        self.untrained_dryrun = untrained_dryrun_of(training_data)
        self.use_cfg, self.windows, self.windows_split = None, [], ""
        if vcfg.conditioning_windows:
            from training.conditioning_use import ConditioningUseConfig, held_out_windows

            self.use_cfg = ConditioningUseConfig(windows=vcfg.conditioning_windows, split=vcfg.split, seed=vcfg.seed,
                                                 drift_sampler_steps=0)
            self.windows, self.windows_split = held_out_windows(root, vcfg.conditioning_windows, vcfg.split)

    def run(self, model, step: int, out_dir: Path, weights: str, tensorboard=None) -> list[Path]:
        """Generate every clip with `model` (eval mode, no grad) and write the files; returns them."""
        import torch

        from models.dualforce.sampler import SamplerConfig
        from tasks.contact_sheet import write_png
        from training.generate import StreamStats, stream_frames

        samples = Path(out_dir) / SAMPLES_DIR
        samples.mkdir(parents=True, exist_ok=True)
        stem = sample_stem(step)
        sampler = SamplerConfig(steps=self.cfg.sampler_steps, audio_guidance=self.cfg.audio_guidance)
        rows, files, clips = [], [], []
        for clip in self.clips:
            started = time.perf_counter()
            reference = torch.from_numpy(clip.reference_latent)[None].to(self.device)
            features = torch.from_numpy(clip.audio_features)[None].to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            stats = StreamStats()
            generated = np.concatenate(list(stream_frames(model, self.wan, reference, features, sampler, generator,
                                                          stats)))[: len(clip.frames)]
            path = write_side_by_side(samples / f"{stem}-{clip.key}.mp4", clip.frames, generated, clip.audio)
            rows.append(sheet_row(clip.frames, generated, f"{clip.key} ({clip.split}) step {step}: truth / generated"))
            files.append(path)
            clips.append({"key": clip.key, "clip_id": clip.clip_id, "split": clip.split, "video": path.name,
                          "frames": int(len(generated)), "seconds": time.perf_counter() - started,
                          "sampling_s": stats.sampling_s, "decode_s": stats.decode_s})
        sheet = np.concatenate(rows, axis=0)
        files.append(write_png(sheet, samples / f"{stem}.png"))
        if tensorboard is not None:
            tensorboard.add_image("validation/samples", sheet, step, dataformats="HWC")
        record = {"step": step, "weights": weights, "clips": clips, "sheet": f"{stem}.png",
                  "sampler": asdict(sampler), "untrained_dryrun_models": self.untrained_dryrun}
        if self.use_cfg is not None:
            record["conditioning"] = self._conditioning_rows(model, step, tensorboard)
        tmp = samples / f".{stem}.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        files.append(tmp.replace(samples / f"{stem}.json"))
        return files


    def _conditioning_rows(self, model, step: int, tensorboard=None) -> list[dict[str, Any]]:
        """The conditioning-use ratios of this round (rows as evaluate and the gate show them)."""
        from training.conditioning_use import measure_conditioning_use

        if len(self.windows) < 2:
            return [{"metric": "conditioning use", "ratio (median)": None,
                     "good": f"not measured: {len(self.windows)} held-out window(s), the ratios need 2 or more"}]
        use = measure_conditioning_use(model, self.windows, self.use_cfg, device=self.device, split=self.windows_split)
        if tensorboard is not None:
            for f in use.figures:
                tensorboard.add_scalar(f"conditioning/{f.probe}/{f.altered}/{f.stream}", f.ratio_median, step)
        return use.rows()


def latest_samples(run_dir: Path) -> Optional[dict[str, Any]]:
    """The newest validation round of a run (its json record, with `dir`), or None."""
    records = sorted((Path(run_dir) / SAMPLES_DIR).glob("step*.json"))
    if not records:
        return None
    return dict(json.loads(records[-1].read_text()), dir=str(records[-1].parent))
