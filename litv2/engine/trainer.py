"""The training job, top to bottom: setup -> resume -> fit (epochs of steps, validation, checkpoints) -> finish.

``train(cfg, run_dir)`` is what train.py calls. :func:`setup` builds a :class:`Run`, which holds everything the
job needs; every phase after it takes the run and fits on a screen. Evaluation is in
:mod:`litv2.engine.evaluate`, checkpoint files in :mod:`litv2.engine.checkpoint`, ranks and collectives in
:mod:`litv2.engine.distributed`.

Exact resume: a checkpoint holds the weights, optimizer, GradScaler, EMA, the position (epoch, optimizer step
within the epoch, global step) and the RNG state of every rank. Data order and per-sample augmentation are pure
functions of (seed, epoch, position) (see :mod:`litv2.data.samplers`), and the LR is a pure function of the
global step, so a resumed run continues exactly where the saved one was.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from timm.utils import ModelEmaV3

from litv2.data import build_eval_loader, build_mixup_and_criterion, build_train_loader, dataset_index
from litv2.errors import UserError
from litv2.logging import RunLogger, log

from . import checkpoint as ckpt
from .builders import apply_accel, apply_process_settings, build_model, build_optimizer, build_scheduler, \
    check_config, compile_model, lr_scale, process_settings, tf32_enabled
from .distributed import (DistInfo, RankFailed, all_gather_object, all_reduce_sum, barrier, broadcast_object, cleanup,
                          collective_error, failure_watch, init_distributed, rank_ordered_mean, sync_buffers)
from .evaluate import autocast, evaluate, load_weights, profile_model
from .lease import RunDirBusy, RunDirLease
from .signals import Interrupted, Preempted, StopOnSignal
from .weights import fetch_start_weights


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


@dataclass
class Run:
    """Everything one training job holds, built by :func:`setup`."""
    cfg: object
    info: DistInfo
    run_dir: Path
    model: torch.nn.Module          # the plain model: what is saved, evaluated and averaged by the EMA
    train_model: torch.nn.Module    # what a step calls: the model, DDP-wrapped and/or compiled
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    mixup_fn: Callable | None
    criterion: Callable
    train_loader: torch.utils.data.DataLoader
    sampler: object
    val_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    stop: StopOnSignal
    lease: RunDirLease | None = None  # rank 0's hold on the run dir
    logger: RunLogger | None = None
    progress: Progress = field(default_factory=Progress)
    start_time: float = field(default_factory=time.time)
    saved_step: int | None = None     # global step of the newest last.pth (None: none yet)

    @property
    def global_batch(self) -> int:
        return self.info.world_size * self.cfg.data.batch_size * self.cfg.trainer.accum_steps


def train(cfg, run_dir=None) -> dict:
    """Run (or continue) one training job; returns the summary (rank 0) or {} (other ranks).

    Whatever happens, what the job opened (loader workers, the run dir's lease, the logs, the process group) is
    closed before it returns or raises; a failure is announced to the other ranks, which then end too (see
    :func:`_failure`). The process settings a run changes (determinism, cuDNN autotuning, TF32) are put back
    afterwards, so tests and Hydra multiruns can run several jobs in one process; the global RNGs (seeded from
    ``cfg.seed``) and glibc's malloc setting (``trainer.cpu_keep_freed_memory``, which keeps the peak for good) are
    not.
    """
    check_config(cfg)
    info = init_distributed(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    run, completed = None, False
    try:
        with process_settings(), StopOnSignal() as stop, contextlib.ExitStack() as closing:
            run = setup(cfg, run_dir, info, stop, closing)
            fit(run)
            summary = finish(run)
        completed = True
        return summary
    except Preempted:
        raise
    except BaseException as e:
        failure = _failure(e, run, info)
        if failure is e:
            raise
        raise failure from None
    finally:
        cleanup(completed)


def _failure(e: BaseException, run: Run | None, info: DistInfo) -> BaseException:
    """What a failed job raises, told to the other ranks first: Ctrl-C becomes :class:`Interrupted`; an error on a
    rank that stopped because another rank failed (a collective that lost its peer) becomes :class:`RankFailed`
    naming that rank's error; anything else is raised as it is, after this rank announced it."""
    watch = failure_watch()
    if watch is not None and not isinstance(e, (UserError, KeyboardInterrupt)):
        news = watch.peer_failure()
        if news is not None:
            return RankFailed(f"{news}; rank {info.rank} stopped too")
        if collective_error(e):  # a peer vanished without a word (its node died, it was killed)
            watch.announce(e)
            what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return RankFailed(f"rank {info.rank}: a collective failed ({what}): another rank's process or node is "
                              f"gone or stuck, and none reported an error")
    if watch is not None:
        watch.announce(e)
    if isinstance(e, KeyboardInterrupt):
        kept = "no checkpoint was written yet"
        if run is not None and run.saved_step is not None:
            kept = f"{run.run_dir / ckpt.LAST} (step {run.saved_step}) is kept: rerun the same command to resume"
        elif run is not None and ckpt.has_checkpoint(run.run_dir):
            kept = f"the checkpoints in {run.run_dir} are kept: rerun the same command to resume"
        at = f" at step {run.progress.global_step}" if run is not None else ""
        return Interrupted(f"interrupted{at}; {kept}")
    return e


# ---- setup -------------------------------------------------------------------------------------------------

def setup(cfg, run_dir, info: DistInfo, stop: StopOnSignal, closing: contextlib.ExitStack) -> Run:
    """Starting weights, data, run dir, model, optimizer, schedule, EMA, AMP; then resume, wrap for training and open
    the logs. What it opens is closed by ``closing`` when the job ends, however it ends."""
    t = cfg.trainer
    init_from = _shared_start_weights(cfg, info)  # a failed download or misfit weights stop the run here
    root = _shared_dataset_root(cfg, info)
    _shared_resume_check(cfg, info)  # a checkpoint of another model or dataset stops the run here
    run_dir, resume_from, lease = decide_run_dir(cfg, run_dir, info)
    if lease is not None:
        closing.callback(lease.release)
        if failure_watch() is not None:  # a rank that ends the process for a failed peer releases it first
            failure_watch().on_abort.append(lease.release)
    train_loader, sampler = build_train_loader(cfg, root, info.rank, info.world_size, info.device)
    closing.callback(train_loader.close)
    val_loader = build_eval_loader(cfg.data, root, info.rank, info.world_size, device=info.device)
    closing.callback(val_loader.close)
    steps_per_epoch = len(train_loader) // t.accum_steps
    if steps_per_epoch < 1:
        raise UserError(f"one epoch has fewer batches ({len(train_loader)}) than trainer.accum_steps={t.accum_steps}")

    apply_process_settings(cfg, info.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if init_from is not None:
        load_weights(model, init_from, strict=False)
    model.to(info.device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    apply_accel(model, cfg)  # model.accel: how it is computed (litv2.accel), not what
    optimizer = build_optimizer(cfg, model, info.world_size)
    mixup_fn, criterion = build_mixup_and_criterion(cfg.aug, cfg.data.num_classes)
    run = Run(cfg, info, run_dir, model, model, ModelEmaV3(model, decay=t.ema.decay) if t.ema.enabled else None,
              optimizer, build_scheduler(cfg, optimizer, steps_per_epoch, info.world_size),
              torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16"), mixup_fn, criterion,
              train_loader, sampler, val_loader, steps_per_epoch, stop, lease)
    resume(run, resume_from)  # into the plain model, before the DDP wrap
    run.train_model = _wrap_for_training(model, cfg, info)
    run.logger = RunLogger(run_dir, cfg, enabled=info.is_main,
                           resume_step=run.progress.global_step if resume_from is not None else None)
    closing.callback(run.logger.close)
    run.logger.info("run dir %s | %d rank(s) | global batch %d | lr %.3g | %d steps/epoch", run_dir,
                    info.world_size, run.global_batch, cfg.optim.lr * lr_scale(cfg, info.world_size), steps_per_epoch)
    run.start_time = time.time() - run.progress.elapsed_s
    return run


def _shared_start_weights(cfg, info: DistInfo):
    """model.pretrained / trainer.init_from fetched (URLs into the torch.hub cache) and checked; rank 0 first, so
    the other ranks of a node find the file in the cache, and a problem fails every rank with rank 0's line."""
    problem, path = None, None
    if info.is_main:
        try:
            path = fetch_start_weights(cfg, "train")
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem, info)
    if problem:
        raise UserError(problem)
    return path if info.is_main else fetch_start_weights(cfg, "train")


def _shared_dataset_root(cfg, info: DistInfo):
    """The dataset (root and image list, see data.dataset_index) on every rank; rank 0 lists and checks it (and
    builds the digits tree) once and sends it, so a bad root fails on every rank with rank 0's one-line message."""
    problem, index = None, None
    if info.is_main:
        try:
            index = dataset_index(cfg.data)
        except UserError as e:
            problem = str(e)
    problem, index = broadcast_object((problem, index), info)
    if problem:
        raise UserError(problem)
    return index


def _shared_resume_check(cfg, info: DistInfo) -> None:
    """trainer.resume=<file>: rank 0 reads the checkpoint's config and refuses one of another model or dataset in one
    line, on every rank, before the run dir exists (a recipe change is allowed: see :func:`resume`)."""
    resume = cfg.trainer.resume
    if resume in (None, "none", "auto"):
        return
    problem = None
    if info.is_main:
        try:
            ckpt.check_resumable(cfg, ckpt.load_file(resume), resume)
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem, info)
    if problem:
        raise UserError(problem)


def decide_run_dir(cfg, run_dir, info: DistInfo):
    """Rank 0 picks the run dir, takes its lease (one live job per run dir, see :mod:`litv2.engine.lease`) and
    decides whether to resume; every rank gets the same answer. Returns (run dir, what to resume or None, rank 0's
    lease or None).

    trainer.resume=auto continues `run_dir` if it holds a checkpoint, else the latest unfinished run with the same
    config under paths.runs_root that no live job holds: a run killed after a checkpoint continues from it, one
    killed before its first checkpoint starts again in its own dir.
    """
    decision, problem, lease = None, None, None
    if info.is_main:
        try:
            run_dir, resume_from, lease = _choose_run_dir(cfg, run_dir)
            decision = (str(run_dir), resume_from)
        except (UserError, OSError) as e:
            problem = str(e) if isinstance(e, UserError) else f"cannot prepare the run dir: {e}"
    problem, decision = broadcast_object((problem, decision), info)
    if problem:
        raise UserError(problem)
    return Path(decision[0]), decision[1], lease


def _choose_run_dir(cfg, run_dir):
    own = Path(run_dir or Path(cfg.paths.runs_root) / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S"))
    cfg_hash, ttl, resume = ckpt.config_hash(cfg), cfg.trainer.run_dir_lease_s, cfg.trainer.resume
    chosen, lease = own, None
    if resume == "auto" and not ckpt.has_checkpoint(own):
        previous = ckpt.find_unfinished_run(cfg.paths.runs_root, cfg_hash, exclude=own, lease_ttl_s=ttl)
        if previous is not None:
            try:
                lease = RunDirLease(previous, ttl).acquire()
                chosen = previous
            except RunDirBusy:  # another rerun took it first
                pass
    if lease is None:
        lease = RunDirLease(own, ttl).acquire()  # RunDirBusy: a live job holds this very dir
    try:
        if chosen != own:
            ckpt.remove_if_unused(own)  # the dir Hydra just made for this command
        resume_from = None
        if resume not in (None, "none", "auto"):
            resume_from = str(resume)
        elif resume == "auto" and ckpt.has_checkpoint(chosen):
            resume_from = "auto"
        elif chosen != own:  # a run stopped before its first checkpoint starts again: its logs are of nothing kept
            log.info("starting again in %s (a run of this config that stopped before its first checkpoint)", chosen)
            for leftover in ("metrics.jsonl", "wandb_id"):
                (chosen / leftover).unlink(missing_ok=True)
        (chosen / "config_hash").write_text(cfg_hash + "\n")
        OmegaConf.save(cfg, chosen / "config.yaml", resolve=True)
    except BaseException:
        lease.release()
        raise
    return chosen, resume_from, lease


def _wrap_for_training(model, cfg, info: DistInfo):
    """DDP across ranks, then torch.compile if asked."""
    train_model = model
    if info.distributed:
        # BatchNorm exists only in the DTM blocks, where per-rank statistics are fine: no SyncBN.
        # The gradients live in DDP's all-reduce buckets, laid out like their parameters: no copy into the
        # buckets every step. They exist (as zeros) before the wrap and are zeroed, not freed, after each step
        # (``_zero_grad``), so backward accumulates into them in that layout; a fresh gradient can come in
        # another one (a depthwise conv's (C, 1, k, k) weight gradient from a channels-last input), which DDP
        # would copy every step and warn about.
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        if cfg.trainer.deterministic and info.world_size > 2:  # bit-exact resume (two ranks sum commutatively)
            train_model.register_comm_hook(None, rank_ordered_mean)
    if cfg.trainer.compile:  # static shapes, trainer.compile_mode (see builders.compile_model)
        train_model = compile_model(train_model, cfg.trainer)
    return train_model


# ---- resume ------------------------------------------------------------------------------------------------

def resume(run: Run, resume_from: str | None) -> None:
    """Load the checkpoint rank 0 chose (into the plain model, optimizer, scaler, EMA) and the RNG streams.

    A checkpoint of another recipe (batch size, LR, epochs, world size, ...; another model or dataset was refused
    by :func:`_shared_resume_check`) resumes with one warning line naming the changes: the position in the epoch is
    mapped by the samples seen, the optimizer keeps its moments but takes this config's hyperparameters, and the
    best metrics start afresh (they would be another recipe's)."""
    info, restored = run.info, False
    if resume_from is not None:
        state, path = ckpt.load_resume_state_on_all_ranks(run.run_dir, resume_from, info)
        run.model.load_state_dict(state["model"])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
        run.optimizer.load_state_dict(state["optimizer"])
        for g, configured in zip(run.optimizer.param_groups, groups):
            g.update(configured)  # (the schedule sets the LR of every step)
        run.scaler.load_state_dict(state["scaler"])
        if run.ema is not None and state.get("ema") is not None:
            run.ema.module.load_state_dict(state["ema"])
        run.progress = Progress(**state["progress"])
        run.saved_step = run.progress.global_step
        _map_position(run, state, path)
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
            restored = True
        elif info.is_main:
            log.warning("checkpoint was saved by %d ranks, now %d: RNG streams are re-seeded (not bit-exact)",
                        len(rngs), info.world_size)
        if info.is_main:
            log.info("resuming from %s at epoch %d, step %d", path, run.progress.epoch, run.progress.global_step)
    if not restored:
        seed = run.cfg.seed + info.rank + 1_000_003 * run.progress.global_step
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _map_position(run: Run, state: dict, path) -> None:
    """Under another recipe, continue the epoch after the samples already seen (not after as many steps) and restart
    the best metrics."""
    p, saved_cfg = run.progress, state.get("config") or {}
    changes = ckpt.recipe_changes(run.cfg, state, run.info.world_size)
    if not changes:
        return
    recipe = [c for c in changes if not c.startswith("world size ")]
    try:
        saved_batch = state["world_size"] * saved_cfg["data"]["batch_size"] * saved_cfg["trainer"]["accum_steps"]
    except (KeyError, TypeError):
        saved_batch = run.global_batch
    seen = p.step_in_epoch * saved_batch
    p.step_in_epoch = min(seen // run.global_batch, run.steps_per_epoch)
    p.global_step = p.epoch * run.steps_per_epoch + p.step_in_epoch
    if recipe:
        p.best, p.last_eval = Progress().best, {}
    order = ""
    if ckpt.source_change(saved_cfg.get("data", {}).get("name"), run.cfg.data.name) and seen:
        order = (f"; the rest of epoch {p.epoch + 1} follows the new source's order, so an image may come twice or "
                 f"not at all before it ends")
    if run.info.is_main:
        log.warning("resuming %s under another recipe (%s): epoch %d continues after the %d samples it has seen, at "
                    "step %d of %d%s%s", path, ", ".join(changes), p.epoch + 1, seen, p.step_in_epoch,
                    run.steps_per_epoch, "; best metrics start afresh" if p.best["epoch"] < 0 else "", order)


# ---- the epoch loop ----------------------------------------------------------------------------------------

def fit(run: Run) -> None:
    """Epochs until trainer.epochs or trainer.max_steps: train, validate every trainer.eval_every, save."""
    t, p = run.cfg.trainer, run.progress
    max_steps = t.max_steps if t.max_steps is not None else math.inf
    done = p.global_step >= max_steps
    while p.epoch < t.epochs and not done:
        epoch = p.epoch
        run.sampler.set_epoch(epoch, start=p.step_in_epoch * t.accum_steps * run.cfg.data.batch_size)
        train_one_epoch(run, max_steps)
        done = p.global_step >= max_steps
        epoch_finished = p.step_in_epoch >= run.steps_per_epoch
        if epoch_finished:
            p.epoch, p.step_in_epoch = epoch + 1, 0
        if done or not epoch_finished or (epoch + 1) % t.eval_every == 0 or p.epoch == t.epochs:
            validate(run, epoch + 1)
        save(run, ckpt.LAST, keep_previous=ckpt.PREV)


class StepStats:
    """What the steps of one log interval report, kept on the device and read once per interval.

    Each step writes its loss, non-finite-loss flag, stop request and skipped images into ``step`` and all-reduces
    it (a device collective: no wait for the host). ``window`` accumulates the interval: the loss over finite steps,
    finite and non-finite step counts, skipped images, the first non-finite step (+ 1; 0 = none), the last gradient
    norm and the stop request. :meth:`read` is the interval's one device -> host copy.

    The stop request travels faster: each step's reduced flag is also copied to host memory without waiting, and
    :meth:`stop_requested` reads the one of ``STOP_LAG`` steps back, waiting at most for that step to finish, not
    for the steps queued after it. The flag is reduced over the ranks, so every rank stops at the same step.
    """

    STOP_LAG = 1

    def __init__(self, device: torch.device):
        self.step = torch.zeros(4, device=device)
        self.window = torch.zeros(7, device=device)
        on_cuda = device.type == "cuda"
        self._stops = torch.zeros(self.STOP_LAG + 1, pin_memory=on_cuda)
        self._stops_view = self._stops.numpy()  # (read through numpy: host memory, not a device read)
        self._copied = [torch.cuda.Event() if on_cuda else None for _ in range(self.STOP_LAG + 1)]
        self._recorded = 0

    def record(self, loss_sum: torch.Tensor, accum_steps: int, stop: bool, skipped: int, info: DistInfo):
        s = self.step
        s[0].copy_(loss_sum / accum_steps)
        s[1].copy_((~torch.isfinite(loss_sum)).float())
        s[2].fill_(float(stop))
        s[3].fill_(float(skipped))
        all_reduce_sum(s, info)
        slot = self._recorded % len(self._copied)
        self._stops[slot].copy_(s[2], non_blocking=True)
        if self._copied[slot] is not None:
            self._copied[slot].record()
        self._recorded += 1
        return (s[1] > 0).float()  # non-finite on any rank: every rank skips the optimizer step

    def stop_requested(self) -> bool:
        """Whether any rank had a stop request at the step ``STOP_LAG`` steps before the last one recorded."""
        if self._recorded <= self.STOP_LAG:
            return False
        slot = (self._recorded - 1 - self.STOP_LAG) % len(self._copied)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        return bool(self._stops_view[slot] > 0)

    def add(self, found_inf: torch.Tensor, grad_norm: torch.Tensor | None, global_step: int) -> None:
        w, s = self.window, self.step
        w[0] += torch.where(found_inf > 0, 0.0, s[0])
        w[1] += 1 - found_inf
        w[2] += found_inf
        w[3] += s[3]
        w[4] = torch.where((w[4] == 0) & (found_inf > 0), float(global_step + 1), w[4])
        w[5] = float("nan") if grad_norm is None else grad_norm
        w[6] = torch.maximum(w[6], s[2])

    def read(self, world_size: int) -> dict:
        loss, finite, nonfinite, skipped, first_bad, grad_norm, stop = self.window.tolist()
        self.window.zero_()
        return {"loss": loss / max(finite * world_size, 1) if finite else float("nan"), "nonfinite": int(nonfinite),
                "skipped_images": int(skipped), "first_nonfinite": int(first_bad) - 1, "grad_norm": grad_norm,
                "stop": stop > 0}


def train_one_epoch(run: Run, max_steps: float = math.inf) -> None:
    """Optimizer steps from progress.step_in_epoch to the end of the epoch (or max_steps / a stop signal).

    The step path does not wait for the device: a step with a non-finite loss is skipped on the device, and the
    figures a step reports are read once per log interval (and before a checkpoint), where a non-finite loss
    (trainer.on_nonfinite=stop) then takes effect. A stop signal takes effect within StepStats.STOP_LAG steps."""
    t, p, info = run.cfg.trainer, run.progress, run.info
    run.train_model.train()
    batches = iter(run.train_loader)
    # closed however the epoch ends: an error line printed next starts a line of its own, not the bar's
    with run.logger.progress(total=run.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {p.epoch + 1}") as bar:
        stats, window_images, window_start = StepStats(info.device), 0, time.time()
        running_stats = RunningStats(run.model) if t.on_nonfinite == "skip" else None
        while p.step_in_epoch < run.steps_per_epoch and p.global_step < max_steps:
            run.scheduler.step_update(p.global_step)
            if running_stats is not None:
                running_stats.save()
            loss_sum, images_seen, skipped = _forward_backward(run, batches)
            found_inf = stats.record(loss_sum, t.accum_steps, run.stop.requested is not None, skipped, info)
            if running_stats is not None:
                running_stats.restore_if(found_inf)
            stats.add(found_inf, _optimizer_step(run, found_inf), p.global_step)
            p.global_step += 1
            p.step_in_epoch += 1
            window_images += images_seen * info.world_size
            bar.update(1)
            checkpoint_due = t.ckpt_every_steps and p.global_step % t.ckpt_every_steps == 0
            stop_due = stats.stop_requested()  # a signal takes effect within STOP_LAG steps, not at the next log
            if not (p.global_step % t.log_every == 0 or p.step_in_epoch == run.steps_per_epoch
                    or p.global_step >= max_steps or checkpoint_due or stop_due):
                continue
            window = stats.read(info.world_size)
            if run.lease is not None:
                run.lease.check()  # another job took the run dir over (this one stalled past the lease's lifetime)
            _account_nonfinite(run, window)
            _log_step(run, bar, window, window_images / max(time.time() - window_start, 1e-9))
            window_images, window_start = 0, time.time()
            if stop_due or window["stop"]:  # SIGTERM / SIGUSR1 / SIGUSR2 on any rank: every rank saves and stops
                save(run, ckpt.LAST, keep_previous=ckpt.PREV)
                signum = run.stop.requested or signal.SIGTERM
                raise Preempted(signum, p.global_step, run.stop.previous.get(signum))
            if checkpoint_due and p.step_in_epoch < run.steps_per_epoch:
                save(run, ckpt.LAST, keep_previous=ckpt.PREV)


class RunningStats:
    """A model's BatchNorm running statistics, put back where they were after a step skipped for a non-finite loss
    (its forward moved them, and a non-finite batch would leave them non-finite for every later evaluation).
    Decided on the device: no host sync."""

    def __init__(self, model: torch.nn.Module):
        self.live = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                     for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.live]

    @torch.no_grad()
    def save(self) -> None:
        for saved, live in zip(self.saved, self.live):
            saved.copy_(live)

    @torch.no_grad()
    def restore_if(self, skipped: torch.Tensor) -> None:
        for saved, live in zip(self.saved, self.live):
            live.copy_(torch.where(skipped > 0, saved, live))


def _forward_backward(run: Run, batches) -> tuple[torch.Tensor, int, int]:
    """trainer.accum_steps micro-batches of forward and backward; returns (summed loss, images, skipped images).

    DDP all-reduces the gradients on the last micro-batch only. Every rank runs that all-reduce, even when its last
    micro-batch had no readable image: see :func:`_backward_without_images`."""
    t, info = run.cfg.trainer, run.info
    loss_sum, images_seen, skipped = torch.zeros((), device=info.device), 0, 0
    for micro in range(t.accum_steps):
        images, targets, n_skipped = next(batches)
        skipped += n_skipped
        last = micro == t.accum_steps - 1
        if images is not None and run.mixup_fn is not None and len(images) % 2:
            # Mixup pairs images; a skipped corrupt file can make the batch odd
            images, targets = (images[:-1], targets[:-1]) if len(images) > 1 else (None, None)
        if images is None:
            if last and info.distributed:
                _backward_without_images(run)
            continue
        if run.mixup_fn is not None:  # (the loader gave normalised batches on the device)
            images, targets = run.mixup_fn(images, targets)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        no_sync = info.distributed and not last and hasattr(run.train_model, "no_sync")
        if t.compile and t.get("compile_mode") == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new CUDA-graph step: no output of the last one is read
        with run.train_model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(info.device, t.precision):
                loss = run.criterion(run.train_model(images), targets)
            run.scaler.scale(loss / t.accum_steps).backward()
        loss_sum += loss.detach().float()
        images_seen += len(images)
    return loss_sum, images_seen, skipped


def _backward_without_images(run: Run) -> None:
    """A rank whose micro-batch held no readable image still joins DDP's gradient all-reduce (the other ranks wait in
    it): a zero-weighted backward through one blank image, in eval mode (no BatchNorm statistics, no drop path),
    adds nothing to its gradients."""
    d = run.cfg.data
    image = torch.zeros(1, 3, d.img_size, d.img_size, device=run.info.device)
    if run.cfg.trainer.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    run.train_model.eval()
    try:
        with autocast(run.info.device, run.cfg.trainer.precision):
            out = run.train_model(image)
        (out.float().sum() * 0.0).backward()
    finally:
        run.train_model.train()


def _optimizer_step(run: Run, found_inf: torch.Tensor) -> torch.Tensor | None:
    """Clip, step (skipped on the device where ``found_inf``), update the EMA (not after a skipped step), zero the
    gradients; returns the gradient norm before clipping as a device tensor, or None without clipping. fp16:
    GradScaler skips steps whose gradients overflow (a non-finite loss has non-finite gradients), as it does
    anyway."""
    from litv2.accel import _internals

    grad_norm, skipped = None, found_inf
    if run.cfg.optim.clip_grad:
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.clip_grad)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        overflow = _internals.grad_scaler_found_inf(run.scaler, run.optimizer) if run.ema is not None else None
        if overflow is not None:
            skipped = torch.clamp(found_inf + overflow.to(found_inf.dtype), max=1.0)
        run.scaler.update()
    else:
        _internals.optimizer_step_unless(run.optimizer, found_inf)
    _zero_grad(run)
    if run.ema is not None:
        _update_ema(run, skipped)
    return grad_norm


@torch.no_grad()
def _update_ema(run: Run, skipped: torch.Tensor) -> None:
    """timm's ModelEmaV3 step towards the weights, decided on the device: after a skipped optimizer step (``skipped``
    nonzero) the EMA, its buffers included, stays as it was."""
    ema, keep = run.ema, (skipped <= 0)
    weight = keep.float() * (1.0 - ema.get_decay(run.progress.global_step))
    pairs = zip(ema.module.state_dict().values(), run.model.state_dict().values())
    if ema.exclude_buffers:
        pairs = zip(ema.module.parameters(), run.model.parameters())
    floats = [], []
    for e, m in pairs:
        if e.is_floating_point():
            floats[0].append(e)
            floats[1].append(m)
        else:
            e.copy_(torch.where(keep, m, e))
    if floats[0]:
        torch._foreach_lerp_(floats[0], floats[1], weight.to(floats[0][0].dtype))


def _zero_grad(run: Run) -> None:
    """Free the gradients; under DDP zero them in place (they are views of its buckets, see _wrap_for_training)."""
    run.optimizer.zero_grad(set_to_none=not run.info.distributed)


def _account_nonfinite(run: Run, window: dict) -> None:
    """Count the interval's skipped images and non-finite-loss steps; trainer.on_nonfinite=stop ends the run at
    the first such step (its update was skipped, and no checkpoint was written after it)."""
    p = run.progress
    p.skipped_images += window["skipped_images"]
    if not window["nonfinite"]:
        return
    if run.cfg.trainer.on_nonfinite == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {window['first_nonfinite']} (epoch {p.epoch + 1}); the "
                            f"last good checkpoint is kept (trainer.on_nonfinite=skip skips such steps instead)")
    p.skipped_steps += window["nonfinite"]
    if run.info.is_main:
        log.warning("non-finite loss at %d step(s) from step %d: skipped", window["nonfinite"],
                    window["first_nonfinite"])


def _log_step(run: Run, bar, window: dict, rate: float) -> None:
    p = run.progress
    lr = run.optimizer.param_groups[0]["lr"]
    run.logger.log({"step": p.global_step, "epoch": p.epoch + p.step_in_epoch / run.steps_per_epoch,
                    "train/loss": window["loss"], "train/lr": lr, "train/grad_norm": window["grad_norm"],
                    "train/images_per_s": rate, "train/skipped_images": p.skipped_images})
    bar.set_postfix(loss=f"{window['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")


def validate(run: Run, epoch: int) -> None:
    """Val metrics of the model (and its EMA), logged; a new best top-1 saves best.pth."""
    t, p, info = run.cfg.trainer, run.progress, run.info
    sync_buffers(run.model, info)  # rank 0's BatchNorm statistics everywhere: metrics independent of the layout
    graphs = bool(t.get("cuda_graphs", False))
    metrics = evaluate(run.model, run.val_loader, info.device, t.precision, info, t.channels_last, cuda_graphs=graphs)
    row = {"step": p.global_step, "epoch": epoch, **{f"val/{k}": v for k, v in metrics.items()}}
    if run.ema is not None:
        sync_buffers(run.ema.module, info)
        ema_metrics = evaluate(run.ema.module, run.val_loader, info.device, t.precision, info, t.channels_last,
                               cuda_graphs=graphs)
        row.update({f"val_ema/{k}": v for k, v in ema_metrics.items()})
        metrics["ema_top1"], metrics["ema_top5"] = ema_metrics["top1"], ema_metrics["top5"]
    p.last_eval = metrics
    row["train/skipped_images"] = p.skipped_images
    run.logger.log(row)
    run.logger.info("epoch %d step %d: val top-1 %.2f top-5 %.2f loss %.4f", epoch, p.global_step,
                    metrics["top1"], metrics["top5"], metrics["loss"])
    if metrics["top1"] > p.best["top1"]:
        p.best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch, "step": p.global_step}
        save(run, ckpt.BEST)


