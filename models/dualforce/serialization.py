"""An exported DualForce folder: `config.json` (the DualForceConfig) + `model.safetensors` (+ `provenance.json`).

The layout of diffusers' `save_pretrained` (a config file beside safetensors weights), written with the
`safetensors` library: no pickle anywhere, so loading a folder someone sent us runs no code. `provenance.json`
records where the weights came from (run, step, EMA or module) and what the training data was made with (HuBERT,
Wan VAE, crop), so `generate` needs nothing else. The folder is written under a temp name and renamed into place:
a crash leaves no half-exported model.

What the target may be: a new path, an empty folder, or an earlier export of ours (our `config.json` with our
class name, `model.safetensors`, nothing else but our own files), which is replaced. Anything else is refused
(ForeignFolderError) before any work: we never remove what we did not write. Replacing is two renames (the old
export aside to `.NAME.old-*`, the new one from `.NAME.tmp-*` into place); a process killed between them leaves
both complete exports beside the target, and the next export cleans up those leftovers (only folders holding
nothing but our own files).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

import torch

from .config import DualForceConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "provenance.json"
OWN_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE})
CLASS_NAME = "DualForce"
FORMAT_VERSION = 1
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(-[0-9a-f]+)?")


class ForeignFolderError(FileExistsError):
    """The output path holds something that is not an export of ours; it is left as it is."""


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


def _holds_only_own_files(path: Path) -> bool:
    try:
        return all(p.name in OWN_FILES and p.is_file() and not p.is_symlink() for p in path.iterdir())
    except OSError:
        return False


def _is_our_export(path: Path) -> bool:
    """Our config.json (our class name) + model.safetensors, and nothing but our own files."""
    if not (_holds_only_own_files(path) and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("_class_name") == CLASS_NAME


def check_output_folder(path: str | Path) -> None:
    """Raise ForeignFolderError unless `path` is absent, an empty folder or an earlier export of ours.

    Call it before any work (reading or converting a checkpoint): write_pretrained checks again before it renames.
    """
    path = Path(path)
    if path.is_symlink():
        raise ForeignFolderError(f"{path} is a symbolic link; give the export a new or empty folder (or an "
                                 f"earlier export) by its real path")
    if not path.exists():
        return
    if not path.is_dir():
        raise ForeignFolderError(f"{path} is a file, not a folder; give the export a new or empty folder")
    entries = sorted(p.name for p in path.iterdir())
    if not entries or _is_our_export(path):
        return
    foreign = [n for n in entries if n not in OWN_FILES] or entries
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise ForeignFolderError(f"{path} is not an earlier DualForce export (it holds {shown}); refusing to replace "
                             f"it: give the export a new or empty folder")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, and not in flight: this process writes one export at a time per path
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


def leftovers(path: str | Path) -> list[Path]:
    """`.NAME.tmp-*` / `.NAME.old-*` beside `path` that an interrupted export left: folders of our own files only,
    from a process that is no longer running."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for p in sorted(path.parent.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if (m and m["name"] == path.name and p.is_dir() and not p.is_symlink() and not _alive(int(m["pid"]))
                and _holds_only_own_files(p)):
            found.append(p)
    return found


def write_pretrained(path: str | Path, config: DualForceConfig, state_dict: dict[str, torch.Tensor],
                     provenance: Optional[dict[str, Any]] = None) -> Path:
    """Write the folder atomically (temp folder + rename). An existing folder is replaced only when it is an
    earlier export of ours (or empty); anything else raises ForeignFolderError before anything is written."""
    from safetensors.torch import save_file

    path = Path(path)
    check_output_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "class": CLASS_NAME})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
        # safetensors writes 0600 whatever the umask; give the weights the mode the config file got from it
        os.chmod(tmp / WEIGHTS_FILE, stat.S_IMODE((tmp / CONFIG_FILE).stat().st_mode))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance or {}, indent=2, sort_keys=True, default=str) + "\n")
        check_output_folder(path)  # again: something may have been put there while the weights were written
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tag}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if not path.exists():
                    os.replace(old, path)  # put the earlier export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and _holds_only_own_files(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for leftover in leftovers(path):  # of an earlier export killed between its renames
        shutil.rmtree(leftover, ignore_errors=True)
    return path


# safetensors' dtype names (its header format) -> torch, for checking a file's tensors before reading them
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def weights_header(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (shape and dtype from its header, no data read), so a
    config can be checked against them before anything is allocated. WeightsError when it is not a safetensors
    file (truncated, renamed, another format)."""
    from safetensors import SafetensorError, safe_open

    from models.weights import WeightsError

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta",
                                   dtype=_SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32))
                    for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None


def read_pretrained_config(path: str | Path) -> tuple[DualForceConfig, dict[str, Any]]:
    """(config, provenance) of an exported folder; WeightsError when config.json is not a DualForce config."""
    from models.weights import WeightsError

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            left = [p.name for p in leftovers(path)] if not path.exists() else []
            hint = f" (an interrupted export left {', '.join(left)} beside it: export again)" if left else ""
            raise FileNotFoundError(f"{path} is not an exported DualForce model (no {name}){hint}")
    try:
        config = config_from_json(json.loads((path / CONFIG_FILE).read_text()))
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{path / CONFIG_FILE} is not a usable DualForce config: {exc}") from None
    provenance_file = path / PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    return config, provenance


def read_pretrained(path: str | Path) -> tuple[DualForceConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict, provenance) of an exported folder."""
    from safetensors.torch import load_file

    config, provenance = read_pretrained_config(path)
    return config, load_file(str(Path(path) / WEIGHTS_FILE)), provenance
