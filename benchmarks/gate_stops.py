"""What a live gate costs: the same training run in one launch, and stopped at gate steps (checkpoint, exit,
judge, relaunch, resume), through the training flow.

    python -m benchmarks.gate_stops [--steps 12 --stops 3 --variant tiny --nproc 1]

Baseline: the flow with no gate inside the run (one launch to the end). Against it, the same run with `--stops`
gates spread over it (convergence, joint progress, review with auto-approve): the extra wall time divided by the
stops is the price of one gate check. Both runs save a checkpoint at the same steps besides the gate steps
(ckpt_every = steps), so the difference is the stops themselves: exit, the flow's judging, a new process
(interpreter + torch + DeepSpeed init), the resume. On a GPU cluster the relaunch also pays the model's build
and the checkpoint's load; the figure here is the floor.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _run(shards: Path, out: Path, steps: int, gates: dict, variant: str, nproc: int) -> tuple[float, int]:
    from flows.train import train_flow
    from tests.training_shards import train_config
    from training.gates import ReviewOptions, read_gate_log
    from training.launch import LaunchSpec

    cfg = train_config(shards, out, total_steps=steps, ckpt_every=steps, micro_batch=1, model_variant=variant)
    t0 = time.perf_counter()
    state = train_flow(cfg, gates=gates, launch=LaunchSpec(nproc_per_node=nproc), review=ReviewOptions(auto_approve=True),
                       return_state=True)
    seconds = time.perf_counter() - t0
    if not state.is_completed():
        raise SystemExit(f"benchmark run ended {state.name}: {state.message}")
    launches = len({g["step"] for g in read_gate_log(out)})
    return seconds, launches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--stops", type=int, default=3, help="gate steps inside the run (at most 3: convergence, "
                                                         "joint progress, review)")
    p.add_argument("--variant", default="tiny")
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from tests.training_shards import write_shards

    spread = [args.steps * (i + 1) // (args.stops + 1) for i in range(args.stops)]
    names = ("convergence_step", "joint_step", "review_step")[: args.stops]
    live = {"memory_step": args.steps, "convergence_max_loss": 1e9, "convergence_window": 1, "joint_window": 1,
            "joint_min_rel_drop": -1e9, **dict(zip(names, spread))}
    none = {"memory_step": args.steps, "convergence_step": None, "joint_step": None}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness():
        tmp = Path(tmp)
        write_shards(tmp / "shards", n_shards=2, per_shard=4)
        _run(tmp / "shards", tmp / "warm", 1, none, args.variant, args.nproc)  # imports, server, op cache
        base_s, _ = _run(tmp / "shards", tmp / "one", args.steps, none, args.variant, args.nproc)
        live_s, stops = _run(tmp / "shards", tmp / "live", args.steps, live, args.variant, args.nproc)
    extra = live_s - base_s
    print(json.dumps({
        "steps": args.steps, "variant": args.variant, "nproc": args.nproc, "gate_steps": spread,
        "baseline_one_launch_s": round(base_s, 2), "live_gates_s": round(live_s, 2),
        "stops": stops - 1, "seconds_per_gate_stop": round(extra / max(1, stops - 1), 2),
        "baseline_seconds_per_step": round(base_s / args.steps, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
