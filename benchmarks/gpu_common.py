"""What the gpu_* benchmarks share: the device, timing that waits for the device, peak memory, the device's dense
bf16 peak (from its spec sheet, and measured by a large matmul in the same run), and the JSON they write.

Every gpu_* benchmark runs anywhere: `--size tiny` (the default without CUDA) runs the real code path at toy sizes
so it can be checked on a CPU; `--size real` (the default with CUDA) is what the figures in benchmarks/README.md
are measured at.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("DUALFORCE_SAMPLES", REPO.parent / "shared" / "samples"))

# dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), FLOP/s
SPEC_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=("tiny", "real"), help="default: real with CUDA, tiny without")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--repeats", type=int, default=5)
    return p


def settle(args: argparse.Namespace) -> tuple[torch.device, str]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, args.size or ("real" if device.type == "cuda" else "tiny")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call, after `warmup` untimed calls (compilation, allocator warm-up)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def spec_peak(device: torch.device) -> Optional[float]:
    name = device_name(device)
    return next((v for k, v in SPEC_BF16_PEAK.items() if k in name), None)


def measured_matmul_peak(device: torch.device, size: int) -> float:
    """FLOP/s of a size^3 matmul (bf16 on CUDA, fp32 on CPU): what this device really reaches, measured here."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * size**3 / seconds


def finish(name: str, args: argparse.Namespace, device: torch.device, size: str, result: dict) -> dict:
    out = {"benchmark": name, "device": device_name(device), "size": size, "torch": torch.__version__, **result}
    text = json.dumps(out, indent=2, default=float)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
    return out
