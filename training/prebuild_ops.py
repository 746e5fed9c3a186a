"""Build DeepSpeed's JIT ops once at setup, not in the middle of the first training run.

On a CPU-only machine every DeepSpeed process builds (or loads from TORCH_EXTENSIONS_DIR) the shared-memory
comm op when its process group starts; the first build takes 30-50 s on 2 cores and happened inside the
first dry-run or test that trained. `scripts/bootstrap.sh` runs this after installing, with the same
extensions folder the launcher uses (training.launch.extensions_dir), so later runs load it at once.

    python -m training.prebuild_ops
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from training.launch import environment

# torch's extension builder guards a build with a `lock` file that only the builder removes: a build killed
# midway (Ctrl-C during setup) leaves it, and every later load waits on it forever. A build takes 30-50 s here.
STALE_LOCK_S = 600.0


def clear_stale_lock(build_dir: Path, now: float | None = None) -> bool:
    """Remove `build_dir/lock` when it is older than STALE_LOCK_S (its builder is long gone); True if removed."""
    lock = Path(build_dir) / "lock"
    try:
        age = (now if now is not None else time.time()) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= STALE_LOCK_S:
        return False
    lock.unlink(missing_ok=True)
    print(f"[prebuild] removed a stale build lock ({age:.0f} s old): {lock}", file=sys.stderr)
    return True


def main() -> int:
    env = environment()
    for key in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"):
        if key in env:
            os.environ[key] = env[key]
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        print("[prebuild] CUDA present: DeepSpeed builds no CPU comm op", file=sys.stderr)
        return 0
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("[prebuild] this DeepSpeed has no shared-memory comm op for the CPU", file=sys.stderr)
        return 0
    clear_stale_lock(Path(os.environ["TORCH_EXTENSIONS_DIR"]) / builder.name)
    t0 = time.perf_counter()
    builder.load(verbose=False)
    print(f"[prebuild] DeepSpeed {builder.absolute_name()} ready in {os.environ['TORCH_EXTENSIONS_DIR']} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
