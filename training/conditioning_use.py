"""Does the model use what it is given? The loss with the true condition against the loss with a wrong one.

The classic failure of audio-driven generators is a model that ignores the speech (lips driven by the reference and
the history alone) or the reference (identity drifts). Both show in the model's own latent / struct space long
before samples look good, and need no metric weights: on held-out windows, with the same noise and sigmas for
every condition (a paired comparison, so the ratio's spread is the model's, not the noise draw's),

    audio use      loss with another clip's speech / loss with the window's own speech   (and null speech / own)
    reference use  loss with another identity's reference / with the window's own         (and null reference / own)
    bridge effect  loss with the bridge closed (its gates zeroed) / with it open
    drift          per latent frame: rollout error / teacher-forced error (sampler with its own vs the true history)

for the video loss, the struct loss and the mouth rows' loss (LivePortrait's lip keypoints, or FLAME's expression +
jaw: aux_losses.mouth_columns). A ratio of 1 means the input changes nothing the model predicts; a model that uses
it predicts worse with the wrong one, ratio > 1. At initialisation the audio and reference paths are zero-gated, so
every use ratio is exactly 1: the figure moves only when training teaches the model to read the input.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from pydantic import ConfigDict

from models.dualforce.aux_losses import mouth_columns
from models.dualforce.frames import group_rows, keep_weights, tie_pad_rows
from tasks import contract

STREAMS = ("video", "struct", "mouth")
GOOD = {
    "audio": "> 1: the true speech predicts better than another clip's (1.00: the speech is ignored)",
    "reference": "> 1: the true identity predicts better than another's (1.00: the reference is ignored)",
    "bridge": "> 1: closing the bridge hurts, the streams inform each other (1.00: it does nothing)",
    "drift": "close to 1 and flat over frames: a generated history costs little more than the true one",
}


@dataclass
class ConditioningUseConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

    windows: int = 8  # held-out windows (round-robin over clips)
    split: Optional[str] = None  # None: val, then test, else train (a toy set), as validation
    sigma_min: float = 0.3  # fixed per-frame sigmas drawn in [sigma_min, sigma_max] (the middle of the schedule,
    sigma_max: float = 0.8  # where the condition decides most: near 0 the frame is given, near 1 it is noise)
    seed: int = 0
    batch_size: int = 4
    drift_sampler_steps: int = 4  # 0: no drift figure
    drift_windows: int = 2
    latent_crop: Optional[int] = None  # centre crop of the latents (CPU checks), None: whole frames

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < self.sigma_max <= 1.0 or self.windows < 2 or self.batch_size < 1:
            raise ValueError(f"conditioning use needs 0 <= sigma_min < sigma_max <= 1, windows >= 2, batch_size >= 1; "
                             f"got {asdict(self)}")


@dataclass
class HeldOutWindow:
    key: str
    clip_id: str
    tensors: dict[str, torch.Tensor]  # video_latents [16, L, h, w], reference_latent, struct [T, S], audio, keep


def held_out_windows(shard_root: str | Path, count: int, split: Optional[str] = None,
                     latent_crop: Optional[int] = None) -> tuple[list[HeldOutWindow], str]:
    """Up to `count` talking-head windows of `split` (default val, test, then train), taken round-robin over clips so
    that as many identities as possible appear; (windows, the split they came from)."""
    from tasks.steps.shard import iter_samples
    from training.heldout import HELD_OUT_SPLITS

    for name in ((split,) if split else (*HELD_OUT_SPLITS, "train")):
        by_clip: dict[str, list[HeldOutWindow]] = {}
        for sample in iter_samples(shard_root, split=name):
            meta = sample["meta"]
            if meta.get("profile", contract.TALKING_HEAD) != contract.TALKING_HEAD:
                continue
            by_clip.setdefault(str(meta.get("clip_id", sample["__key__"])), []).append(
                _window(sample, latent_crop))
            if sum(map(len, by_clip.values())) >= 4 * count:
                break
        picked: list[HeldOutWindow] = []
        queues = [list(ws) for ws in by_clip.values()]
        while len(picked) < count and any(queues):
            for q in queues:
                if q and len(picked) < count:
                    picked.append(q.pop(0))
        if picked:
            return picked, name
    return [], split or "none"


def _window(sample: dict, latent_crop: Optional[int]) -> HeldOutWindow:
    arrays = {key: torch.from_numpy(contract.load_npy(sample[member]).astype(np.float32))
              for key, member in (("video_latents", contract.VIDEO_LATENTS), ("reference_latent",
                                  contract.REFERENCE_LATENT), ("struct", contract.STRUCT),
                                  ("audio_features", contract.AUDIO_FEATURES), ("keep_mask", contract.KEEP_MASK))}
    arrays["keep_mask"] = arrays["keep_mask"].bool()
    if latent_crop:
        for key in ("video_latents", "reference_latent"):
            h, w = arrays[key].shape[-2:]
            y, x = (h - latent_crop) // 2, (w - latent_crop) // 2
            arrays[key] = arrays[key][..., y:y + latent_crop, x:x + latent_crop]
    meta = sample["meta"]
    return HeldOutWindow(sample["__key__"], str(meta.get("clip_id", sample["__key__"])), arrays)


def partners(windows: list[HeldOutWindow]) -> Optional[list[int]]:
    """For each window, the next window (cyclically) of another clip: whose speech / reference is "wrong"; None
    when every window comes from one clip (nothing to swap in)."""
    out = []
    for i, w in enumerate(windows):
        j = next((k % len(windows) for k in range(i + 1, i + len(windows))
                  if windows[k % len(windows)].clip_id != w.clip_id), None)
        if j is None:
            return None
        out.append(j)
    return out


@dataclass
class _Noise:
    eps_v: torch.Tensor
    eps_s: torch.Tensor
    sigma_v: torch.Tensor  # [B, L]
    sigma_s: torch.Tensor


def _fixed_noise(batch: dict[str, torch.Tensor], cfg: ConditioningUseConfig, first: int, sigma_struct_max: float,
                 device) -> _Noise:
    """The same draw for window i whatever else is in the batch (seeded by cfg.seed and the window's index)."""
    eps_v, eps_s, sig_v, sig_s = [], [], [], []
    x0_struct = group_rows(batch["struct"])
    for i in range(batch["video_latents"].shape[0]):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + first + i)
        eps_v.append(torch.randn(batch["video_latents"].shape[1:], generator=g))
        eps_s.append(torch.randn(x0_struct.shape[1:], generator=g))
        L = batch["video_latents"].shape[2]
        span = cfg.sigma_max - cfg.sigma_min
        sig_v.append(cfg.sigma_min + span * torch.rand(L, generator=g))
        sig_s.append(sigma_struct_max * (cfg.sigma_min + span * torch.rand(L, generator=g)))
    return _Noise(torch.stack(eps_v).to(device), tie_pad_rows(torch.stack(eps_s)).to(device),
                  torch.stack(sig_v).to(device), torch.stack(sig_s).to(device))


