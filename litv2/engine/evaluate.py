"""Evaluation: top-1 / top-5 / loss over a (sharded) val loader, weight loading, the eval.py job."""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from litv2.errors import UserError

from .checkpoint import FORMAT, load_file
from .distributed import DistInfo, all_reduce_sum
from .weights import eval_pretrained, fetch_start_weights

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    dtype = AMP_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model, loader, device, precision: str = "fp32", info: DistInfo | None = None,
             channels_last: bool = False, pad_to: int | None = None, cuda_graphs: bool = False) -> dict:
    """Top-1, top-5 (%), mean cross-entropy and the image count, exact across ranks.

    Each rank evaluates its own shard (no padding); sums are all-reduced, so every val image is
    counted exactly once whatever the world size. ``pad_to``: a smaller batch is padded with zero images to this
    size and their outputs dropped (a model compiled for static shapes then runs one graph). ``cuda_graphs``: the
    forward is captured in a CUDA graph at the first batch's shape and replayed (:mod:`litv2.accel.cudagraphs`); a
    batch of another shape runs eagerly, so the counts are eager's; a forward that cannot be captured runs eagerly
    (one warning).
    """
    from litv2.accel.cudagraphs import GraphedForward

    was_training = model.training
    model.eval()
    forward = GraphedForward(model, fallback=True) if cuda_graphs else model
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, images, skipped
    for images, targets, skipped in loader:
        sums[4] += skipped
        if images is None:
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        n = len(images)
        if pad_to is not None and n < pad_to:  # in the batch's memory format: a compiled graph guards on strides
            nhwc = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
            padded = images.new_zeros((pad_to, *images.shape[1:]))
            padded = padded.contiguous(memory_format=torch.channels_last) if nhwc else padded
            padded[:n] = images
            images = padded
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = forward(images)
        logits = logits[:n].float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, targets, reduction="sum")
        sums[3] += len(targets)
    if cuda_graphs:
        forward.release()
    if info is not None:
        all_reduce_sum(sums, info)
    model.train(was_training)
    c1, c5, loss, n, skipped = sums.tolist()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss / max(n, 1),
            "images": int(n), "skipped_images": int(skipped)}


