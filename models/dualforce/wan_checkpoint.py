"""A Wan 2.1 transformer checkpoint on disk, read lazily: tensor names and shapes first, tensors on demand.

Two layouts users hold:
- diffusers' `WanTransformer3DModel` folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards named by
  `diffusion_pytorch_model.safetensors.index.json` (a pipeline folder's `transformer/` is found from its root);
- the original Wan repository's release: `diffusion_pytorch_model.safetensors` (or a `.pth`) with its own key names.
The layout is told by the keys, not the file names (both releases call the file `diffusion_pytorch_model.*`).

Names and shapes come from the safetensors headers (or an mmap'd torch file read with `weights_only=True`), so a
transfer plan of the 5.7 GB 1.3B checkpoint reads a few kB; only the tensors actually transferred are loaded.
No pickle: a torch file is read tensors-only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from models.weights import WeightsError

DIFFUSERS = "diffusers"
ORIGINAL = "wan"
WEIGHTS_STEM = "diffusion_pytorch_model"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass
class WanCheckpoint:
    path: Path  # what the user named
    files: list[Path]  # the weight files read
    layout: str  # DIFFUSERS | ORIGINAL
    shapes: dict[str, tuple[int, ...]]  # every tensor's name -> shape
    config: dict[str, Any] = field(default_factory=dict)  # config.json beside the weights ({} when absent)
    _where: dict[str, Path] = field(default_factory=dict, repr=False)  # tensor name -> file
    _torch_state: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)

    @property
    def num_blocks(self) -> int:
        ids = {int(k.split(".")[1]) for k in self.shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        return max(ids) + 1 if ids else 0

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each file opened once)."""
        if self._torch_state is not None:
            return {n: self._torch_state[n] for n in names}
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._where[n], []).append(n)
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def _weight_files(path: Path) -> list[Path]:
    """The weight files of `path` (a file, a transformer folder or a diffusers pipeline folder)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"Wan weights not found: {path}")
    if not any(path.glob(f"{WEIGHTS_STEM}*")) and (path / "transformer").is_dir():
        path = path / "transformer"  # a pipeline folder (Wan2.1-T2V-1.3B-Diffusers): its transformer subfolder
    index = path / f"{WEIGHTS_STEM}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index}: not a safetensors index (no weight_map): {exc}") from exc
        files = sorted({path / name for name in weight_map.values()})
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise WeightsError(f"{index} names shards that are not there: {', '.join(absent)}")
        return files
    for suffix in (".safetensors",) + _TORCH_SUFFIXES:
        single = path / f"{WEIGHTS_STEM}{suffix}"
        if single.is_file():
            return [single]
    shards = sorted(path.glob(f"{WEIGHTS_STEM}-*-of-*.safetensors"))
    if shards:
        return shards
    raise WeightsError(f"{path} holds no Wan transformer weights ({WEIGHTS_STEM}.safetensors, its sharded index, "
                       f"or {WEIGHTS_STEM}.pth)")


def _layout(shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in shapes):
        return DIFFUSERS
    if any(k.startswith("time_embedding.") or ".self_attn." in k for k in shapes):
        return ORIGINAL
    return None


def open_wan_checkpoint(path: str | Path) -> WanCheckpoint:
    """Names, shapes, layout and config of a Wan transformer checkpoint; WeightsError if it is none."""
    path = Path(path).expanduser()
    files = _weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    torch_state = None
    for file in files:
        try:
            if file.suffix in _TORCH_SUFFIXES:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for wrapper in ("state_dict", "model"):
                    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                        state = state[wrapper]
                if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                    raise WeightsError(f"{file} does not hold a flat state dict of tensors")
                torch_state = dict(state)
                shapes.update({k: tuple(v.shape) for k, v in state.items()})
            else:
                from safetensors import safe_open

                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for k in f.keys():
                        shapes[k] = tuple(f.get_slice(k).get_shape())
                        where[k] = file
        except WeightsError:
            raise
        except Exception as exc:  # truncated or not a weights file at all
            raise WeightsError(f"cannot read {file} as Wan transformer weights (safetensors or a tensors-only torch "
                               f"file): {exc}") from exc
    layout = _layout(shapes)
    if layout is None:
        raise WeightsError(f"{path} is not a Wan 2.1 transformer: none of its {len(shapes)} tensors has a diffusers "
                           "(condition_embedder., blocks.N.attn1.) or original Wan (time_embedding., "
                           "blocks.N.self_attn.) name")
    config: dict[str, Any] = {}
    config_file = files[0].parent / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise WeightsError(f"{config_file} is not JSON: {exc}") from exc
    return WanCheckpoint(path, files, layout, shapes, config, where, torch_state)
