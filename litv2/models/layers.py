"""Layers shared by HiLo and LITv2, and the CPU fast paths they take.

LITv2 keeps activations channels-last, ``(B, H, W, C)``. On CPU some of its operations then have
faster kernels than the default ones, computing the same sums (differences are float rounding):

* a linear layer over ``C`` is exactly a 1x1 convolution of the ``permute(0, 3, 1, 2)`` view, which
  PyTorch recognises as channels-last and runs with oneDNN without copying (output channels-last too,
  so permuting back is free). Where the BLAS behind ``addmm`` is slow (MKL's generic path on AMD EPYC,
  this project's CI machine) this is up to 2x faster for LITv2's shapes; elsewhere it is on par;
* ConvFFN's depthwise 3x3 conv + exact GELU run as one oneDNN convolution with a GELU post-op at
  inference (no autograd graph needed), saving a full pass over the widest activations;
* at fp32 inference both take their weights in oneDNN's blocked layout, reordered once and cached
  per module (a plain oneDNN conv reorders them on every call; that costs most at batch 1);
* torchvision's CPU ``deform_conv2d`` (DTM) samples its bilinear columns, and scatters their
  gradients, on one thread. The input channels are split into ``torch.get_num_threads()`` groups,
  each group's deformable conv (and in training its torchvision backward) runs on its own thread
  (the ops release the GIL) and the partial outputs are summed: with one offset group every input
  channel is sampled at the same positions, so the sum is the same convolution.

``cpu_fast_paths(False)`` switches all of them off (plain ``F.linear`` / conv then ``F.gelu`` /
one ``deform_conv2d`` call), e.g. to compare. GPUs, tracing (fvcore, ONNX) and ``torch.compile``
(which fuses on its own) take the plain path.
"""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = ["Linear", "cpu_fast_paths", "deform_conv2d_split", "dwconv_gelu", "inference_chunk"]


class _Flags:
    cpu_fast_paths = True  # the master switch
    # the single paths, for ablations (scripts/ablate_cpu_paths.py); all need the master switch
    onednn = True  # linear as 1x1 conv, fused dwconv+GELU
    packed_weights = True
    dtm_split = True
    chunk_bytes = 16 << 20  # 0: no batch chunks


def cpu_fast_paths(enabled: bool | None = None) -> bool:
    """Get (or set) whether LITv2 layers take the CPU fast paths described above."""
    if enabled is not None:
        _Flags.cpu_fast_paths = bool(enabled)
    return _Flags.cpu_fast_paths


