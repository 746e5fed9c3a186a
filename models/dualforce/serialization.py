"""An exported DualForce folder: `config.json` (the DualForceConfig) + `model.safetensors` (+ `provenance.json`).

The layout of diffusers' `save_pretrained` (a config file beside safetensors weights), written with the
`safetensors` library: no pickle anywhere, so loading a folder someone sent us runs no code. `provenance.json`
records where the weights came from (run, step, EMA or module) and what the training data was made with (HuBERT,
Wan VAE, crop), so `generate` needs nothing else. The folder is written under a temp name and renamed into place:
a crash leaves no half-exported model.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

import torch

from .config import DualForceConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "provenance.json"
CLASS_NAME = "DualForce"
FORMAT_VERSION = 1


def config_to_json(config: DualForceConfig) -> dict[str, Any]:
    return {"_class_name": CLASS_NAME, "_format_version": FORMAT_VERSION, **asdict(config)}


def config_from_json(data: dict[str, Any]) -> DualForceConfig:
    if data.get("_class_name") != CLASS_NAME:
        raise ValueError(f"not a DualForce config (_class_name {data.get('_class_name')!r})")
    if data.get("_format_version") != FORMAT_VERSION:
        raise ValueError(f"DualForce export format {data.get('_format_version')!r}; this code reads {FORMAT_VERSION}")
    values = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(values) - {f.name for f in fields(DualForceConfig)})
    if unknown:
        raise ValueError(f"config.json has fields this DualForceConfig does not know: {', '.join(unknown)}")
    return DualForceConfig(**values)


def write_pretrained(path: str | Path, config: DualForceConfig, state_dict: dict[str, torch.Tensor],
                     provenance: Optional[dict[str, Any]] = None) -> Path:
    """Write the folder atomically (temp folder + rename; an existing folder is replaced)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "class": CLASS_NAME})
    (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance or {}, indent=2, sort_keys=True, default=str) + "\n")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def read_pretrained(path: str | Path) -> tuple[DualForceConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict, provenance) of an exported folder."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported DualForce model (no {name})")
    config = config_from_json(json.loads((path / CONFIG_FILE).read_text()))
    provenance_file = path / PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    return config, load_file(str(path / WEIGHTS_FILE)), provenance
