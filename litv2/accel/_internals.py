"""The private torch APIs the project relies on, in one place, each behind a version check.

Each is looked up once, on the torch releases it was checked with (``CHECKED``). On another release, or if it is
gone, the caller's plain path runs and one warning says which fast path (or measurement) is lost, so a torch
upgrade cannot silently cost the CPU speed. ``LITV2_TRUST_TORCH=1`` uses the APIs on an unchecked release too.
``tests/test_accel.py`` fails when a CPU fast path stops being taken on the pinned torch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

log = logging.getLogger(__name__)

CHECKED = ((2, 11), (2, 14))  # oldest and newest torch (major, minor) these APIs were checked on


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _checked_release() -> bool:
    return CHECKED[0] <= torch_version() <= CHECKED[1] or os.environ.get("LITV2_TRUST_TORCH") == "1"


_warned: set[str] = set()


def warn_once(what: str, why: str) -> None:
    """One warning per lost fast path and process."""
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"litv2.accel: {what} is off ({why})", RuntimeWarning, stacklevel=3)


def _lookup(what: str, fetch):
    """``fetch()`` on a checked torch release, else None with one warning naming ``what``."""
    if not _checked_release():
        lo, hi = (".".join(map(str, v)) for v in CHECKED)
        warn_once(what, f"torch {torch.__version__} is outside the releases it was checked on, {lo} to {hi}; "
                        f"LITV2_TRUST_TORCH=1 uses it anyway")
        return None
    try:
        found = fetch()
    except (AttributeError, ImportError, RuntimeError) as e:
        found, detail = None, f"{type(e).__name__}: {e}"
    else:
        detail = "not in this torch build"
    if found is None:
        warn_once(what, detail)
    return found


# ---- oneDNN (CPU kernels) -------------------------------------------------------------------------

def onednn_conv_pointwise():
    """``torch.ops.mkldnn._convolution_pointwise``: conv + fused post-op (``"gelu"``) on oneDNN, or None."""
    return _lookup("the oneDNN CPU kernels (1x1-conv linears, fused dwconv+GELU)",
                   lambda: getattr(torch.ops.mkldnn, "_convolution_pointwise"))


def onednn_reorder_conv2d_weight():
    """``torch._C._nn.mkldnn_reorder_conv2d_weight``: a conv weight in oneDNN's blocked layout, or None."""
    return _lookup("oneDNN's cached blocked weights", lambda: torch._C._nn.mkldnn_reorder_conv2d_weight)


def storage_weak_ref():
    """``torch.multiprocessing.reductions.StorageWeakRef`` (keys the blocked-weight cache), or None."""
    def fetch():
        from torch.multiprocessing.reductions import StorageWeakRef
        return StorageWeakRef
    return _lookup("oneDNN's cached blocked weights", fetch)


# ---- autograd: saved-tensor hooks (memory recomputes) -----------------------------------------------

_hooks_enabled = _lookup("the ConvFFN memory recomputes",
                         lambda: getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None))
_top_hooks = _lookup("the ConvFFN memory recomputes",
                     lambda: getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None))


def recompute_hooks_available() -> bool:
    return _hooks_enabled is not None and _top_hooks is not None


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are already in place (activation checkpointing, CPU offloading) or switched off
    (``torch.func`` transforms, ``disable_saved_tensors_hooks``): then what autograd keeps is not ours to decide."""
    return not _hooks_enabled() or _top_hooks(False) is not None


def module_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks of its own or global ones."""
    from torch.nn.modules import module as module_lib
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(module_lib, "_global_forward_hooks", None)
                or getattr(module_lib, "_global_forward_pre_hooks", None))


# ---- profiler (CPU memory figures) ------------------------------------------------------------------

def profiler_active() -> bool:
    """Whether a torch.profiler / autograd.profiler session is running in this process."""
    enabled = getattr(torch.autograd, "_profiler_enabled", None)
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False) or (enabled and enabled()))


def cpu_allocation_events(prof) -> list[tuple[int, int, int]] | None:
    """``(time_ns, address, bytes)`` of the CPU allocations (negative bytes: frees) a finished ``torch.profiler``
    session recorded, from its event tree; None if that private analysis API is unavailable."""
    event_type = _lookup("CPU live-tensor memory figures (torch.profiler's event tree)",
                         lambda: __import__("torch._C._profiler", fromlist=["_EventType"])._EventType)
    if event_type is None:
        return None
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == event_type.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
    return sorted(events, key=lambda e: e[0])  # stable: same-time events keep the tree order


# ---- torch.optim: a step skipped on the device ----------------------------------------------------

def optimizer_step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a 0-dim float tensor on the parameters' device) is nonzero,
    decided on the device. Fused optimizers take ``found_inf`` (and ``grad_scale``) as attributes, the contract
    GradScaler uses with them, and skip the update inside their kernel; for the others the flag is read on the host
    (a device sync), with one warning."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and _checked_release():
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            optimizer.grad_scale = optimizer.found_inf = None
        return
    warn_once("skipping non-finite steps on the device",
              f"{type(optimizer).__name__} is not fused: the step reads the device every step")
    if not found_inf.item():
        optimizer.step()


def grad_scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Whether the GradScaler skipped the step it just took for ``optimizer`` (inf / NaN gradients), as a 0-dim
    tensor on the device (nonzero: skipped); call between ``scaler.step`` and ``scaler.update``. None where the
    scaler's record of it is not available (one warning)."""
    per_device = _lookup("the EMA leaving out the fp16 steps GradScaler skipped",
                         lambda: getattr(scaler, "_found_inf_per_device", None))
    if per_device is None:
        return None
    found = list(per_device(optimizer).values())
    return torch.stack([f.reshape(()) for f in found]).sum() if found else None


# ---- dynamo ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def keep_dynamo_recompile_limit():
    """Put back dynamo's recompile limit after the block (importing ``timm.optim`` raises it to 1,000,000 for its
    Kron optimizer, so a model that keeps recompiling under ``torch.compile`` would never stop)."""
    config = torch._dynamo.config
    limit = config.cache_size_limit
    try:
        yield
    finally:
        config.cache_size_limit = limit