@torch.no_grad()
def window_losses(model, batch: dict[str, torch.Tensor], noise: _Noise, audio: Optional[torch.Tensor] = None,
                  reference: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-window losses [B] of each stream (video, struct, mouth rows) with the given audio features [B, T, A] and
    reference latent [B, 16, 1, h, w] (default: the batch's own), keep-weighted as the training loss."""
    x0_v = batch["video_latents"]
    x0_s = group_rows(batch["struct"])  # [B, L, G, S]
    sv, ss = noise.sigma_v[:, None, :, None, None], noise.sigma_s[:, :, None, None]
    audio = batch["audio_features"] if audio is None else audio
    reference = batch["reference_latent"] if reference is None else reference
    video_keep, struct_keep = keep_weights(batch["keep_mask"])  # [B, L], [B, L, G]
    pred_v, pred_s = model((1 - sv) * x0_v + sv * noise.eps_v, noise.sigma_v, (1 - ss) * x0_s + ss * noise.eps_s,
                           noise.sigma_s, reference, model.audio_windows(audio))
    err_v = (pred_v.float() - (noise.eps_v - x0_v)).pow(2).mean(dim=(1, 3, 4))  # [B, L]
    sq_s = (pred_s.float() - (noise.eps_s - x0_s)).pow(2)  # [B, L, G, S]
    mouth = mouth_columns(sq_s.shape[-1])
    out = {"video": (video_keep * err_v).sum(1) / video_keep.sum(1).clamp_min(1.0)}
    for name, cols in (("struct", slice(None)), ("mouth", mouth)):
        err = sq_s[..., cols].mean(-1)  # [B, L, G]
        out[name] = (struct_keep * err).sum((1, 2)) / struct_keep.sum((1, 2)).clamp_min(1.0)
    return out


@contextlib.contextmanager
def bridge_closed(model) -> Iterator[None]:
    """The bridge's gated residuals zeroed for the duration (the streams then run independently)."""
    gates = [p for n, p in model.named_parameters() if n.startswith("bridges.") and n.endswith("_gate")]
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.zero_()
        yield
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)


@dataclass
class UseFigure:
    """One input's effect on one stream: the losses' ratio (altered / true) over windows."""

    probe: str  # "audio" | "reference" | "bridge"
    altered: str  # "other clip's speech", "null speech", "other identity", "null reference", "bridge closed"
    stream: str  # video | struct | mouth
    true_loss: float  # mean over windows
    altered_loss: float
    ratio_median: float
    ratio_q25: float
    ratio_q75: float
    windows: int

    @property
    def name(self) -> str:
        return f"{self.probe} use ({self.altered}, {self.stream})"


def _figure(probe: str, altered: str, stream: str, true: torch.Tensor, alt: torch.Tensor) -> UseFigure:
    ratios = (alt / true.clamp_min(1e-12)).numpy()
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return UseFigure(probe, altered, stream, float(true.mean()), float(alt.mean()), float(q50), float(q25),
                     float(q75), int(len(ratios)))


@dataclass
class ConditioningUse:
    figures: list[UseFigure] = field(default_factory=list)
    drift: Optional[dict[str, list[float]]] = None  # rollout_mse, teacher_forced_mse, ratio per latent frame
    skipped: dict[str, str] = field(default_factory=dict)  # probe -> why it was not measured
    split: str = ""
    windows: int = 0
    latent_frames: int = 0

    def get(self, probe: str, altered: str, stream: str) -> Optional[UseFigure]:
        return next((f for f in self.figures if (f.probe, f.altered, f.stream) == (probe, altered, stream)), None)

    def rows(self) -> list[dict[str, Any]]:
        """One row per figure (and per skipped probe): evaluate's table, validation's record, the gate's card."""
        rows = [{"metric": f.name, "ratio (median)": round(f.ratio_median, 4),
                 "spread (q25-q75)": f"{f.ratio_q25:.4f}-{f.ratio_q75:.4f}", "true loss": round(f.true_loss, 5),
                 "altered loss": round(f.altered_loss, 5), "windows": f.windows, "good": GOOD[f.probe]}
                for f in self.figures]
        if self.drift:
            ratio = self.drift["ratio"]
            rows.append({"metric": f"drift (rollout / teacher-forced, {len(ratio)} latent frames)",
                         "ratio (median)": round(float(np.median(ratio[1:] or ratio)), 4),
                         "spread (q25-q75)": "per frame: " + " ".join(f"{r:.2f}" for r in ratio),
                         "true loss": None, "altered loss": None, "windows": self.drift.get("windows"),
                         "good": GOOD["drift"]})
        rows += [{"metric": f"{probe} use", "ratio (median)": None, "spread (q25-q75)": None, "true loss": None,
                  "altered loss": None, "windows": 0, "good": f"not measured: {why}"}
                 for probe, why in self.skipped.items()]
        return rows

    def metric_results(self) -> list:
        """The figures as evaluate's MetricResults: value = the median ratio, the spread and losses in details, what
        good looks like as the note; the drift's per-frame ratios as its series; unmeasured probes skipped."""
        from training.eval_metrics.results import MetricResult

        out = [MetricResult(f.name, f.ratio_median, reason=f"good: {GOOD[f.probe]}",
                            details={"ratio_q25": f.ratio_q25, "ratio_q75": f.ratio_q75, "true_loss": f.true_loss,
                                     "altered_loss": f.altered_loss, "windows": float(f.windows)})
               for f in self.figures]
        if self.drift:
            ratio = self.drift["ratio"]
            out.append(MetricResult("drift (rollout / teacher-forced)", float(np.median(ratio[1:] or ratio)),
                                    reason=f"good: {GOOD['drift']}", series=list(ratio),
                                    details={"windows": float(self.drift["windows"]), "latent_frames": float(len(ratio))}))
        out += [MetricResult.skipped(f"{probe} use", why) for probe, why in self.skipped.items()]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"figures": [dict(asdict(f), name=f.name) for f in self.figures], "drift": self.drift,
                "skipped": self.skipped, "split": self.split, "windows": self.windows,
                "latent_frames": self.latent_frames}


