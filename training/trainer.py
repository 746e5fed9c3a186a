"""DeepSpeed training loop for the Diffusion Forcing objective, with exact resume.

One process per device (launched by torchrun or DeepSpeed's launcher). What is restored on resume: module,
optimizer and LR scheduler (DeepSpeed checkpoint), and per rank the step, data position (epoch, batches
consumed), every RNG (python, numpy, torch, the noise generator) and the EMA. Nothing in the loop draws
random numbers from a source that is not in that list (the DataLoader gets its own seeded generator), so
on CPU the loss sequence after a resume equals the uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from models.dualforce import DiffusionForcingConfig, build_model, diffusion_forcing_loss
from models.dualforce.pretrained import load_video_dit
from models.dualforce.wan_transfer import transfer_wan
from tasks import contract
from training import checkpoint, rng_state, safe_checkpoint
from training.ema import EMA
from training.loader import OPTIONAL_TENSOR_KEYS, PROFILE_TENSOR_KEYS, LoaderConfig, ShardLoader
from training.metrics import MetricsWriter, peak_memory_mb
from training.run_status import COMPLETED, ERROR, NONFINITE, OOM, STOPPED, RunStatus, write_status
from training.schedule import WarmupDecay
from training.train_config import TrainConfig, load_ds_config
from training.warm_start import write_transfer_report

log = logging.getLogger("training")


class NonFiniteLoss(RuntimeError):
    pass


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def build_ds_config(cfg: TrainConfig, world_size: int, use_bf16: bool) -> dict[str, Any]:
    ds = load_ds_config(cfg.ds_config)
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.micro_batch * cfg.grad_accum * world_size
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": use_bf16}
    ds.pop("fp16", None)  # refused on CPU; bf16 is the GPU precision here
    return ds


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed

        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.use_cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}") if self.use_cuda else torch.device("cpu")
        if self.use_cuda:
            torch.cuda.set_device(self.device)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model_config())
        self.profile = contract.VIDEO_ONLY if cfg.video_only else contract.TALKING_HEAD
        fresh = not (cfg.resume and checkpoint.latest_tag(self.ckpt_dir))
        if cfg.init_from and fresh:
            copied = load_video_dit(model, checkpoint.load_weights(Path(cfg.init_from)))
            if self.rank == 0:
                log.info("video DiT initialised from %s (%d tensors); the new modules keep their zero-gated init",
                         cfg.init_from, len(copied))
        if cfg.init_from_wan and fresh:
            transfer = transfer_wan(model, cfg.init_from_wan.path, cfg.init_from_wan.layers)
            if self.rank == 0:
                write_transfer_report(transfer, self.out_dir)
                log.info("video DiT warm-started %s; the new modules keep their zero-gated init", transfer.summary())
        self.loss_cfg = DiffusionForcingConfig(noise_mode=cfg.noise_mode, **cfg.loss_options)

        rank_seed = cfg.seed * 10_007 + 1 + self.rank
        random.seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        torch.manual_seed(rank_seed)
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed)

        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )  # a torch optimizer: DeepSpeed builds no JIT op for it
        schedule = WarmupDecay(cfg.warmup_steps, cfg.total_steps, cfg.decay, cfg.min_lr_ratio)
        self.ds_config = build_ds_config(cfg, self.world, use_bf16=self.use_cuda)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
        )
        safe_checkpoint.install(self.engine)  # resume never unpickles code from a checkpoint file
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.ema = EMA(self.engine.module, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        data_position = {"epoch": 0, "batches_done": 0}
        source = self.ckpt_dir
        tag = checkpoint.latest_tag(self.ckpt_dir) if cfg.resume else None
        if tag is None and cfg.resume_from:  # a fallback attempt continues its parent's training state
            source = Path(cfg.resume_from)
            tag = checkpoint.latest_tag(source)
            if tag is None:
                raise FileNotFoundError(f"resume_from {source} holds no checkpoint")
        if tag is not None:
            data_position = self._load(source, tag)
        self.loader = ShardLoader(
            LoaderConfig(
                shards=cfg.shards,
                window_frames=cfg.window_frames,
                crop_size=cfg.crop_size,
                audio_dim=cfg.audio_dim,
                train_window_frames=cfg.train_window_frames,
                batch_size=cfg.micro_batch,
                num_workers=cfg.num_workers,
                shuffle_buffer=cfg.shuffle_buffer,
                resampled=cfg.resampled,
                shards_per_epoch=cfg.shards_per_epoch,
                seed=cfg.seed,
                rank=self.rank,
                world_size=self.world,
                profile=self.profile,
                struct_dim=cfg.struct_dim,
            ),
            **data_position,
        )
        self.metrics = MetricsWriter(self.out_dir, resume_step=self.step) if self.rank == 0 else None
        self.validator = None  # built at the first validation step (rank 0)
        self.validation_model = None

    # ---- checkpoints -------------------------------------------------------------------------------
    def _save(self) -> None:
        tag = checkpoint.tag_for(self.step)
        state = {
            "step": self.step,
            "data": self.loader.state(),
            "rng": rng_state.capture(self.generator),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        checkpoint.save_trainer_state(self.ckpt_dir, tag, self.rank, state)
        dist.barrier()
        if self.cfg.save_weights:  # before the engine's save: `latest` names the tag only once all of it is there
            checkpoint.save_module_weights(self.engine, self.zero_stage, self.ckpt_dir, tag, self.rank)
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag)
        dist.barrier()
        if self.rank == 0:
            pruned = checkpoint.prune(self.ckpt_dir, self.cfg.keep_checkpoints)
            log.info("checkpoint %s saved%s", tag, f" (pruned {pruned})" if pruned else "")

    def _load(self, ckpt_dir: Path, tag: str) -> dict[str, int]:
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
        state = checkpoint.load_trainer_state(ckpt_dir, tag, self.rank)
        self.step = int(state["step"])
        rng_state.restore(state["rng"], self.generator)
        if self.ema is not None:
            if state["ema"] is None:
                raise RuntimeError(f"checkpoint {tag} has no EMA but ema_decay={self.cfg.ema_decay}")
            self.ema.load_state_dict(state["ema"])
        if self.rank == 0:
            log.info("resumed from %s at step %d, data position %s", ckpt_dir / tag, self.step, state["data"])
        return {k: int(v) for k, v in state["data"].items()}

    # ---- one step ----------------------------------------------------------------------------------
    def _inject_faults(self, step: int, batch_size: int) -> None:
        f = self.cfg.faults
        if f.crash_at_step == step and f.crash_rank in (None, self.rank):
            raise RuntimeError(f"injected crash at step {step} on rank {self.rank}")
        if (
            f.oom_at_step == step
            and batch_size > f.oom_if_batch_above
            and self.cfg.effective_window_frames > f.oom_if_window_above
        ):
            raise torch.OutOfMemoryError(
                f"injected out of memory at step {step} (batch {batch_size}, window {self.cfg.effective_window_frames})"
            )

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stored dtypes (f16 latents) -> float32 on the device; the model casts to its own (bf16) weights."""
        out = {}
        keys = [*PROFILE_TENSOR_KEYS[self.profile], *(k for k in OPTIONAL_TENSOR_KEYS[self.profile] if k in batch)]
        for key in keys:
            tensor = batch[key].to(self.device, non_blocking=True)
            out[key] = tensor.float() if tensor.is_floating_point() else tensor
        return out

    def _train_step(self, data) -> dict[str, Any]:
        step = self.step + 1
        sums = torch.zeros(5, dtype=torch.float64)
        samples = 0
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step uses
        for _ in range(self.cfg.grad_accum):
            batch = next(data)
            samples += len(batch["sample_keys"])
            self._inject_faults(step, len(batch["sample_keys"]))
            out = diffusion_forcing_loss(self.engine, self._to_device(batch), self.loss_cfg, self.generator)
            loss = out["loss"]
            f = self.cfg.faults
            if f.nan_at_step == step and f.nan_if_noise_mode in (None, self.cfg.noise_mode):
                loss = loss * float("nan")
            zero = loss.new_zeros(())
            local = torch.stack([loss.detach(), out["video_loss"].detach(), out["struct_loss"].detach(),
                                 out.get("pose_loss", zero).detach(), out.get("lipsync_loss", zero).detach()]).float()
            bad = torch.tensor([0.0 if bool(torch.isfinite(local).all()) else 1.0], device=self.device)
            dist.all_reduce(bad)  # every rank stops together, before a NaN reaches the optimizer
            if bad.item() > 0:
                raise NonFiniteLoss(f"loss is not finite at step {step} (rank {self.rank}: {local.tolist()})")
            sums += local.double().cpu()
            self.engine.backward(loss)
            self.engine.step()
        if self.ema is not None:
            self.ema.update()
        reduced = sums.to(self.device, torch.float32) / self.cfg.grad_accum
        dist.all_reduce(reduced)
        reduced = (reduced / self.world).tolist()
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": reduced[0],
            "video_loss": reduced[1],
            "struct_loss": None if self.cfg.video_only else reduced[2],
            "pose_loss": reduced[3] if self.loss_cfg.pose_loss_weight > 0 else None,
            "lipsync_loss": reduced[4] if self.loss_cfg.lipsync_loss_weight > 0 else None,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "lr": lr,
            "samples": samples,
        }

    def _record(self, result: dict[str, Any], seconds: float) -> None:
        extra = torch.tensor(
            [float(sum(self.loader.stats.rejected.values())), peak_memory_mb()], dtype=torch.float64
        ).to(self.device)
        rejected = extra[:1].clone()
        dist.all_reduce(rejected)
        memory = extra[1:].clone()
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        ema_norm = None
        if self.ema is not None:
            sq = torch.tensor([self.ema.sum_of_squares()], dtype=torch.float64).to(self.device)
            if self.zero_stage == 3:  # partitions: sum over ranks
                dist.all_reduce(sq)
            ema_norm = math.sqrt(sq.item())
        if self.rank != 0:
            return
        record = {
            "step": self.step,
            "loss": result["loss"],
            "video_loss": result["video_loss"],
            "struct_loss": result["struct_loss"],
            "grad_norm": result["grad_norm"],
            "lr": result["lr"],
            "samples_per_s": result["samples"] * self.world / seconds,
            "steps_per_s": 1.0 / seconds,
            "loader_samples_per_s": self.loader.stats.samples_per_s,
            "rejected": int(rejected.item()),
            "memory_mb": memory.item(),
            "memory_kind": "cuda_max_allocated" if self.use_cuda else "cpu_peak_rss",
            "epoch": self.loader.epoch,
            "micro_batch": self.cfg.micro_batch,
            "window_frames": self.cfg.effective_window_frames,
            "noise_mode": self.cfg.noise_mode,
            "world_size": self.world,
        }
        if ema_norm is not None:
            record["ema_norm"] = ema_norm
        for aux in ("pose_loss", "lipsync_loss"):  # only the auxiliary losses this run trains with
            if result.get(aux) is not None:
                record[aux] = result[aux]
        self.metrics.write(record)
        log.info(
            "step %d/%d loss %.4f video %.4f struct %s grad_norm %s lr %.2e %.1f samples/s mem %.0f MB",
            self.step,
            self.cfg.total_steps,
            record["loss"],
            record["video_loss"],
            "n/a" if record["struct_loss"] is None else f"{record['struct_loss']:.4f}",
            "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}",
            record["lr"],
            record["samples_per_s"],
            record["memory_mb"],
        )

    # ---- validation samples --------------------------------------------------------------------------
    def _validate(self) -> None:
        """Rank 0 generates the held-out clips (training/validation.py) from a copy of the weights one samples from
        (the EMA when kept); the other ranks go on to the next collective and wait there."""
        if self.rank != 0:
            return
        if self.zero_stage == 3:
            log.warning("validation samples at step %d skipped: ZeRO-3 partitions the weights (export a checkpoint "
                        "and run `./run generate`)", self.step)
            return
        from training.export import training_data
        from training.validation import Validator

        started = time.perf_counter()
        if self.validator is None:
            self.validator = Validator(self.cfg.validation, self.cfg.shards[0], training_data(self.cfg), self.device)
            self.validation_model = build_model(self.cfg.model_config()).to(self.device).eval()
        state = {k: v.detach().float() for k, v in self.engine.module.state_dict().items()}
        if self.ema is not None:
            state.update(self.ema.state_dict())
        self.validation_model.load_state_dict(state, strict=True)
        self.validation_model.to(torch.bfloat16 if self.use_cuda else torch.float32)
        files = self.validator.run(self.validation_model, self.step, self.out_dir, "ema" if self.ema else "module",
                                   self.metrics.tb if self.metrics is not None else None)
        log.info("validation samples at step %d: %d files in %s (%.1f s)", self.step, len(files),
                 files[0].parent, time.perf_counter() - started)

    def _record_nonfinite(self) -> None:
        if self.rank == 0:
            self.metrics.write({"step": self.step + 1, "loss": float("nan"), "nonfinite": True})

    # ---- loop --------------------------------------------------------------------------------------
    def run(self) -> RunStatus:
        data = iter(self.loader)
        end = self.cfg.total_steps if self.cfg.stop_at_step is None else min(self.cfg.stop_at_step, self.cfg.total_steps)
        self.engine.train()
        while self.step < end:
            start = time.perf_counter()
            try:
                result = self._train_step(data)
            except NonFiniteLoss:
                self._record_nonfinite()
                raise
            self.step += 1
            if self.step % self.cfg.log_every == 0 or self.step == end:
                self._record(result, time.perf_counter() - start)
            if self.cfg.validation.every and self.step % self.cfg.validation.every == 0:
                self._validate()
            if self.step % self.cfg.ckpt_every == 0 or self.step == end:
                self._save()
        return RunStatus(self.rank, COMPLETED if self.step >= self.cfg.total_steps else STOPPED, self.step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def run_training(cfg: TrainConfig) -> RunStatus:
    """Train, and record how this rank ended (status-rank{r}.json) whatever happens."""
    rank = int(os.environ.get("RANK", "0"))
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg)
        rank = trainer.rank
        status = trainer.run()
    except NonFiniteLoss as exc:
        status = RunStatus(rank, NONFINITE, trainer.step if trainer else 0, str(exc))
        log.error("%s", exc)
    except BaseException as exc:
        kind = OOM if is_oom(exc) else ERROR
        status = RunStatus(rank, kind, trainer.step if trainer else 0, f"{type(exc).__name__}: {exc}")
        log.error("rank %d failed at step %d:\n%s", rank, status.step, traceback.format_exc())
    finally:
        if trainer is not None:
            trainer.close()
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    write_status(cfg.out_dir, status)
    return status