def save(run: Run, name: str, keep_previous: str | None = None) -> None:
    """All ranks call this (RNG states are gathered); rank 0 writes, and no rank returns before the file is in
    place (a rank that exits early, e.g. after a stop signal, would make torchrun or srun kill rank 0 mid-write).

    Rank 0 then sends the outcome: a failed save (full disk, I/O error) raises the same
    :class:`~litv2.engine.checkpoint.CheckpointSaveError` on every rank, so all of them end at once."""
    info, p = run.info, run.progress
    p.elapsed_s = time.time() - run.start_time
    rngs = all_gather_object(ckpt.rng_state(), info)
    failure, error = None, None
    if info.is_main:
        state = {
            "format": ckpt.FORMAT, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "progress": asdict(p), "rng": rngs, "world_size": info.world_size,
            "config": OmegaConf.to_container(run.cfg, resolve=True), "config_hash": ckpt.config_hash(run.cfg),
        }
        try:
            if run.lease is not None:
                run.lease.check()  # never write into a run dir another job has taken over
            ckpt.save_atomic(state, run.run_dir / name, keep_previous=keep_previous)
        except UserError as e:  # a failed write (CheckpointSaveError), a run dir taken over (RunDirBusy)
            failure, error = (type(e), str(e)), e
        except Exception as e:  # not the file system: rank 0 raises it as it is, the other ranks stop too
            failure, error = (RuntimeError, f"rank 0 failed to save {run.run_dir / name}: {type(e).__name__}: {e}"), e
    failure = broadcast_object(failure, info)
    if error is not None:
        raise error
    if failure is not None:
        kind, message = failure
        raise kind(message)
    if name == ckpt.LAST:
        run.saved_step = p.global_step