def _stack(windows: list[HeldOutWindow], device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([w.tensors[k] for w in windows]).to(device) for k in windows[0].tensors}


def measure_conditioning_use(model, windows: list[HeldOutWindow], cfg: ConditioningUseConfig,
                             sigma_struct_max: float = 0.7, device=None, split: str = "") -> ConditioningUse:
    """Every probe on `windows` (model in eval mode; its train/eval state is restored)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    report = ConditioningUse(split=split, windows=len(windows),
                             latent_frames=int(windows[0].tensors["video_latents"].shape[1]) if windows else 0)
    try:
        if model.config.video_only:
            report.skipped = {p: "a video-only model has no audio, struct or bridge" for p in ("audio", "bridge")}
            return report
        pair = partners(windows)
        losses: dict[str, dict[str, list[torch.Tensor]]] = {}
        for first in range(0, len(windows), cfg.batch_size):
            chunk = windows[first:first + cfg.batch_size]
            batch = _stack(chunk, device)
            noise = _fixed_noise(batch, cfg, first, sigma_struct_max, device)
            variants = {"true": {}, "null speech": {"audio": torch.zeros_like(batch["audio_features"])},
                        "null reference": {"reference": torch.zeros_like(batch["reference_latent"])}}
            if pair is not None:
                others = [windows[pair[first + i]] for i in range(len(chunk))]
                variants["other clip's speech"] = {"audio": _stack(others, device)["audio_features"]}
                variants["other identity"] = {"reference": _stack(others, device)["reference_latent"]}
            for name, kwargs in variants.items():
                _collect(losses, name, window_losses(model, batch, noise, **kwargs))
            if model.bridges:
                with bridge_closed(model):
                    _collect(losses, "bridge closed", window_losses(model, batch, noise))
        cat = {name: {s: torch.cat(v).cpu() for s, v in per.items()} for name, per in losses.items()}
        probes = [("audio", "other clip's speech"), ("audio", "null speech"), ("reference", "other identity"),
                  ("reference", "null reference"), ("bridge", "bridge closed")]
        for probe, altered in probes:
            if altered in cat:
                for stream in STREAMS:
                    if probe == "reference" and stream == "mouth":
                        continue
                    report.figures.append(_figure(probe, altered, stream, cat["true"][stream], cat[altered][stream]))
        if pair is None:
            report.skipped["other-clip"] = "every held-out window comes from one clip: nothing to swap in"
        if not model.bridges:
            report.skipped["bridge"] = "the model has no bridge"
        if cfg.drift_sampler_steps > 0 and report.latent_frames >= 2:
            report.drift = rollout_drift(model, windows[: cfg.drift_windows], cfg.drift_sampler_steps, device)
        return report
    finally:
        model.train(was_training)


@torch.no_grad()
def held_out_losses(model, windows: list[HeldOutWindow], cfg: ConditioningUseConfig, sigma_struct_max: float = 0.7,
                    device=None) -> dict[str, float]:
    """Mean loss per stream on `windows` with their true conditions, at the fixed noise and sigmas of the probes: a
    validation loss comparable from step to step (the same draw every time)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    store: dict = {}
    try:
        for first in range(0, len(windows), cfg.batch_size):
            batch = _stack(windows[first:first + cfg.batch_size], device)
            _collect(store, "true", window_losses(model, batch, _fixed_noise(batch, cfg, first, sigma_struct_max,
                                                                             device)))
    finally:
        model.train(was_training)
    return {stream: float(torch.cat(v).mean()) for stream, v in store["true"].items()}


