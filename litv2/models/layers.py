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
  gradients, with scalar code on one thread. The same deformable conv is computed as a bilinear
  resampling (every tap's sampling point, laid out as ``kh x kw`` patches; on CPU an ``F.embedding_bag``
  over the channels-last map's pixel rows, elsewhere ``F.grid_sample``) followed by a plain conv at
  stride ``kh x kw``: vectorised, multi-threaded kernels for forward and backward.

``cpu_fast_paths(False)`` switches all of them off (plain ``F.linear`` / conv then ``F.gelu`` /
torchvision's ``deform_conv2d``), e.g. to compare. Eager GPUs, tracing (fvcore) and ``torch.export`` / ONNX
export take the plain path, so an exported graph is the model itself, not this machine's formulation.
``torch.compile`` on CPU traces the 1x1-conv linears and the resampled DTM (plain aten ops, which
inductor sends to oneDNN and fuses on its own); the batch chunks, cached blocked weights and fused oneDNN
calls stay eager-only (inductor's ``freezing`` does its own weight packing). ``torch.compile`` on any
other device traces the resampled DTM too (see :func:`resampled_dtm_ok`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torchvision.ops import deform_conv2d

__all__ = ["Linear", "cpu_fast_paths", "deform_conv2d_resampled", "dwconv_gelu", "inference_chunk",
           "recompute_when_saved", "resample_and_conv", "resampled_dtm_ok", "saved_tensor_hooks_active"]


class _Flags:
    cpu_fast_paths = True  # the master switch
    # the single paths, for ablations (scripts/ablate_cpu_paths.py); all need the master switch
    onednn = True  # linear as 1x1 conv, fused dwconv+GELU
    packed_weights = True
    dtm_resample = True
    dtm_embedding_bag = True  # eager CPU DTM samples by embedding_bag; False: grid_sample, as compiled / on GPUs
    chunk_bytes = 16 << 20  # 0: no batch chunks


def cpu_fast_paths(enabled: bool | None = None) -> bool:
    """Get (or set) whether LITv2 layers take the CPU fast paths described above."""
    if enabled is not None:
        _Flags.cpu_fast_paths = bool(enabled)
    return _Flags.cpu_fast_paths


def _fast_ok(x: torch.Tensor) -> bool:
    return (_Flags.cpu_fast_paths and x.device.type == "cpu" and not torch.jit.is_tracing()
            and not torch.compiler.is_exporting())


def _no_grad_needed(*tensors: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def inference_chunk(x: torch.Tensor, widest_channels: int) -> int:
    """Samples per chunk for running per-sample layers over ``x`` (B, H, W, C) at CPU inference.

    Returns ``B`` (no chunking) unless the CPU fast paths apply and no gradient is needed; otherwise the
    largest chunk whose widest activation (``H * W * widest_channels`` per sample) fits in
    ``_Flags.chunk_bytes``, at least one sample.
    """
    B = x.shape[0]
    if (B < 2 or not _Flags.chunk_bytes or not _fast_ok(x) or not _no_grad_needed(x)
            or torch.compiler.is_compiling()):
        return B
    per_sample = x.shape[1] * x.shape[2] * widest_channels * x.element_size()
    return max(1, min(B, _Flags.chunk_bytes // max(per_sample, 1)))


_fused_conv = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
_reorder_weight = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)
# module -> (weight key, weak reference to the weight's storage, packed copy)
_packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inference_conv(x: torch.Tensor, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: list[int], groups: int, attr: str = "none",
                    stride: list[int] = (1, 1)) -> torch.Tensor | None:
    """``attr(conv(x))`` with a cached oneDNN-blocked copy of ``weight``, or ``None``.

    Only for fp32 CPU inference: no autograd, no autocast. The blocked copy is made once per module
    and made again when the weight changes: an optimizer step or ``load_state_dict`` bumps the
    tensor's version; a weight computed on every call (a parametrization such as weight norm or a LoRA
    delta) or swapped in with ``param.data = ...`` lives in another storage. The key names the storage
    object; the entry holds a weak reference to it, which keeps that address from being given to a new
    storage after the old one is freed (a data pointer alone can be reused). Writes through ``.data``
    (``param.data.copy_(...)``) bump no version and go unseen. A plain oneDNN conv reorders the weight
    on every call instead.
    """
    if (_fused_conv is None or _reorder_weight is None or not _Flags.onednn or not _fast_ok(x)
            or torch.compiler.is_compiling() or x.dtype != torch.float32
            or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or not _no_grad_needed(x, weight, bias)):
        return None
    try:
        if not _Flags.packed_weights:
            return _fused_conv(x, weight, bias, padding, stride, [1, 1], groups, attr, [], "none")
        storage = weight.untyped_storage()
        key = (storage._cdata, weight.data_ptr(), weight._version)
        entry = _packed_weights.get(module)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                packed = _reorder_weight(weight.detach().to_mkldnn(), padding, stride, [1, 1], groups,
                                         list(x.shape))
            entry = _packed_weights[module] = (key, StorageWeakRef(storage), packed)
        return _fused_conv(x, entry[2], bias, padding, stride, [1, 1], groups, attr, [], "none")
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


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are already in place (activation checkpointing, CPU offloading) or switched
    off (``torch.func`` transforms, ``disable_saved_tensors_hooks``): then what autograd keeps is not ours to
    decide, and :class:`recompute_when_saved` stands aside."""
    autograd = torch._C._autograd
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    if enabled is not None and not enabled():
        return True
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class recompute_when_saved(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, autograd keeps no copy of ``target`` (or a view of it) for the backward pass:
    it keeps ``remake`` and calls it when the backward pass needs the tensor.

    For a cheap element-wise result whose input is kept anyway, e.g. ``GELU(y)`` feeding a linear layer
    (GELU's own backward keeps ``y``): the linear layer's saved input then costs one GELU in backward
    instead of a whole activation map of memory. ``remake()`` must return the tensor exactly as it was
    (same values, dtype and strides), which a deterministic element-wise op on the same input does. Other saved
    tensors (weights, other inputs) are kept as usual.
    """

    def __init__(self, target: torch.Tensor, remake):
        # the hooks must not hold ``target`` itself: autograd keeps them as long as the saved tensors
        storage, dtype = target.untyped_storage().data_ptr(), target.dtype
        layout = (target.shape, target.stride(), target.storage_offset(), dtype)

        def pack(t: torch.Tensor):
            # plain tensors only: subclasses (DTensor, float8 weights, ...) may have no storage to compare,
            # and a storage without data (meta device) is never matched
            if (storage and type(t) is torch.Tensor and t.dtype == dtype
                    and t.untyped_storage().data_ptr() == storage):
                return _Remake(remake, layout, (t.shape, t.stride(), t.storage_offset()))
            return t

        super().__init__(pack, lambda packed: packed() if isinstance(packed, _Remake) else packed)


class _Remake:
    def __init__(self, remake, layout, view):
        self.remake, self.layout, self.view = remake, layout, view

    def __call__(self) -> torch.Tensor:
        full = self.remake()
        if (full.shape, full.stride(), full.storage_offset(), full.dtype) != self.layout:
            raise RuntimeError(f"recompute_when_saved: remade tensor has layout "
                               f"{full.shape, full.stride(), full.dtype}, the saved one had "
                               f"{self.layout[:2] + self.layout[3:]}")
        return full.as_strided(*self.view)


def _sampling_grid(offset: torch.Tensor, kh: int, kw: int, stride: int, padding: int, size_h: int,
                   size_w: int) -> torch.Tensor:
    """The deformable conv's bilinear sampling positions as a ``grid_sample`` grid (align_corners=False).

    Output position ``(i, j)``, kernel tap ``(a, b)`` samples at row ``i * stride - padding + a + dy`` and
    column ``j * stride - padding + b + dx`` (torchvision's convention, offsets ``(dy, dx)`` per tap); the
    grid puts that point at ``(i * kh + a, j * kw + b)``, so the sampled map tiles into ``kh x kw`` patches.
    """
    B, _, Ho, Wo = offset.shape
    off = offset.view(B, kh, kw, 2, Ho, Wo)
    arange = lambda n: torch.arange(n, dtype=offset.dtype, device=offset.device)  # noqa: E731
    rows = (arange(Ho) * stride - padding).view(Ho, 1, 1, 1) + arange(kh).view(1, kh, 1, 1)
    cols = (arange(Wo) * stride - padding).view(1, 1, Wo, 1) + arange(kw).view(1, 1, 1, kw)
    y = off[:, :, :, 0].permute(0, 3, 1, 4, 2) + rows  # (B, Ho, kh, Wo, kw), the same float sum as torchvision
    x = off[:, :, :, 1].permute(0, 3, 1, 4, 2) + cols
    grid = torch.stack(((x * 2 + 1) / size_w - 1, (y * 2 + 1) / size_h - 1), -1)  # pixel p -> (2p + 1) / size - 1
    return grid.view(B, Ho * kh, Wo * kw, 2)


def _bilinear_patches(x: torch.Tensor, offset: torch.Tensor, kh: int, kw: int, stride: int,
                      padding: int) -> torch.Tensor:
    """Every tap's bilinear sample as a channels-last ``(B, C, Ho * kh, Wo * kw)`` map, by ``F.embedding_bag``.

    A bilinear sample is a weighted sum of four pixels, i.e. a bag of four rows of the ``(B * H * W, C)``
    table that a channels-last map already is, with per-sample weights. ``embedding_bag`` gathers whole
    channel rows in one vectorised pass and writes the result channels-last, the layout the strided conv
    after it wants (``grid_sample`` writes NCHW and reads one channel at a time, and its output then
    needs a layout copy). Positions and weights follow torchvision's ``bilinear_interpolate``: row
    ``floor(y)`` and ``floor(y) + 1`` with weights ``1 - ly`` and ``ly`` (``ly = y - floor(y)``), a corner
    off the map contributes zero (its weight is masked), so the offset gradient at an integer position is
    torchvision's one-sided difference. Autograd gives the gradients: to ``x`` through the table, to the
    offsets through the per-sample weights.
    """
    B, C, H, W = x.shape
    Ho, Wo = offset.shape[-2:]
    table = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # free for a channels-last x
    off = offset.view(B, kh, kw, 2, Ho, Wo)
    arange = lambda n: torch.arange(n, dtype=offset.dtype, device=offset.device)  # noqa: E731
    rows = (arange(Ho) * stride - padding).view(Ho, 1, 1, 1) + arange(kh).view(1, kh, 1, 1)
    cols = (arange(Wo) * stride - padding).view(1, 1, Wo, 1) + arange(kw).view(1, 1, 1, kw)
    y = off[:, :, :, 0].permute(0, 3, 1, 4, 2) + rows  # (B, Ho, kh, Wo, kw): output row i * kh + a, column j * kw + b
    x_ = off[:, :, :, 1].permute(0, 3, 1, 4, 2) + cols
    y0, x0 = y.floor(), x_.floor()
    ly, lx = y - y0, x_ - x0
    ys, xs = torch.stack((y0, y0 + 1), -1), torch.stack((x0, x0 + 1), -1)  # the two rows / columns
    wy = torch.stack((1 - ly, ly), -1) * ((ys >= 0) & (ys <= H - 1))  # zero weight off the map
    wx = torch.stack((1 - lx, lx), -1) * ((xs >= 0) & (xs <= W - 1))
    index_dtype = torch.int32 if B * H * W < 2 ** 31 else torch.int64
    base = torch.arange(B, dtype=index_dtype, device=x.device).view(B, 1, 1, 1, 1, 1) * (H * W)
    rows_i = base + ys.clamp(0, H - 1).to(index_dtype) * W
    index = (rows_i.unsqueeze(-1) + xs.clamp(0, W - 1).to(index_dtype).unsqueeze(-2)).view(-1, 4)
    weights = (wy.unsqueeze(-1) * wx.unsqueeze(-2)).view(-1, 4)
    sampled = F.embedding_bag(index, table, mode="sum", per_sample_weights=weights.to(table.dtype))
    return sampled.view(B, Ho * kh, Wo * kw, C).permute(0, 3, 1, 2)


def deform_conv2d_resampled(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: int, padding: int, module: nn.Module | None = None) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (one offset group, no mask, dilation 1); on CPU as resample + conv.

    A deformable conv is a plain convolution of the bilinearly resampled input: sample every tap's point
    (zeros outside the map, as torchvision), laid out as ``kh x kw`` patches, then convolve with the same
    weights at stride ``(kh, kw)``. Both are vectorised, multi-threaded kernels with their own backward;
    torchvision's CPU op samples columns and scatters gradients with scalar code on one thread. On
    LITv2-S's DTM shapes at batch 16 this was 2-4x faster forward and 3-5x faster forward + backward
    than even torchvision's op run per channel group on two threads (see the README's Performance
    section). See :func:`resample_and_conv` for the sampling kernels.
    With ``module`` (the owner of ``weight``) the strided conv takes the cached blocked weight at inference.
    """
    kh, kw = weight.shape[-2:]
    if (not resampled_dtm_ok(x) or x.dim() != 4 or offset.shape[1] != 2 * kh * kw
            or weight.shape[1] != x.shape[1]):
        return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding)
    return resample_and_conv(x, offset, weight, bias, stride, padding, module)


def resampled_dtm_ok(x: torch.Tensor) -> bool:
    """Whether the DTM runs as resample + conv: with the CPU fast paths, and under ``torch.compile`` on any
    device (not when exporting). Inductor fuses the sampling grid and ``grid_sample`` into a few kernels and
    the strided conv can follow autocast, where torchvision's op is an opaque fp32 im2col + GEMM: on an H100,
    compiled LITv2-S at bf16 batch 64 ran 6569 -> 8606 img/s with it. Eager CUDA keeps torchvision's op
    (the unfused sampling ops were the slower there: 5144 -> 3499 img/s)."""
    if not _Flags.dtm_resample or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    return _fast_ok(x) or torch.compiler.is_compiling()


def resample_and_conv(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: int, padding: int, module: nn.Module | None = None,
                      sampler: str | None = None) -> torch.Tensor:
    """The resampled deformable conv itself, on any device (no fast-path checks; see above).

    ``sampler`` picks the bilinear sampling kernel; ``None`` = the model's choice. Eager on CPU that is
    ``"embedding_bag"`` (:func:`_bilinear_patches`: channels-last in and out, torchvision's bilinear
    arithmetic; ``_Flags.dtm_embedding_bag = False`` turns it off, for the ablation). Under
    ``torch.compile`` and on other devices it is ``"grid_sample"`` (:func:`_sampling_grid`), which inductor
    fuses. Either runs on any device. When gradients are needed, ``grid_sample``'s input is zero-padded
    to power-of-two sides first: then an integer sampling position (every position while the offsets
    are still zero, as at initialisation) goes through ``grid_sample``'s normalised coordinates exactly,
    and the offset gradient there is the same one-sided difference torchvision takes. Without padding a
    position may come back one float step below the integer, which changes a value by float rounding
    only but the slope to the left neighbour.

    The model takes it on CPU (and compiled); ``scripts/benchmark_dtm.py`` times both samplers against
    torchvision's op on CPU and CUDA.
    """
    kh, kw = weight.shape[-2:]
    if sampler is None:
        eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        sampler = "embedding_bag" if eager_cpu and _Flags.dtm_embedding_bag else "grid_sample"
    if sampler == "embedding_bag":
        sampled = _bilinear_patches(x, offset, kh, kw, stride, padding)
    elif sampler == "grid_sample":
        H, W = x.shape[-2:]
        size_h, size_w = H, W
        if not _no_grad_needed(x, offset, weight, bias):
            size_h, size_w = 1 << (H - 1).bit_length(), 1 << (W - 1).bit_length()
            x = F.pad(x, (0, size_w - W, 0, size_h - H))
        grid = _sampling_grid(offset, kh, kw, stride, padding, size_h, size_w)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        raise ValueError(f"sampler must be 'embedding_bag', 'grid_sample' or None, got {sampler!r}")
    out = None if module is None else _inference_conv(sampled, module, weight, bias, [0, 0], 1, stride=[kh, kw])
    if out is None:  # a channels-last weight makes oneDNN write a channels-last output, as the blocks want
        out = F.conv2d(sampled, weight.contiguous(memory_format=torch.channels_last), bias, stride=(kh, kw))
    return out
