"""A command's inputs checked before any work: argparse types for numbers in range, and the checks of the dataset
commands (manifest, preprocess, backfill, pipeline) that used to surface as a traceback from inside a flow, after
the embedded Prefect server had started (~18 s). A problem is one `InputRejected`: its exit code (flows/outcomes.py:
2 a usage error, 6 an unusable input) and one line naming the flag or file; `flows.cli.main` prints it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from flows.outcomes import EXIT_CODES, UNUSABLE_INPUT

USAGE = 2


class InputRejected(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def window_frames_arg(text: str) -> int:
    """An argparse type: a window length in video frames, 4n+1 (the causal VAE's 4x time stride)."""
    from models.latent_geometry import VAE_TIME_STRIDE  # a constant module: nothing heavy at parse time

    value = at_least(1)(text)
    if (value - 1) % VAE_TIME_STRIDE:
        raise argparse.ArgumentTypeError(f"must be 4n+1 video frames (5, 9, ..., 33, ...), got {value}")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port a server can listen on (1-65535)."""
    value = at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_dataset_name(name: str) -> None:
    from datasets_manifest.schema import validate_dataset_name

    try:
        validate_dataset_name(name)
    except ValueError as exc:
        raise InputRejected(USAGE, str(exc)) from None


def check_manifest_file(path: str) -> None:
    """The manifest exists (else 2) and is a manifest parquet we can read (else 6); its rows the flow checks."""
    from datasets_manifest.schema import read_manifest

    if "://" in path:
        return  # an fsspec URL: the flow reads it
    if not Path(path).is_file():
        raise InputRejected(USAGE, f"--manifest {path} does not exist (build one with `./run manifest DATASET SRC "
                                   f"-o {path}`)")
    try:
        read_manifest(path)
    except Exception as exc:  # not parquet, another schema: the message names the file and what the reader said
        raise InputRejected(EXIT_CODES[UNUSABLE_INPUT], f"--manifest {path} is not a manifest we can read "
                                                        f"({type(exc).__name__}: {exc})") from None


def _problems(exc, prefix: str = "") -> str:
    """A pydantic ValidationError as one line: each field's path (a flag's name, or `prefix` + the JSON keys)."""
    if prefix:
        return "; ".join(f"{' '.join([prefix, '.'.join(map(str, e['loc']))]).strip()}: "
                         f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
    return "; ".join(f"{_flag(str(e['loc'][-1]))}: {e['msg']}" for e in exc.errors())


def preprocess_options(build: Callable[[], Any], prefix: str = ""):
    """The options `build` makes, with a pydantic validation error turned into one line naming the flag (or, for
    options given as JSON, `prefix` and the keys)."""
    import pydantic

    try:
        return build()
    except pydantic.ValidationError as exc:
        raise InputRejected(USAGE, _problems(exc, prefix)) from None


def check_train_inputs(config: dict, gates: dict | None, flag: str = "--config") -> dict:
    """A training config and gate config validated as the train flow will validate them (the same pydantic
    adapters), and the shard sets it names present; exit 2 naming the key before any process starts. Returns the
    config with renamed keys given their current names and the data fields it leaves out taken from its shard sets."""
    import pydantic

    from training.gates import TrainingGateConfig
    from training.shard_sets import with_data_fields
    from training.train_config import TrainConfig, renamed_keys

    try:
        config = with_data_fields(renamed_keys(config))
    except (ValueError, FileNotFoundError) as exc:
        raise InputRejected(USAGE, f"{flag}: {exc}") from None

    for what, kind, data in ((flag, TrainConfig, config), ("--gates", TrainingGateConfig, gates)):
        if data is None:
            continue
        try:
            pydantic.TypeAdapter(kind).validate_python(data)
        except pydantic.ValidationError as exc:
            raise InputRejected(USAGE, _problems(exc, what)) from None
    for shards in config.get("shards") or []:
        if any(mark in shards for mark in ("://", "::", "{", "*")):
            continue  # a URL or a brace / glob pattern: the loader expands it
        if not Path(shards).exists():
            raise InputRejected(USAGE, f"{flag} shards: {shards} does not exist")
        if Path(shards).is_dir() and next(Path(shards).rglob("*.tar"), None) is None:
            raise InputRejected(EXIT_CODES[UNUSABLE_INPUT], f"{flag} shards: {shards} holds no shard (*.tar) files")
    return config


def check_preprocess(dataset: str, manifest: str, profile: str, options) -> None:
    """Everything a preprocess or backfill run can be refused for without touching a clip or a weight file:
    the dataset name, the manifest, the steps, and (a real run) that each weight its steps load is named."""
    from flows.preprocess import resolve_models
    from tasks.steps.pipeline import preprocess_profile, wanted_steps

    check_dataset_name(dataset)
    chosen = preprocess_profile(profile)
    try:
        wanted = wanted_steps(chosen, options.steps)
    except ValueError as exc:
        raise InputRejected(USAGE, f"--steps: {exc}") from None
    if options.weights.models == "real" and any(s in wanted for s in chosen.feature_steps):
        try:
            resolve_models(options.weights, chosen, validate=False)  # named only: the flow loads them strictly
        except ValueError as exc:
            raise InputRejected(USAGE, f"{exc}: pass --liveportrait-root / --hubert / --wan-vae, or --models dryrun") \
                from None
    check_manifest_file(manifest)


def check_output_file(path: str, flag: str = "-o") -> None:
    if Path(path).is_dir():
        raise InputRejected(USAGE, f"{flag} {path} is a folder; name the file to write")


def build_manifest_checked(dataset: str, src: str, out: str, seed: int) -> str:
    """`manifest`'s work with its input errors as InputRejected: an unknown dataset or a missing source is a usage
    error, a source that does not hold the dataset's metadata an unusable input."""
    from datasets_manifest import manifest_command
    from datasets_manifest.build import DATASETS, ManifestSourceError

    if dataset not in DATASETS:
        raise InputRejected(USAGE, f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if not Path(src).exists():
        raise InputRejected(USAGE, f"{dataset}: source {src} does not exist")
    check_output_file(out)
    try:
        return manifest_command(dataset, src, out, seed=seed)
    except ManifestSourceError as exc:
        raise InputRejected(EXIT_CODES[UNUSABLE_INPUT], str(exc)) from None


def check_audit_inputs(shards: Path, steps: Path, fraction_: float) -> None:
    """A shard set with its index and the step outputs it was made from, and a share in (0, 1]."""
    if fraction_ > 1:
        raise InputRejected(USAGE, f"--fraction must be in (0, 1], got {fraction_}")
    if not shards.is_dir():
        raise InputRejected(USAGE, f"{shards} does not exist (a shard set folder: ROOT/DATASET/shards)")
    if not (shards / "index.parquet").is_file():
        raise InputRejected(EXIT_CODES[UNUSABLE_INPUT], f"{shards} is not a shard set (no index.parquet)")
    if not steps.is_dir():
        raise InputRejected(USAGE, f"the step outputs {steps} do not exist (pass --steps-root)")