def _collect(store: dict, name: str, out: dict[str, torch.Tensor]) -> None:
    for stream, value in out.items():
        store.setdefault(name, {}).setdefault(stream, []).append(value)


@torch.no_grad()
def rollout_drift(model, windows: list[HeldOutWindow], sampler_steps: int, device=None, seed: int = 0
                  ) -> dict[str, Any]:
    """Per latent frame, averaged over windows: the MSE to the ground-truth latent of a rollout (the sampler from the
    reference alone, every frame's context its own earlier frames) and of teacher-forced frames (frame t made with
    the true frames < t as context, written into the cache as generated context is: not marked given), and their
    ratio: how much worse a frame gets because its history was generated."""
    from models.dualforce import SamplerConfig, generate, stream

    device = device or next(model.parameters()).device
    cfg = SamplerConfig(steps=sampler_steps)
    rollout_err = forced_err = None
    for i, w in enumerate(windows):
        t = {k: v[None].to(device) for k, v in w.tensors.items()}
        gt, gt_struct = t["video_latents"], group_rows(t["struct"])
        ref, audio = t["reference_latent"], t["audio_features"]
        rollout, _ = generate(model, ref, audio, cfg, torch.Generator(device=device).manual_seed(seed + i))
        forced = [rollout[:, :, :1]]  # frame 0 has no history
        for f in range(1, gt.shape[2]):
            chunk = next(stream(model, ref, audio, cfg, torch.Generator(device=device).manual_seed(seed + i),
                                context_video=gt[:, :, :f], context_struct=gt_struct[:, :f], context_given=False))
            forced.append(chunk.video_latents)
        r = (rollout - gt).pow(2).mean(dim=(0, 1, 3, 4)).cpu()
        fo = (torch.cat(forced, 2) - gt).pow(2).mean(dim=(0, 1, 3, 4)).cpu()
        rollout_err = r if rollout_err is None else rollout_err + r
        forced_err = fo if forced_err is None else forced_err + fo
    n = len(windows)
    rollout_mse, forced_mse = (rollout_err / n).tolist(), (forced_err / n).tolist()
    return {"rollout_mse": rollout_mse, "teacher_forced_mse": forced_mse, "windows": n,
            "ratio": [r / max(f, 1e-12) for r, f in zip(rollout_mse, forced_mse)]}
