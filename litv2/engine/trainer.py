"""The training job, top to bottom: run dir -> data -> model/optimizer -> resume -> epochs -> summary.

``train(cfg, run_dir)`` is what train.py calls. Everything a step does is in
``train_one_epoch``; evaluation is in :mod:`litv2.engine.evaluate`; saving and finding
checkpoints in :mod:`litv2.engine.checkpoint`; ranks and collectives in
:mod:`litv2.engine.distributed`.

Exact resume: a checkpoint holds the weights, optimizer, GradScaler, EMA, the position
(epoch, optimizer step within the epoch, global step) and the RNG state of every rank. Data
order and per-sample augmentation are pure functions of (seed, epoch, position) (see
:mod:`litv2.data.samplers`), and the LR is a pure function of the global step, so a resumed run
continues exactly where the saved one was.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from timm.utils import ModelEmaV3

from litv2.cpu import apply_cpu_settings
from litv2.data import build_eval_loader, build_mixup_and_criterion, build_train_loader, dataset_root
from litv2.errors import UserError
from litv2.logging import RunLogger, log

from . import checkpoint as ckpt
from .builders import build_model, build_optimizer, build_scheduler, check_config, lr_scale
from .distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object, cleanup,
                          init_distributed, sync_buffers)
from .evaluate import autocast, evaluate, load_weights, profile_model
from .signals import Preempted, StopOnSignal


class NonFiniteLoss(UserError):
    pass


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0            # current epoch
    step_in_epoch: int = 0    # optimizer steps already done in this epoch
    global_step: int = 0      # optimizer steps done in total
    elapsed_s: float = 0.0    # training wall time before this process
    skipped_images: int = 0   # unreadable training images skipped so far
    skipped_steps: int = 0    # steps skipped for a non-finite loss (trainer.on_nonfinite=skip)
    best: dict = field(default_factory=lambda: {"top1": -1.0, "top5": -1.0, "epoch": -1})
    last_eval: dict = field(default_factory=dict)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg, run_dir=None) -> dict:
    """Run (or continue) one training job; returns the summary (rank 0) or {} (other ranks)."""
    check_config(cfg)
    info = init_distributed(cfg.trainer.device)
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with StopOnSignal() as stop:
            return _train(cfg, run_dir, info, stop)
    finally:  # leave the process as we found it (tests and Hydra multirun run several jobs in one), except for
        # the global RNGs (seeded from cfg.seed) and glibc's malloc setting (trainer.cpu_keep_freed_memory),
        # which keeps the peak for good
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        cleanup()


def decide_run_dir(cfg, run_dir, info: DistInfo):
    """Rank 0 picks the run dir and the checkpoint to resume from; every rank gets the same answer.

    trainer.resume=auto continues `run_dir` if it holds a checkpoint, else the latest unfinished
    run with the same config under paths.runs_root (so rerunning a killed command continues it).
    """
    decision = None
    if info.is_main:
        run_dir = Path(run_dir or Path(cfg.paths.runs_root) / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S"))
        cfg_hash = ckpt.config_hash(cfg)
        resume_from, resume = None, cfg.trainer.resume
        if resume not in (None, "none", "auto"):
            resume_from = str(resume)
        elif resume == "auto":
            if not ((run_dir / ckpt.LAST).exists() or (run_dir / ckpt.PREV).exists()):
                previous = ckpt.find_unfinished_run(cfg.paths.runs_root, cfg_hash, exclude=run_dir)
                if previous is not None:
                    ckpt.remove_if_unused(run_dir)  # the dir Hydra just made for this command
                    run_dir = previous
            if (run_dir / ckpt.LAST).exists() or (run_dir / ckpt.PREV).exists():
                resume_from = "auto"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config_hash").write_text(cfg_hash + "\n")
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        decision = (str(run_dir), resume_from)
    run_dir, resume_from = broadcast_object(decision, info)
    return Path(run_dir), resume_from


def _train(cfg, run_dir, info: DistInfo, stop: StopOnSignal) -> dict:
    t = cfg.trainer
    device = info.device

    # ---- data (rank 0 builds the digits tree first; a bad root fails here, on every rank, in one line)
    problem = None
    if info.is_main:
        try:
            root = dataset_root(cfg.data)
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem, info)  # also the barrier: the tree exists once this returns
    if problem:
        raise UserError(problem)
    if not info.is_main:
        root = dataset_root(cfg.data)
    run_dir, resume_from = decide_run_dir(cfg, run_dir, info)
    train_loader, sampler = build_train_loader(cfg, root, info.rank, info.world_size)
    val_loader = build_eval_loader(cfg.data, root, info.rank, info.world_size)
    steps_per_epoch = len(train_loader) // t.accum_steps
    if steps_per_epoch < 1:
        raise UserError(f"one epoch has fewer batches ({len(train_loader)}) than trainer.accum_steps={t.accum_steps}")

    # ---- model, optimizer, schedule, EMA, AMP ------------------------------------------------------
    apply_cpu_settings(t, device)  # CPU: glibc keeps freed memory (no page faults on big activations)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if t.init_from:
        load_weights(model, t.init_from, strict=False)
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema.decay) if t.ema.enabled else None
    optimizer = build_optimizer(cfg, model, info.world_size)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, info.world_size)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    mixup_fn, criterion = build_mixup_and_criterion(cfg.aug, cfg.data.num_classes)
    train_model = model
    if info.distributed:
        # BatchNorm exists only in the DTM blocks, where per-rank statistics are fine: no SyncBN.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        # Static shapes: a new input shape compiles a new graph instead of switching to symbolic sizes;
        # with a symbolic image size inductor fails to lower LITv2 ("cannot determine truth value").
        train_model = torch.compile(train_model, dynamic=False)

    # ---- resume ------------------------------------------------------------------------------------
    progress = Progress()
    rng_restored = False
    if resume_from is not None:
        if resume_from == "auto":
            state, path = ckpt.load_resume_state(run_dir)
        else:
            state, path = ckpt.load_file(resume_from), Path(resume_from)
            if state.get("format") != ckpt.FORMAT:
                raise ckpt.CheckpointError(f"trainer.resume={resume_from} is not a training checkpoint of this framework")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        progress = Progress(**state["progress"])
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
            rng_restored = True
        elif info.is_main:
            log.warning("checkpoint was saved by %d ranks, now %d: RNG streams are re-seeded (not bit-exact)",
                        len(rngs), info.world_size)
        if info.is_main:
            log.info("resuming from %s at epoch %d, step %d", path, progress.epoch, progress.global_step)
    if not rng_restored:
        seed_everything(cfg.seed + info.rank + 1_000_003 * progress.global_step)

    logger = RunLogger(run_dir, cfg, enabled=info.is_main,
                       resume_step=progress.global_step if resume_from is not None else None)
    global_batch = info.world_size * cfg.data.batch_size * t.accum_steps
    logger.info("run dir %s | %d rank(s) | global batch %d | lr %.3g | %d steps/epoch",
                run_dir, info.world_size, global_batch, cfg.optim.lr * lr_scale(cfg, info.world_size), steps_per_epoch)

    start_time = time.time() - progress.elapsed_s

    def save(name: str, keep_previous: str | None = None):
        """All ranks call this (RNG states are gathered); rank 0 writes."""
        progress.elapsed_s = time.time() - start_time
        rngs = all_gather_object(ckpt.rng_state(), info)
        if not info.is_main:
            return
        state = {
            "format": ckpt.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "progress": asdict(progress), "rng": rngs, "world_size": info.world_size,
            "config": OmegaConf.to_container(cfg, resolve=True), "config_hash": ckpt.config_hash(cfg),
        }
        ckpt.save_atomic(state, run_dir / name, keep_previous=keep_previous)

    # ---- epochs ------------------------------------------------------------------------------------
    try:
        max_steps = t.max_steps if t.max_steps is not None else math.inf
        done = progress.global_step >= max_steps
        while progress.epoch < t.epochs and not done:
            epoch = progress.epoch
            sampler.set_epoch(epoch, start=progress.step_in_epoch * t.accum_steps * cfg.data.batch_size)
            train_one_epoch(cfg, train_model, model, ema, criterion, mixup_fn, optimizer, scheduler, scaler,
                            train_loader, progress, steps_per_epoch, max_steps, info, logger, stop, save)
            done = progress.global_step >= max_steps
            epoch_finished = progress.step_in_epoch >= steps_per_epoch
            if epoch_finished:
                progress.epoch, progress.step_in_epoch = epoch + 1, 0
            if done or not epoch_finished or (epoch + 1) % t.eval_every == 0 or progress.epoch == t.epochs:
                sync_buffers(model, info)
                metrics = evaluate(model, val_loader, device, t.precision, info, t.channels_last)
                row = {"step": progress.global_step, "epoch": epoch + 1, **{f"val/{k}": v for k, v in metrics.items()}}
                if ema is not None:
                    ema_metrics = evaluate(ema.module, val_loader, device, t.precision, info, t.channels_last)
                    row.update({f"val_ema/{k}": v for k, v in ema_metrics.items()})
                    metrics["ema_top1"], metrics["ema_top5"] = ema_metrics["top1"], ema_metrics["top5"]
                progress.last_eval = metrics
                row["train/skipped_images"] = progress.skipped_images
                logger.log(row)
                logger.info("epoch %d step %d: val top-1 %.2f top-5 %.2f loss %.4f", epoch + 1, progress.global_step,
                            metrics["top1"], metrics["top5"], metrics["loss"])
                if metrics["top1"] > progress.best["top1"]:
                    progress.best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch + 1,
                                     "step": progress.global_step}
                    save(ckpt.BEST)
            save(ckpt.LAST, keep_previous=ckpt.PREV)

        # ---- summary -----------------------------------------------------------------------------------
        summary = {}
        if info.is_main:
            final = progress.last_eval
            summary = {
                "status": "completed", "run_dir": str(run_dir), "model": cfg.model.name,
                "final_top1": final.get("top1"), "final_top5": final.get("top5"), "final_loss": final.get("loss"),
                "best_top1": progress.best["top1"], "best_top5": progress.best["top5"], "best_epoch": progress.best["epoch"],
                "epochs": round(progress.epoch + progress.step_in_epoch / steps_per_epoch, 4), "steps": progress.global_step, "wall_time_s": round(time.time() - start_time, 2),
                "world_size": info.world_size, "global_batch": global_batch,
                "skipped_images": progress.skipped_images, "skipped_steps": progress.skipped_steps,
            }
            if ema is not None:
                summary.update({"final_ema_top1": final.get("ema_top1"), "final_ema_top5": final.get("ema_top5")})
            if cfg.profile.enabled:
                report = profile_model(model, cfg, device)
                summary.update({k: report.get(k) for k in ("params", "gflops", "throughput", "train_mem_mb",
                                                            "test_mem_mb", "profile_error") if k in report})
            logger.summary(summary)
            logger.info("done: final top-1 %.2f, best %.2f (epoch %d), %.0f s -> %s", summary["final_top1"] or 0.0,
                        summary["best_top1"], summary["best_epoch"], summary["wall_time_s"], run_dir / "summary.json")
    finally:
        logger.close()
    barrier(info)
    return summary


def train_one_epoch(cfg, train_model, model, ema, criterion, mixup_fn, optimizer, scheduler, scaler, loader,
                    progress: Progress, steps_per_epoch: int, max_steps, info: DistInfo, logger: RunLogger,
                    stop: StopOnSignal, save):
    """Optimizer steps from progress.step_in_epoch to the end of the epoch (or max_steps / a signal)."""
    t = cfg.trainer
    device = info.device
    train_model.train()
    batches = iter(loader)
    bar = logger.progress(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch + 1}")
    window_images, window_start = 0, time.time()
    while progress.step_in_epoch < steps_per_epoch and progress.global_step < max_steps:
        scheduler.step_update(progress.global_step)
        loss_sum, images_seen, step_skipped = torch.zeros((), device=device), 0, 0
        for micro in range(t.accum_steps):
            images, targets, skipped = next(batches)
            step_skipped += skipped
            if images is None:
                continue
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                if len(images) % 2:  # Mixup pairs images; a skipped corrupt file can make the batch odd
                    images, targets = images[:-1], targets[:-1]
                images, targets = mixup_fn(images, targets)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last_micro = micro == t.accum_steps - 1
            sync = train_model.no_sync() if info.distributed and not last_micro and hasattr(train_model, "no_sync") \
                else _null()
            with sync:
                with autocast(device, t.precision):
                    loss = criterion(train_model(images), targets)
                scaler.scale(loss / t.accum_steps).backward()
            loss_sum += loss.detach().float()
            images_seen += len(images)

        # one all-reduce per step: loss, non-finite flag, stop request, skipped images
        stats = torch.stack([loss_sum / t.accum_steps, (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(stop.requested is not None), device=device),
                             torch.tensor(float(step_skipped), device=device)])
        all_reduce_sum(stats, info)
        loss_value, nonfinite, stop_requested, skipped = stats.tolist()  # the step's one device -> host sync
        progress.skipped_images += int(skipped)
        loss_value /= info.world_size
        if nonfinite > 0:
            if t.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss ({loss_value}) at step {progress.global_step} (epoch {progress.epoch + 1}, "
                    f"iteration {progress.step_in_epoch}); the last good checkpoint is kept "
                    f"(trainer.on_nonfinite=skip skips such steps instead)")
            optimizer.zero_grad(set_to_none=True)
            if info.is_main:
                log.warning("non-finite loss at step %d: step skipped", progress.global_step)
            progress.skipped_steps += 1
            grad_norm = None
        else:
            grad_norm = _optimizer_step(cfg, model, optimizer, scaler)
            if ema is not None:
                ema.update(model, step=progress.global_step)
        progress.global_step += 1
        progress.step_in_epoch += 1
        window_images += images_seen * info.world_size
        bar.update(1)

        if progress.global_step % t.log_every == 0 or progress.step_in_epoch == steps_per_epoch:
            rate = window_images / max(time.time() - window_start, 1e-9)
            lr = optimizer.param_groups[0]["lr"]
            logger.log({"step": progress.global_step, "epoch": progress.epoch + progress.step_in_epoch / steps_per_epoch,
                        "train/loss": loss_value, "train/lr": lr,
                        "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                        "train/images_per_s": rate, "train/skipped_images": progress.skipped_images})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            window_images, window_start = 0, time.time()

        if stop_requested > 0:  # SIGTERM / SIGUSR1 on any rank: every rank saves and stops here
            save(ckpt.LAST, keep_previous=ckpt.PREV)
            bar.close()
            raise Preempted(stop.requested or signal.SIGTERM, progress.global_step, stop.previous.get(stop.requested))
        if t.ckpt_every_steps and progress.global_step % t.ckpt_every_steps == 0 \
                and progress.step_in_epoch < steps_per_epoch:
            save(ckpt.LAST, keep_previous=ckpt.PREV)
    bar.close()


def _optimizer_step(cfg, model, optimizer, scaler) -> torch.Tensor | None:
    """Clip, step, zero the gradients; returns the gradient norm before clipping as a device tensor (read
    only when logged, so the step queues without waiting for the GPU), or None without clipping."""
    grad_norm = None
    if cfg.optim.clip_grad:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
