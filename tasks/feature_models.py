"""Which extractor weights a run uses, the fail-fast check, and one loaded copy per worker thread.

A real run names LivePortrait's `pretrained_weights/` root, a HuBERT directory or cached repo id and a Wan
VAE directory or cached repo id; nothing is downloaded. A dry run writes small randomly initialised models
of the same architectures (models/dryrun_models.py) and says so in every output's metadata.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
_COMPLETE = ".complete"


@dataclass(frozen=True)
class FeatureModels:
    liveportrait_root: str
    hubert: str
    wan_vae: str
    wan_vae_subfolder: Optional[str] = None
    hubert_layers: tuple[int, ...] = (-1,)
    device: Optional[str] = None  # None: CUDA when available
    dryrun: bool = False
    bf16: bool = True  # HuBERT and the motion extractor under bf16 autocast on CUDA (models/precision.py)

    def check(self) -> None:
        """Raise WeightsError listing every missing weight path, before any clip is touched. An empty path is a
        model the run does not use (the general profile names the Wan VAE alone)."""
        from models.weights import check_real_weights

        check_real_weights(self.liveportrait_root or None, self.hubert or None, self.wan_vae or None,
                           self.wan_vae_subfolder)

    def validate(self) -> None:
        """check(), then load every extractor strictly on the CPU (keys, shapes, dtypes against the
        architecture) and raise one WeightsError listing every problem, before any clip is touched. Without
        it a bad file is found out per clip, after download and crop ran for all of them."""
        from models.hubert_features import load_hubert
        from models.motion_extractor import load_motion_extractor
        from models.wan_vae import load_wan_vae
        from models.weights import WeightsError

        self.check()
        problems = []
        for what, named, load in (
                ("LivePortrait motion extractor", self.liveportrait_root, lambda: load_motion_extractor(self.liveportrait_root)),
                ("HuBERT", self.hubert, lambda: load_hubert(self.hubert, device="cpu")),
                ("Wan VAE", self.wan_vae, lambda: load_wan_vae(self.wan_vae, self.wan_vae_subfolder, device="cpu"))):
            if not named:
                continue
            try:
                with _load_lock:
                    load()
            except WeightsError as exc:
                problems.append(f"{what}: {exc}")
        if problems:
            raise WeightsError("model weights do not fit their architectures (nothing was run):\n  - "
                               + "\n  - ".join(problems))


def default_dryrun_dir(seed: int = 0) -> Path:
    """One shared place per machine, so every dry run (whatever its output folder) records the same lineage."""
    base = Path(os.environ.get("DUALFORCE_CACHE", Path.home() / ".cache" / "dualforce"))
    return base / f"dryrun-models-seed{seed}"


def dryrun_models(root: str | Path | None = None, seed: int = 0) -> FeatureModels:
    """Write (once) and use small randomly initialised models of the real architectures.

    Written into a temporary sibling and renamed, so concurrent runs never read a half-written model.
    """
    from models.dryrun_models import HUBERT_SUBDIR, WAN_VAE_SUBDIR, write_dryrun_models

    log.warning("DRY RUN: feature extractors are small RANDOMLY INITIALISED models; outputs test plumbing only")
    root = Path(root) if root else default_dryrun_dir(seed)
    if not (root / _COMPLETE).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        write_dryrun_models(staging, seed)
        (staging / _COMPLETE).write_text("ok")
        try:
            staging.rename(root)
        except OSError:  # another run got there first: its models are the same (same seed)
            shutil.rmtree(staging, ignore_errors=True)
    return FeatureModels(str(root), str(root / HUBERT_SUBDIR), str(root / WAN_VAE_SUBDIR), dryrun=True)


_per_thread = threading.local()
# transformers and diffusers import their model classes lazily, and two threads importing the same one at
# once can see a half-initialised module ("cannot import name 'HubertModel'"): load one model at a time.
_load_lock = threading.Lock()


def _cached(kind: str, key: tuple, load):
    cache = _per_thread.__dict__.setdefault("models", {})
    if (kind, key) not in cache:
        with _load_lock:
            cache[(kind, key)] = load()
    return cache[(kind, key)]


def _device(models: FeatureModels) -> str:
    import torch

    return models.device or ("cuda" if torch.cuda.is_available() else "cpu")


def precision_tag(models: FeatureModels) -> tuple[str, ...]:
    """What a step's fingerprint adds for reduced precision: () at float32 (so CPU results keep their cache
    keys), ("bf16-autocast",) where the extractors run under it."""
    from models.precision import extractor_precision

    precision = extractor_precision(_device(models), models.bf16)
    return () if precision == "fp32" else (precision,)


def motion_extractor(models: FeatureModels):
    from models.motion_extractor import load_motion_extractor

    return _cached("motion", (models.liveportrait_root,),
                   lambda: load_motion_extractor(models.liveportrait_root).to(_device(models)))


def hubert(models: FeatureModels):
    from models.hubert_features import load_hubert

    return _cached("hubert", (models.hubert,), lambda: load_hubert(models.hubert, device=_device(models)))


def wan_vae(models: FeatureModels):
    from models.wan_vae import load_wan_vae

    return _cached("vae", (models.wan_vae, models.wan_vae_subfolder),
                   lambda: load_wan_vae(models.wan_vae, models.wan_vae_subfolder, device=_device(models)))
