"""The deformable conv of DTM as bilinear resampling + a plain strided conv: the same sums as
``torchvision.ops.deform_conv2d``, on vectorised, multi-threaded kernels with their own backward.

A deformable conv is a plain convolution of the bilinearly resampled input: sample every tap's point (zeros
outside the map, as torchvision), laid out as ``kh x kw`` patches, then convolve with the same weights at stride
``(kh, kw)``. torchvision's CPU op samples its columns, and scatters their gradients, with scalar code on one
thread. Two samplers: ``F.embedding_bag`` over the channels-last map's pixel rows (eager CPU) and
``F.grid_sample`` (under ``torch.compile`` on any device, where inductor fuses it); ``scripts/benchmark_dtm.py``
times both against torchvision's op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from .flags import Flags, taken
from .onednn import eager_cpu, inference_conv, no_grad_needed


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
    torchvision's CPU op samples columns and scatters gradients with scalar code on one thread. See
    :func:`resample_and_conv` for the sampling kernels.
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
    the strided conv can follow autocast, where torchvision's op is an opaque fp32 im2col + GEMM. Eager GPUs keep
    torchvision's op, which is faster there than the unfused sampling ops (docs/performance.md)."""
    if not Flags.dtm_resample or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    return eager_cpu(x) or torch.compiler.is_compiling()


def resample_and_conv(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: int, padding: int, module: nn.Module | None = None,
                      sampler: str | None = None) -> torch.Tensor:
    """The resampled deformable conv itself, on any device (no fast-path checks; see above).

    ``sampler`` picks the bilinear sampling kernel; ``None`` = the model's choice. Eager on CPU that is
    ``"embedding_bag"`` (:func:`_bilinear_patches`: channels-last in and out, torchvision's bilinear
    arithmetic; ``Flags.dtm_embedding_bag = False`` turns it off, for the ablation). Under
    ``torch.compile`` and on other devices it is ``"grid_sample"`` (:func:`_sampling_grid`), which inductor
    fuses. Either runs on any device. When gradients are needed, ``grid_sample``'s input is zero-padded
    to power-of-two sides first: then an integer sampling position (every position while the offsets
    are still zero, as at initialisation) goes through ``grid_sample``'s normalised coordinates exactly,
    and the offset gradient there is the same one-sided difference torchvision takes. Without padding a
    position may come back one float step below the integer, which changes a value by float rounding
    only but the slope to the left neighbour.

    The accelerated DTM takes it on CPU (and compiled).
    """
    kh, kw = weight.shape[-2:]
    if sampler is None:
        cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        sampler = "embedding_bag" if cpu and Flags.dtm_embedding_bag else "grid_sample"
    if sampler == "embedding_bag":
        sampled = _bilinear_patches(x, offset, kh, kw, stride, padding)
    elif sampler == "grid_sample":
        H, W = x.shape[-2:]
        size_h, size_w = H, W
        if not no_grad_needed(x, offset, weight, bias):
            size_h, size_w = 1 << (H - 1).bit_length(), 1 << (W - 1).bit_length()
            x = F.pad(x, (0, size_w - W, 0, size_h - H))
        grid = _sampling_grid(offset, kh, kw, stride, padding, size_h, size_w)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        raise ValueError(f"sampler must be 'embedding_bag', 'grid_sample' or None, got {sampler!r}")
    if not torch.compiler.is_compiling():
        taken(f"dtm_{sampler}")
    out = None if module is None else inference_conv(sampled, module, weight, bias, [0, 0], 1, stride=[kh, kw])
    if out is None:  # a channels-last weight makes oneDNN write a channels-last output, as the blocks want
        out = F.conv2d(sampled, weight.contiguous(memory_format=torch.channels_last), bias, stride=(kh, kw))
    return out
