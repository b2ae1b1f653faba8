"""Params, FLOPs, throughput and memory: the efficiency figures the paper reports for every model.

FLOPs follow the paper's (and fvcore's) convention: one multiply-accumulate = one FLOP, counted for
linear layers, convolutions (incl. the deformable conv of DTM), attention matrix products and
normalisation layers; element-wise ops (GELU, softmax, residual adds, pooling) are not counted.
fvcore does not know ``aten::scaled_dot_product_attention`` nor ``torchvision::deform_conv2d``; the
handles below count them as the explicit ``q @ k^T``, ``attn @ v`` and a dense conv would be counted,
so a fused kernel reports the same FLOPs as the naive formulation in the supplementary (Sec. B).

Throughput follows the paper's protocol (batch 64, 224x224, warm-up, mean over 30 timed runs).
Memory is ``torch.cuda.max_memory_allocated`` on GPU (weights and input included). On CPU, PyTorch keeps
no allocator statistics, so it is the peak of the tensor bytes one step allocates and holds, from
``torch.profiler``'s allocation records (independent of the C allocator; weights and input excluded; see
:func:`cpu_live_peak` for what it does not see); where the profiler cannot run (another profiler is
active), the peak growth of the process' resident memory, sampled by a background thread, which also
counts heap fragmentation.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from math import prod
from typing import Any

import torch
from torch import nn

__all__ = [
    "count_params", "count_flops", "count_flops_module", "flop_handles", "measure_throughput",
    "measure_memory", "peak_memory", "cpu_live_peak", "efficiency_report",
]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---- fvcore handles -----------------------------------------------------------------------------

def _shape(v) -> list[int] | None:
    t = v.type()
    return list(t.sizes()) if hasattr(t, "sizes") and t.sizes() is not None else None


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``softmax(q k^T) v``: B*heads*Lq*Lk*d for q@k^T plus B*heads*Lq*Lk*dv for attn@v."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = prod(q[:-2])
    lq, d = q[-2], q[-1]
    lk, dv = k[-2], v[-1]
    return batch * lq * lk * (d + dv)


def deform_conv2d_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """A deformable conv costs what the dense conv costs: out_elements * Cin/groups * kh * kw."""
    w = _shape(inputs[1])
    out = _shape(outputs[0])
    return prod(out) * w[1] * w[2] * w[3]


_IGNORED_OPS = [
    "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::gelu", "aten::avg_pool2d", "aten::mean",
    "aten::softmax", "aten::sub", "aten::div", "aten::pad", "aten::constant_pad_nd", "aten::relu",
    "aten::relu_", "aten::silu", "aten::sigmoid", "aten::roll", "aten::rsub", "aten::max_pool2d",
    "aten::dropout", "aten::neg", "aten::exp", "aten::sum", "aten::clamp", "aten::clamp_min",
    "aten::linalg_vector_norm", "aten::norm", "aten::expand_as", "aten::fill_", "aten::hardswish",
    "aten::hardsigmoid", "aten::sqrt", "aten::pow", "aten::abs", "aten::cumsum", "aten::masked_fill",
    "aten::scatter_add", "aten::new_zeros", "aten::zeros_like",
]


def flop_handles() -> dict[str, Callable | None]:
    """Extra fvcore handles: counted ops plus element-wise ops explicitly set to zero."""
    handles: dict[str, Callable | None] = {op: None for op in _IGNORED_OPS}
    handles["aten::scaled_dot_product_attention"] = sdpa_flop_jit
    handles["torchvision::deform_conv2d"] = deform_conv2d_flop_jit
    return handles


def count_flops_module(module: nn.Module, inputs: tuple) -> int:
    """FLOPs of ``module(*inputs)`` with fvcore and this project's handles (module put in eval mode)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            fca = FlopCountAnalysis(module, inputs).set_op_handle(**flop_handles())
            fca.unsupported_ops_warnings(False)
            fca.uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            return int(fca.total())
    finally:
        module.train(was_training)


def _img_hw(img_size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def count_flops(model: nn.Module, img_size=224, in_chans: int = 3, batch_size: int = 1) -> int:
    """FLOPs of one forward pass at ``img_size`` (an int or (H, W)) for ``batch_size`` images."""
    h, w = _img_hw(img_size)
    p = next(model.parameters(), None)
    x = torch.zeros(batch_size, in_chans, h, w, device=p.device if p is not None else "cpu")
    return count_flops_module(model, (x,))


# ---- speed and memory ---------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def measure_throughput(model: nn.Module, batch_size: int = 64, img_size=224, device="cpu", runs: int = 30,
                       warmup: int = 10, amp_dtype: torch.dtype | None = None, in_chans: int = 3,
                       channels_last: bool = False) -> float:
    """Inference images/s: ``warmup`` untimed passes, then the mean over ``runs`` timed passes."""
    device = torch.device(device)
    h, w = _img_hw(img_size)
    x = torch.randn(batch_size, in_chans, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            for _ in range(warmup):
                model(x)
            _sync(device)
            start = time.perf_counter()
            for _ in range(runs):
                model(x)
            _sync(device)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return batch_size * runs / elapsed


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Background sampler of the resident set size (Linux), for CPU peak-memory figures."""

    def __init__(self, interval: float = 0.0005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)


def measure_memory(model: nn.Module, batch_size: int = 64, img_size=224, device="cpu", train: bool = False,
                   amp_dtype: torch.dtype | None = None, in_chans: int = 3, channels_last: bool = False) -> int:
    """Peak memory (bytes) of one train step (forward + backward) or one inference forward.

    GPU: ``torch.cuda.max_memory_allocated`` over the step (weights included, as the paper reports).
    CPU: peak of the live tensor bytes the step allocates (activations, gradients, workspace), see
    :func:`peak_memory`. Either is measured after one unmeasured call of the same kind, so what runs once
    (cuDNN's autotuning and its workspaces, the CPU fast path's packed weight copies) does not count, whatever
    was run before.
    """
    device = torch.device(device)
    h, w = _img_hw(img_size)
    x = torch.randn(batch_size, in_chans, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.train(train)
    grad_ctx = contextlib.nullcontext() if train else torch.inference_mode()

    def step():
        with grad_ctx, _autocast(device, amp_dtype):
            out = model(x)
            if train:
                out.float().mean().backward()

    try:
        step()  # what the first call builds (autotuning, packed weights) is not the step's memory
        if train:
            model.zero_grad(set_to_none=True)
        return peak_memory(step, device)
    finally:
        if train:
            model.zero_grad(set_to_none=True)
        model.train(was_training)


# What torch.profiler's C++ side prints to stderr on every session (kineto's start/stop and device probe
# lines, c10's note on blocks allocated before the session): not meant for users of a memory figure.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "gpuGetDeviceCount", "allocated before the profiling started")


@contextlib.contextmanager
def _without_profiler_noise():
    """Route file descriptor 2 to a temporary file while the block runs, then write back every line
    except the profiler's own chatter (so the block's real warnings and errors still show, afterwards)."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(n in line for n in _PROFILER_NOISE))
            if kept:
                with contextlib.suppress(Exception):
                    sys.stderr.write(kept)
                    sys.stderr.flush()


