"""The conditioning-use probes on a training run's checkpoint: what the conditioning gate judges at its step.

Apart from training/conditioning_use.py (the probes themselves) because it reads checkpoints and the run's config:
the probes are used by validation, which the config imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from training.conditioning_use import ConditioningUse, ConditioningUseConfig, held_out_windows, measure_conditioning_use

CONDITIONING_DIR = "conditioning"


def measure_checkpoint(train_cfg, run_dir: Path, step: int, use_cfg: ConditioningUseConfig,
                       device: Optional[str] = None) -> tuple[ConditioningUse, Path]:
    """The probes on a run's module weights at `step` (its checkpoint there, read weights-only), on held-out windows
    of the run's first shard set; written to RUN/conditioning/step{N}.json + .png. (report, json path)"""
    import json
    import os

    from models.dualforce import build_model
    from training import checkpoint
    from training.export import module_state
    from training.plots import plot_conditioning_use
    from training.shard_sets import shard_set_root

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag_dir = Path(run_dir) / "checkpoints" / checkpoint.tag_for(step)
    state, _ = module_state(tag_dir)
    model = build_model(train_cfg.model_config())
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device)
    root = shard_set_root(train_cfg.shards[0])
    windows, split = held_out_windows(root, use_cfg.windows, use_cfg.split, use_cfg.latent_crop)
    if len(windows) < 2:
        raise ValueError(f"conditioning use: {root} has {len(windows)} talking-head windows; it needs 2 or more")
    sigma_struct_max = float(train_cfg.loss_options.get("sigma_struct_max", 0.7))
    report = measure_conditioning_use(model, windows, use_cfg, sigma_struct_max, torch.device(device), split)
    out = Path(run_dir) / CONDITIONING_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step{step:06d}"
    plot_conditioning_use(report, out / f"{stem}.png", title=f"{Path(run_dir).name} step {step}")
    tmp = out / f".{stem}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(dict(report.to_json(), step=step, rows=report.rows()), indent=1, default=str) + "\n")
    return report, tmp.replace(out / f"{stem}.json")
