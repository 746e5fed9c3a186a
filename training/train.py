"""Entry point of one trainer process: `python -m training.train --config run.json` (under a launcher)."""
from __future__ import annotations

import argparse
import logging
import sys

import torch.distributed as dist

from tasks.known_noise import quiet_known_noise
from training.run_status import COMPLETED, EXIT_CODES, STOPPED
from training.train_config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    quiet_known_noise()  # before the trainer's import brings DeepSpeed in
    from training.trainer import run_training

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="training config JSON (training.train_config.TrainConfig)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by DeepSpeed's launcher; unused")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout, force=True
    )
    cfg = TrainConfig.load(args.config)
    status = run_training(cfg)
    if status.status in (COMPLETED, STOPPED) and dist.is_initialized():
        dist.destroy_process_group()  # after a failure a peer may be gone: just exit
    return EXIT_CODES[status.status]


if __name__ == "__main__":
    sys.exit(main())