_LIVE_PEAK_LOCK = threading.Lock()  # one profiler session at a time (fd 2 is redirected during it)


def _allocation_peak(events: list[tuple[int, int, int]]) -> int:
    """Peak running sum of the CPU blocks allocated during the session: each allocation adds its size;
    a free subtracts it only if that block was allocated in this session (frees of older blocks, which
    c10 may report with their size from an earlier session, are ignored)."""
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size in events:
        if size > 0:
            current += size - live.get(ptr, 0)  # an address reused without a recorded free: replace it
            live[ptr] = size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


def cpu_live_peak(fn: Callable[[], object]) -> int | None:
    """Peak bytes of CPU tensor memory allocated while ``fn()`` runs and not yet freed, from
    ``torch.profiler``'s allocation records (``profile_memory=True``): blocks of PyTorch's CPU allocator
    allocated on the calling thread (autograd's CPU backward and ``at::launch`` tasks included). Memory
    taken outside that allocator (MKL packing, oneDNN's own buffers) or by other Python threads is not
    seen; kernels, and so the figure, can change with the thread count.

    ``None`` (the caller falls back) when the profiler cannot run: inside another profiler session
    (nesting would end it; a scheduled profiler still in its warm-up is not detected), while another
    thread measures, or if the profiler or its analysis fails. The profiler's own stderr lines are
    dropped; anything else written to stderr during ``fn`` is written out after it returns (and lost
    if the process dies meanwhile)."""
    from torch.profiler import ProfilerActivity, profile

    from litv2.accel import _internals
    if _internals.profiler_active() or not _LIVE_PEAK_LOCK.acquire(blocking=False):
        return None
    try:
        with _without_profiler_noise():
            try:
                prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                prof.__enter__()
            except Exception:  # noqa: BLE001 - profiler unavailable: caller falls back
                return None
            try:
                fn()
            finally:
                prof.__exit__(None, None, None)
        try:
            events = _internals.cpu_allocation_events(prof)
        except Exception:  # noqa: BLE001 - private analysis API moved or failed: caller falls back
            return None
        return None if events is None else _allocation_peak(events)
    finally:
        _LIVE_PEAK_LOCK.release()


def peak_memory(fn: Callable[[], object], device="cpu", above_current: bool = False) -> int:
    """Peak memory (bytes) while ``fn()`` runs.

    GPU: ``torch.cuda.max_memory_allocated``, i.e. everything on the device (weights included), or with
    ``above_current`` only what ``fn`` adds above what was allocated when it started.
    CPU: what ``fn`` adds, always: the peak of live tensor bytes allocated during ``fn``
    (:func:`cpu_live_peak`), or, if the profiler cannot run, the peak growth of resident memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device) if above_current else 0
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    live = cpu_live_peak(fn)
    if live is not None:
        return live
    from litv2.accel.malloc import trim

    trim()
    with _PeakRSS() as sampler:
        fn()
    return int(sampler.growth)


def efficiency_report(model: nn.Module, img_size=224, device="cpu", batch_size: int = 64, runs: int = 30,
                      warmup: int = 10, amp_dtype: torch.dtype | None = None, in_chans: int = 3,
                      memory: bool = True, channels_last: bool = False) -> dict:
    """Everything Table 1 reports except accuracy: params (M), GFLOPs, img/s, train/test memory (MB).

    The model is moved to ``device`` (in place, as ``nn.Module.to`` does) before anything is measured.
    """
    device = torch.device(device)
    model.to(device)
    h, w = _img_hw(img_size)
    params = count_params(model)
    report = {
        "params": params,
        "params_m": round(params / 1e6, 3),
        "gflops": round(count_flops(model, (h, w), in_chans) / 1e9, 4),
        "img_size": [h, w],
        "batch_size": batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "fp32",
        "throughput": round(measure_throughput(model, batch_size, (h, w), device, runs, warmup, amp_dtype,
                                               in_chans, channels_last), 2),
    }
    if memory:
        report["train_mem_mb"] = round(measure_memory(model, batch_size, (h, w), device, True, amp_dtype,
                                                      in_chans, channels_last) / 2 ** 20, 1)
        report["test_mem_mb"] = round(measure_memory(model, batch_size, (h, w), device, False, amp_dtype,
                                                     in_chans, channels_last) / 2 ** 20, 1)
    return report