# ---- finish ------------------------------------------------------------------------------------------------

def finish(run: Run) -> dict:
    """summary.json (final and best metrics, the efficiency report) on rank 0; {} on the other ranks."""
    cfg, p, summary = run.cfg, run.progress, {}
    if run.info.is_main:
        final = p.last_eval
        summary = {
            "status": "completed", "run_dir": str(run.run_dir), "model": cfg.model.name,
            "final_top1": final.get("top1"), "final_top5": final.get("top5"), "final_loss": final.get("loss"),
            "best_top1": p.best["top1"], "best_top5": p.best["top5"], "best_epoch": p.best["epoch"],
            "epochs": round(p.epoch + p.step_in_epoch / run.steps_per_epoch, 4), "steps": p.global_step,
            "wall_time_s": round(time.time() - run.start_time, 2), "world_size": run.info.world_size,
            "global_batch": run.global_batch, "skipped_images": p.skipped_images, "skipped_steps": p.skipped_steps,
        }
        if run.ema is not None:
            summary.update({"final_ema_top1": final.get("ema_top1"), "final_ema_top5": final.get("ema_top5")})
        summary["tf32"] = tf32_enabled(run.info.device)
        if cfg.profile.enabled:
            report = profile_model(cfg, run.info.device, _release_all_but_the_weights(run))
            summary.update({k: report.get(k) for k in ("params", "gflops", "throughput", "train_mem_mb",
                                                        "test_mem_mb", "precision", "profile_error") if k in report})
        run.logger.summary(summary)
        run.logger.info("done: final top-1 %.2f, best %.2f (epoch %d), %.0f s -> %s", summary["final_top1"] or 0.0,
                        summary["best_top1"], summary["best_epoch"], summary["wall_time_s"],
                        run.run_dir / "summary.json")
    barrier(run.info)
    return summary


def _release_all_but_the_weights(run: Run) -> dict:
    """The trained weights (on the host), with the model, its optimizer, EMA and DDP wrapper let go and the device's
    cache emptied: the efficiency report then measures a fresh copy with nothing else resident."""
    import gc

    weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    run.model = run.train_model = run.ema = run.optimizer = run.scheduler = run.scaler = None
    gc.collect()
    if run.info.device.type == "cuda":
        torch.cuda.empty_cache()
    return weights