def load_weights(model, path, use_ema: bool = False, strict: bool = True, state: dict | None = None) -> dict:
    """Load our training checkpoint (optionally its EMA) or an authors' release file into ``model``.

    ``state``: the file's contents if already read. Returns them (for their metadata). A file that
    does not fit the model raises UserError naming the first mismatching keys.
    """
    state = load_file(path) if state is None else state
    sd = state
    if state.get("format") == FORMAT:
        if use_ema and state.get("ema") is None:
            raise UserError(f"checkpoint {path} holds no EMA weights (trained with trainer.ema.enabled=false)")
        sd = state["ema"] if use_ema else state["model"]
    from litv2.models import load_filtered_state_dict

    # unwraps {"model": ...}, strips module./_orig_mod., leaves a foreign-shaped classifier fresh
    try:
        missing, unexpected, head_dropped = load_filtered_state_dict(model, sd)
    except (ValueError, RuntimeError) as e:  # another HiLo alpha; other shapes (size mismatch for ...)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
        raise UserError(f"checkpoint {path} does not fit model {type(model).__name__}: {detail}") from None
    if strict and (missing or unexpected or head_dropped):
        raise UserError(f"checkpoint {path} does not fit model {type(model).__name__}: missing keys "
                        f"{(missing + head_dropped)[:3]}, unexpected keys {unexpected[:3]}")
    if missing or unexpected:
        log.warning("loaded %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))
    return state


def profile_model(cfg, device, state_dict: dict | None = None) -> dict:
    """The efficiency report of the paper's Table 1 (params, GFLOPs, img/s, train/test memory).

    It measures a fresh copy of the configured model (with ``state_dict``), built, placed and accelerated as
    train.py and eval.py build theirs, under the process settings the caller applied (cuDNN autotuning, TF32), at
    ``profile.precision``: nothing else is resident, so both report the same figures for the same model.
    """
    from litv2.profiling import efficiency_report

    from .builders import apply_accel, build_model, tf32_enabled

    p, device = cfg.profile, torch.device(device)
    on_gpu = device.type == "cuda"
    runs = p.runs if p.runs is not None else (30 if on_gpu else 3)
    warmup = p.warmup if p.warmup is not None else (10 if on_gpu else 1)
    precision = p.get("precision") or "fp32"
    channels_last = bool(cfg.trainer.get("channels_last", False))
    try:
        model = build_model(cfg, pretrained=False)  # (the weights come from state_dict)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        apply_accel(model, cfg)
        report = efficiency_report(model, img_size=p.img_size, device=device, batch_size=p.batch_size,
                                   runs=runs, warmup=warmup, memory=p.memory, amp_dtype=AMP_DTYPES[precision],
                                   channels_last=channels_last)
        return {**report, "precision": precision, "tf32": tf32_enabled(device)}
    except Exception as e:  # profiling must never cost a finished training run
        log.warning("efficiency report failed: %s", e)
        return {"profile_error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def run_eval(cfg) -> dict:
    """The eval.py job: accuracy of a checkpoint (or the model's released weights) on data.root/val plus the
    efficiency report."""
    from litv2.data import dataset_root

    from .builders import apply_process_settings, check_config, process_settings
    from .distributed import cleanup, init_distributed

    check_config(cfg, training=False)
    pretrained = eval_pretrained(cfg) and not cfg.profile_only
    if not cfg.profile_only and cfg.checkpoint is None and not pretrained:
        raise UserError("checkpoint=<path or URL> or pretrained=true is required (or profile_only=true for the "
                        "efficiency table alone)")
    state, checkpoint = None, None
    if not cfg.profile_only:
        checkpoint = fetch_start_weights(cfg, "eval")  # downloads (released weights, a URL) before anything else
    if checkpoint is not None:
        state = load_file(checkpoint)
        if cfg.use_run_config and state.get("format") == FORMAT and state.get("config"):
            cfg = with_run_config(cfg, state["config"])
            log.info("model, hilo, data and profile settings taken from the checkpoint's run config "
                     "(use_run_config=false to use the command line's)")
            check_config(cfg, training=False)
    root = None if cfg.profile_only else dataset_root(cfg.data, splits=("val",))
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(cfg.trainer.device)
    completed = False
    try:
        with process_settings():
            apply_process_settings(cfg, info.device)  # as in training: cuDNN autotuning, TF32, malloc
            results = _run_eval(cfg, state, checkpoint, pretrained, root, info)
        completed = True
        return results
    finally:
        if owns_group:
            cleanup(completed)


def _run_eval(cfg, state, checkpoint, pretrained: bool, root, info) -> dict:
    from litv2.data import build_eval_loader
    from litv2.logging import format_table

    from .builders import apply_accel, build_model, compile_model

    model = build_model(cfg, pretrained=pretrained)
    if checkpoint is not None:
        load_weights(model, checkpoint, use_ema=cfg.use_ema, state=state)
    model.to(info.device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    apply_accel(model, cfg)
    results = {}
    if not cfg.profile_only:
        eval_model = compile_model(model, cfg.trainer) if cfg.trainer.compile else model
        loader = build_eval_loader(cfg.data, root, info.rank, info.world_size, device=info.device)
        # compiled with static shapes: the last, smaller batch is padded to the others' size (no second compile);
        # with CUDA graphs it runs eagerly (or, compiled too, padded) and the full batches replay the graph
        graphs = bool(cfg.trainer.get("cuda_graphs", False))
        results.update(evaluate(eval_model, loader, info.device, cfg.trainer.precision, info,
                                channels_last=cfg.trainer.channels_last,
                                pad_to=cfg.data.batch_size if cfg.trainer.compile else None, cuda_graphs=graphs))
    if cfg.profile.enabled or cfg.profile_only:
        results.update(profile_model(cfg, info.device, None if cfg.profile_only else model.state_dict()))
    if info.is_main:
        print(format_table({k: v for k, v in results.items() if not isinstance(v, (list, dict))}))
        if cfg.get("output"):
            import json

            with open(cfg.output, "w") as f:
                json.dump(results, f, indent=2)
    return results


LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers")


def with_run_config(cfg, run_cfg: dict):
    """``cfg`` with the model, hilo, data and profile settings a checkpoint was trained with, so that eval.py
    measures what the run's summary.json reports. Data and profile keys given on the command line (e.g.
    data.root=..., profile.batch_size=...), the loader settings, whether to profile (profile.enabled) and how the
    model is computed (model.accel and its options) stay as given; so does a profile key that follows another one
    given there (profile.precision: ${trainer.precision} after trainer.precision=...)."""
    import re

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    explicit = set()
    if HydraConfig.initialized():
        explicit = {o.split("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    run = OmegaConf.create(run_cfg)
    raw = OmegaConf.to_container(cfg, resolve=False)
    cfg = OmegaConf.create(raw)
    from .builders import ACCEL_KEYS

    accel = {k: cfg.model[k] for k in ACCEL_KEYS if k in cfg.model}
    cfg.model, cfg.hilo = run.model, run.hilo
    for k, v in accel.items():
        cfg.model[k] = v
    for k, v in run.data.items():
        if k not in LOADER_KEYS and f"data.{k}" not in explicit:
            cfg.data[k] = v
    for k, v in (run.get("profile") or {}).items():
        follows = re.fullmatch(r"\$\{([\w.]+)\}", str(raw.get("profile", {}).get(k, "")))
        if k != "enabled" and f"profile.{k}" not in explicit and not (follows and follows.group(1) in explicit):
            cfg.profile[k] = v
    return cfg