def _fast_ok(x: torch.Tensor) -> bool:
    return (_Flags.cpu_fast_paths and x.device.type == "cpu" and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def _no_grad_needed(*tensors: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def inference_chunk(x: torch.Tensor, widest_channels: int) -> int:
    """Samples per chunk for running per-sample layers over ``x`` (B, H, W, C) at CPU inference.

    Returns ``B`` (no chunking) unless the CPU fast paths apply and no gradient is needed; otherwise the
    largest chunk whose widest activation (``H * W * widest_channels`` per sample) fits in
    ``_Flags.chunk_bytes``, at least one sample.
    """
    B = x.shape[0]
    if B < 2 or not _Flags.chunk_bytes or not _fast_ok(x) or not _no_grad_needed(x):
        return B
    per_sample = x.shape[1] * x.shape[2] * widest_channels * x.element_size()
    return max(1, min(B, _Flags.chunk_bytes // max(per_sample, 1)))


_fused_conv = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
_reorder_weight = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)
_packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight key, packed)


def _inference_conv(x: torch.Tensor, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: list[int], groups: int, attr: str = "none") -> torch.Tensor | None:
    """``attr(conv(x))`` (stride 1) with a cached oneDNN-blocked copy of ``weight``, or ``None``.

    Only for fp32 CPU inference: no autograd, no autocast. The blocked copy is made once per module
    and made again when the weight changes (an optimizer step or ``load_state_dict`` bumps the
    tensor's version); a plain oneDNN conv reorders the weight on every call instead.
    """
    if (_fused_conv is None or _reorder_weight is None or not _Flags.onednn or not _fast_ok(x)
            or x.dtype != torch.float32
            or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or not _no_grad_needed(x, weight, bias)):
        return None
    try:
        if not _Flags.packed_weights:
            return _fused_conv(x, weight, bias, padding, [1, 1], [1, 1], groups, attr, [], "none")
        key = (weight.data_ptr(), weight._version)
        entry = _packed_weights.get(module)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                packed = _reorder_weight(weight.detach().to_mkldnn(), padding, [1, 1], [1, 1], groups,
                                         list(x.shape))
            entry = _packed_weights[module] = (key, packed)
        return _fused_conv(x, entry[1], bias, padding, [1, 1], [1, 1], groups, attr, [], "none")
    except RuntimeError:  # a layout or build the oneDNN op does not take: caller's plain path
        return None


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that runs as a oneDNN 1x1 conv on CPU maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and _Flags.onednn and _fast_ok(x):
            x = x.permute(0, 3, 1, 2)
            w = self.weight.view(self.out_features, self.in_features, 1, 1)
            out = _inference_conv(x, self, w, self.bias, [0, 0], 1)
            return (F.conv2d(x, w, self.bias) if out is None else out).permute(0, 2, 3, 1)
        return F.linear(x, self.weight, self.bias)


def dwconv_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``GELU(conv(x))`` for an NCHW (channels-last) ``x``; one oneDNN kernel when no gradient is needed."""
    out = None
    if conv.stride == (1, 1) and conv.dilation == (1, 1):
        out = _inference_conv(x, conv, conv.weight, conv.bias, list(conv.padding), conv.groups, "gelu")
    return F.gelu(conv(x)) if out is None else out


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_in_child() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="litv2-dtm")
        return _pool


def _in_threads(fn, x: torch.Tensor, n: int) -> list:
    """``[fn(a, b) for each of n input-channel ranges (a, b) of x]``, one range per pool thread."""
    bounds = [x.shape[1] * i // n for i in range(n + 1)]

    def run(a: int, b: int):
        with torch.no_grad():  # grad mode is thread-local: a worker thread starts with it on
            return fn(a, b)

    pool = _thread_pool(n)
    futures = [pool.submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return [f.result() for f in futures]


def _split_forward(x, offset, weight, bias, stride: int, padding: int, n: int) -> torch.Tensor:
    parts = _in_threads(lambda a, b: deform_conv2d(x[:, a:b], offset, weight[:, a:b], None, stride=stride,
                                                   padding=padding), x, n)
    out = parts[0]
    for part in parts[1:]:
        out.add_(part)
    return out if bias is None else out.add_(bias.view(-1, 1, 1))


class _ChannelSplitDeformConv2d(torch.autograd.Function):
    """Forward and backward of the channel-split deformable conv, each channel group on its own thread.

    The backward is torchvision's own ``_deform_conv2d_backward`` per group: input and weight
    gradients are the groups' slices, the offset gradient is the sum of the groups' contributions
    (every channel is sampled at the same offsets) and the bias gradient is the output gradient's sum.
    """

    @staticmethod
    def forward(ctx, x, offset, weight, bias, stride: int, padding: int, n: int):
        ctx.save_for_backward(x, offset, weight)
        ctx.stride, ctx.padding, ctx.n, ctx.has_bias = stride, padding, n, bias is not None
        return _split_forward(x, offset, weight, bias, stride, padding, n)

    @staticmethod
    def backward(ctx, grad):
        x, offset, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        grad = grad.contiguous()
        no_mask, zero_bias = x.new_zeros((x.shape[0], 1)), x.new_zeros(weight.shape[0])
        backward = torch.ops.torchvision._deform_conv2d_backward
        parts = _in_threads(lambda a, b: backward(grad, x[:, a:b], weight[:, a:b], offset, no_mask, zero_bias,
                                                  s, s, p, p, 1, 1, 1, 1, False), x, ctx.n)
        grad_x = torch.cat([r[0] for r in parts], 1) if ctx.needs_input_grad[0] else None
        grad_weight = torch.cat([r[1] for r in parts], 1) if ctx.needs_input_grad[2] else None
        grad_offset = None
        if ctx.needs_input_grad[1]:
            grad_offset = parts[0][2]
            for r in parts[1:]:
                grad_offset = grad_offset + r[2]
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_offset, grad_weight, grad_bias, None, None, None


def deform_conv2d_split(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        stride: int, padding: int) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (one offset group); on CPU one thread per input-channel group.

    Forward and, in training, backward are split (see :class:`_ChannelSplitDeformConv2d`).
    """
    n = min(torch.get_num_threads(), x.shape[1])
    if n < 2 or not _Flags.dtm_split or not _fast_ok(x) or offset.shape[1] != 2 * weight.shape[2] * weight.shape[3]:
        return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding)
    if _no_grad_needed(x, offset, weight, bias):
        return _split_forward(x, offset, weight, bias, stride, padding, n)
    return _ChannelSplitDeformConv2d.apply(x, offset, weight, bias, stride, padding, n)
