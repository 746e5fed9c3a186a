"""Locating and checking model weights before any work starts (nothing is ever downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

# Where the weights live (LivePortrait's release layout) and the marker files a dry run writes beside its random
# weights: facts of the weights folders, read by the real loaders and written by models/dryrun_models.py.
MOTION_EXTRACTOR_RELPATH = Path("pretrained_weights/liveportrait/base_models/motion_extractor.pth")
MOTION_DRYRUN_MARKER = "motion_extractor.dryrun.json"  # beside the .pth only for dry-run models
HF_DRYRUN_MARKER = "dualforce_dryrun.json"  # inside a save_pretrained directory


class WeightsError(RuntimeError):
    """Model weights are missing or do not fit the architecture; the message says which file and why."""


def _raise_if_unfit(source: str, model_name: str, **found: list[str]) -> None:
    """One WeightsError naming every kind of problem found (at most 20 of each), or nothing."""
    parts = [f"{kind.replace('_', ' ')} ({len(items)}): {'; '.join(items[:20])}" for kind, items in found.items() if items]
    if parts:
        raise WeightsError(f"{source} does not fit {model_name}: " + " | ".join(parts))


def check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Raise WeightsError listing missing and unexpected keys, shape and dtype-kind mismatches (all at once).

    Kept beside `load_state_dict(strict=True)`, which names missing/unexpected keys and wrong shapes too but copies
    an integer tensor into a float parameter (or the reverse) without a word, and raises a RuntimeError that the
    run's fail-fast check (exit 7, every extractor's problems in one message) could not tell from a bug of ours."""
    import torch

    expected = model.state_dict()
    both = sorted(set(expected) & set(state))
    _raise_if_unfit(
        source, type(model).__name__,
        missing_keys=sorted(set(expected) - set(state)),
        unexpected_keys=sorted(set(state) - set(expected)),
        shape_mismatches=[f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in both
                          if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)],
        # a float parameter stored as integers (or the reverse) is not a cast away from right
        dtype_mismatches=[f"{k}: file {state[k].dtype} vs model {expected[k].dtype}" for k in both
                          if isinstance(state[k], torch.Tensor)
                          and state[k].dtype.is_floating_point != expected[k].dtype.is_floating_point],
    )


def check_loading_info(info: dict, source: str, model_name: str, allowed_unexpected: tuple[str, ...] = ()) -> None:
    """transformers / diffusers `output_loading_info`: raise WeightsError on any missing, mismatched or
    unexpected key (except the prefixes in `allowed_unexpected`: task heads a base model leaves out, such as
    HubertForCTC's lm_head in hubert-large-ls960-ft) and on loader error messages. from_pretrained itself only
    warns about these and initialises what is missing at random."""
    _raise_if_unfit(
        source, model_name,
        missing_keys=sorted(info.get("missing_keys") or []),
        unexpected_keys=sorted(k for k in (info.get("unexpected_keys") or []) if not k.startswith(allowed_unexpected)),
        shape_mismatches=[f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in (info.get("mismatched_keys") or [])],
        load_errors=[str(e)[:200] for e in (info.get("error_msgs") or [])],
    )


_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin", "model.safetensors.index.json",
                 "diffusion_pytorch_model.safetensors.index.json")


def _hf_model_problem(name_or_dir: str | Path, subfolder: str | None, what: str) -> str | None:
    """None when a config + weights for `name_or_dir` are on disk (local dir or HF cache), else what is missing."""
    from pathlib import Path as _P

    local = _P(name_or_dir)
    if local.is_dir():
        d = local / subfolder if subfolder else local
        if not (d / "config.json").is_file():
            return f"{what}: {d / 'config.json'}"
        if not any((d / f).is_file() for f in _WEIGHT_FILES):
            return f"{what}: no weight file ({' / '.join(_WEIGHT_FILES[:3])}) in {d}"
        return None
    if local.is_absolute() or str(name_or_dir).startswith("."):
        return f"{what}: directory {local}"
    from huggingface_hub import try_to_load_from_cache

    sub = f"{subfolder}/" if subfolder else ""
    if not isinstance(try_to_load_from_cache(str(name_or_dir), f"{sub}config.json"), str):
        return f"{what}: '{name_or_dir}' ({sub}config.json) is not in the Hugging Face cache"
    if not any(isinstance(try_to_load_from_cache(str(name_or_dir), f"{sub}{f}"), str) for f in _WEIGHT_FILES):
        return f"{what}: '{name_or_dir}' has no cached weight file under '{sub or '/'}'"
    return None


def check_real_weights(
    liveportrait_root: str | Path | None = None,
    hubert: str | Path | None = None,
    wan_vae: str | Path | None = None,
    wan_vae_subfolder: str | None = None,
) -> None:
    """Fail fast, before any work, with every missing weight path at once (only the models asked for)."""
    from pathlib import Path as _P

    problems = []
    if liveportrait_root is not None:
        p = _P(liveportrait_root) / MOTION_EXTRACTOR_RELPATH
        if not p.is_file():
            problems.append(f"LivePortrait motion extractor: {p}")
    if hubert is not None:
        problems.append(_hf_model_problem(hubert, None, "HuBERT"))
    if wan_vae is not None:
        problems.append(_hf_model_problem(wan_vae, wan_vae_subfolder, "Wan VAE"))
    problems = [p for p in problems if p]
    if problems:
        raise WeightsError("missing model weights (nothing is downloaded; use a dry run for random models):\n  "
                           + "\n  ".join(problems))
