"""Config -> model, optimizer, LR schedule; and the up-front checks of a config.

``check_config`` runs before anything is built or loaded, so every user mistake it knows about
ends the program with one line (see litv2.errors.UserError).
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from pathlib import Path

import timm
import torch
from omegaconf import OmegaConf
from timm.scheduler import CosineLRScheduler

from litv2.errors import UserError
from litv2.hub import is_url

from litv2.accel._internals import keep_dynamo_recompile_limit

# timm.optim raises dynamo's recompile limit on import; torch's own limit is kept, so a model that keeps
# recompiling under trainer.compile=true still stops.
with keep_dynamo_recompile_limit():
    from timm.optim import param_groups_weight_decay

PRECISIONS = ("fp32", "bf16", "fp16")
ACCEL_MODES = ("auto", "none")
# model.* keys that choose how the model is computed (litv2.accel), not what: not constructor arguments
ACCEL_KEYS = ("accel", "recompute_gelu", "recompute_dwconv", "kernels")
KERNELS = (None, "auto", "triton")  # model.kernels (litv2.accel.accelerate's kernels)
DATASETS = ("imagenet", "folder", "shards", "digits", "synthetic")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # trainer.compile_mode (torch.compile's mode)
log = logging.getLogger(__name__)


def _register_model_families(name: str):
    import litv2.models  # noqa: F401  registers litv2_* with timm

    if name.startswith("faster_vit"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fastervit  # noqa: F401  registers faster_vit_* with timm


def check_model_name(name):
    if not isinstance(name, str) or not name:
        raise UserError("model.name is not set (e.g. model=litv2_s, or model=timm model.name=resnet50)")
    _register_model_families(name)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"unknown model {name!r}: not a timm model name{hint}")


def check_hilo(hilo_cfg):
    a, ws = hilo_cfg.alpha, hilo_cfg.window_size
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not (0.0 <= a <= 1.0) or math.isnan(a):
        raise UserError(f"hilo.alpha={a} is invalid: alpha is the Lo-Fi share of heads and must be in [0, 1]")
    if isinstance(ws, bool) or not isinstance(ws, numbers.Integral) or ws < 1:
        raise UserError(f"hilo.window_size={ws} is invalid: the HiLo window size must be an integer >= 1")


def check_alpha_variant(cfg):
    """model.name=litv2_s_alpha0_5 (LITv2-S at one released alpha) needs hilo.alpha to match: model.alpha is
    ${hilo.alpha} in conf/model/, and the variant refuses another alpha."""
    from litv2.models import ALPHA_VARIANTS

    name, alpha = cfg.model.name, cfg.model.get("alpha")
    if name in ALPHA_VARIANTS and isinstance(alpha, numbers.Real) and not math.isclose(alpha, ALPHA_VARIANTS[name]):
        raise UserError(f"model.name={name} is LITv2-S at HiLo alpha={ALPHA_VARIANTS[name]:g}, the config has "
                        f"model.alpha={alpha:g}: add hilo.alpha={ALPHA_VARIANTS[name]:g}")


def check_config(cfg, training: bool = True):
    """Validate everything that can be checked without building anything."""
    if "model" not in cfg or "name" not in cfg.model or OmegaConf.is_missing(cfg.model, "name"):
        raise UserError("model.name is not set (e.g. model=litv2_s, or model=timm model.name=resnet50)")
    check_hilo(cfg.hilo)
    check_model_name(cfg.model.name)
    check_alpha_variant(cfg)
    if cfg.model.get("accel", "auto") not in ACCEL_MODES:
        raise UserError(f"model.accel={cfg.model.accel!r} is not one of {', '.join(ACCEL_MODES)}")
    kernels = cfg.model.get("kernels")
    if kernels not in KERNELS:
        raise UserError(f"model.kernels={kernels!r} is not one of null, auto, triton")
    if kernels == "triton" and cfg.model.get("accel", "auto") != "auto":
        raise UserError("model.kernels=triton needs model.accel=auto (model.accel=none is the plain model)")
    if cfg.data.name not in DATASETS:
        raise UserError(f"data.name={cfg.data.name!r} is not one of {', '.join(DATASETS)}")
    if cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    t = cfg.trainer
    if t.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    check_compile_options(t)
    if not training:
        return
    if t.accum_steps < 1:
        raise UserError(f"trainer.accum_steps={t.accum_steps} must be >= 1")
    if t.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"trainer.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip'")
    if t.resume not in (None, "auto", "none") and not Path(str(t.resume)).is_file():
        raise UserError(f"trainer.resume={t.resume}: no such checkpoint file (use auto, none or a .pth path)")
    if t.init_from is not None and not is_url(str(t.init_from)) and not Path(str(t.init_from)).is_file():
        raise UserError(f"trainer.init_from={t.init_from}: no such checkpoint file (a file or an http(s) URL)")


def check_compile_options(t) -> None:
    """trainer.compile_mode and trainer.cuda_graphs: known values, and CUDA graphs only where CUDA is."""
    mode = t.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise UserError(f"trainer.compile_mode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode != "default" and not t.get("compile", False):
        raise UserError(f"trainer.compile_mode={mode} needs trainer.compile=true")
    graphs = t.get("cuda_graphs", False)
    if not isinstance(graphs, bool):
        raise UserError(f"trainer.cuda_graphs={graphs!r} must be true or false")
    if graphs:
        device = str(t.get("device", "auto"))
        if not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
            raise UserError(f"trainer.cuda_graphs=true needs a CUDA device (trainer.device={device}"
                            f"{', no CUDA here' if device == 'auto' else ''})")
        if t.get("compile", False) and mode == "reduce-overhead":
            raise UserError("trainer.cuda_graphs=true with trainer.compile_mode=reduce-overhead: both capture CUDA "
                            "graphs; use one of them")


def compile_model(model: torch.nn.Module, trainer_cfg) -> torch.nn.Module:
    """``torch.compile(model, dynamic=False, mode=trainer.compile_mode)``. Static shapes: a new input shape compiles
    a new graph instead of switching to symbolic sizes (with a symbolic image size inductor fails to lower LITv2)."""
    mode = trainer_cfg.get("compile_mode", "default")
    return torch.compile(model, dynamic=False, **({} if mode == "default" else {"mode": mode}))


def model_kwargs(model_cfg) -> dict:
    """model.* as timm.create_model keywords: all but name, pretrained and the accel keys."""
    kw = OmegaConf.to_container(model_cfg, resolve=True)
    for key in ("name", "pretrained", *ACCEL_KEYS):
        kw.pop(key, None)
    return kw


def apply_accel(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """model.accel=auto (the default): a LITv2 model runs on litv2.accel's kernels and memory recomputes
    (model.recompute_gelu, model.recompute_dwconv; model.kernels=triton adds the Triton kernels); none, and every
    other model: as built."""
    from litv2.accel import accelerate
    from litv2.models import LITv2

    m = cfg.model
    if m.get("accel", "auto") == "auto" and isinstance(model, LITv2):
        accelerate(model, recompute_gelu=m.get("recompute_gelu", True), recompute_dwconv=m.get("recompute_dwconv", False),
                   kernels=m.get("kernels"))
    return model


def build_model(cfg, pretrained: bool | None = None) -> torch.nn.Module:
    """timm.create_model(model.name, pretrained=model.pretrained, num_classes=data.num_classes, **the other model.*
    keys but the accel keys); ``pretrained`` overrides model.pretrained. Released weights come from the torch.hub
    cache, where :func:`litv2.engine.weights.fetch_start_weights` put them before anything else ran. The plain
    model: :func:`apply_accel` puts it on the accelerated kernels."""
    name = cfg.model.name
    _register_model_families(name)
    if pretrained is None:
        pretrained = bool(cfg.model.get("pretrained", False))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=cfg.data.num_classes,
                                 **model_kwargs(cfg.model))
    except (TypeError, ValueError) as e:
        raise UserError(f"model={name}: {str(e).splitlines()[0]}") from None


def lr_scale(cfg, world_size: int) -> float:
    """Linear LR scaling: global batch / optim.lr_base_batch."""
    global_batch = world_size * cfg.data.batch_size * cfg.trainer.accum_steps
    return global_batch / cfg.optim.lr_base_batch


@contextlib.contextmanager
def process_settings():
    """Put back, on exit, the process-wide torch settings a run changes (determinism, cuDNN autotuning, TF32)."""
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def apply_cpu_settings(trainer_cfg, device: torch.device) -> None:
    """trainer.cpu_keep_freed_memory for a run on CPU (GPU runs are left alone)."""
    from litv2 import accel

    if device.type == "cpu" and trainer_cfg.get("cpu_keep_freed_memory", False) and not accel.keep_freed_memory():
        log.warning("trainer.cpu_keep_freed_memory: this process' malloc is not glibc's; left as it is")


def apply_process_settings(cfg, device: torch.device) -> None:
    """trainer.deterministic (deterministic kernels, no cuDNN autotuning, no TF32) or cuDNN autotuning and, on
    CUDA, TF32 for fp32 matmuls and convolutions (trainer.tf32; torch leaves TF32 matmuls off); on CPU,
    trainer.cpu_keep_freed_memory. train.py and eval.py run with the same settings."""
    t = cfg.trainer
    apply_cpu_settings(t, device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        tf32 = bool(t.get("tf32", True)) and not t.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def tf32_enabled(device: torch.device) -> bool:
    """Whether fp32 matmuls on ``device`` run in TF32 (what the run's report records)."""
    return device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def build_optimizer(cfg, model: torch.nn.Module, world_size: int) -> torch.optim.Optimizer:
    """AdamW (fused on CPU and CUDA); no weight decay on norms, biases, 1-D params; DTM offset convs at
    lr x offset_lr_scale."""
    o = cfg.optim
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=skip)
    offset = {id(p) for n, p in model.named_parameters() if "conv_offset" in n}
    split = []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in offset]
        off = [p for p in g["params"] if id(p) in offset]
        if rest:
            split.append({**g, "params": rest})
        if off:
            split.append({**g, "params": off, "lr_scale": o.offset_lr_scale})
    # fused: one kernel for all parameters, and a step with non-finite gradients is skipped on the device
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(split, lr=o.lr * lr_scale(cfg, world_size), betas=tuple(o.betas), eps=o.eps,
                             fused=fused or None)


def build_scheduler(cfg, optimizer, steps_per_epoch: int, world_size: int) -> CosineLRScheduler:
    """Cosine to min_lr over all epochs with a linear warmup, stepped per optimizer step (Swin/LITv1)."""
    s, scale = cfg.sched, lr_scale(cfg, world_size)
    return CosineLRScheduler(
        optimizer, t_initial=cfg.trainer.epochs * steps_per_epoch, lr_min=s.min_lr * scale,
        warmup_lr_init=s.warmup_lr * scale, warmup_t=int(s.warmup_epochs * steps_per_epoch),
        cycle_limit=1, t_in_epochs=False)
