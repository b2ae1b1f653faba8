"""The deformable conv of DTM (2x2, stride 2, no padding) as a Triton bilinear gather + one GEMM.

``litv2::dtm_gather(x, offset, out_dtype)`` samples every tap of every output position of the channels-last
``(B, H, W, C)`` map ``x`` at its deformed point and writes them as a ``(B, Ho, Wo, 4C)`` map, tap-major (column
``k * C + c``, tap ``k = 2a + b``): ``F.linear`` of that with the conv weight permuted to ``(C', 2, 2, C)`` and
flattened is the deformable conv. ``offset`` is the offset conv's output channels-last, ``(B, Ho, Wo, 8)``, fp32:
``(dy, dx)`` per tap, torchvision's layout. Tap ``(a, b)`` of output ``(i, j)`` samples row ``2i + a + dy``, column
``2j + b + dx``, in fp32, with torchvision's ``bilinear_interpolate`` arithmetic: corners ``floor`` and
``floor + 1``, a corner off the map reads zero (so a point at or beyond one pixel outside is zero).

Backward, ``litv2::dtm_gather_backward``: the input gradient scatters the bilinear weights times the columns'
gradient with fp32 atomics (summed in an fp32 map, then cast to x's dtype; nondeterministic on a GPU, so it
alerts under ``torch.use_deterministic_algorithms``, where :class:`~.modules.TritonDTM` takes the plain path), and
the offset gradient is the derivative of the masked bilinear weights along each coordinate (torchvision's
``get_coordinate_weight``: the one-sided difference at an integer position), summed over the channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._prims_common import alert_not_deterministic

from ..flags import taken
from .ops import _on, check_device

Tensor = torch.Tensor


# ---- kernels -------------------------------------------------------------------------------------------------------

@triton.jit
def _corners(Off, q64, q_ok, i, j, H, W, k: tl.constexpr):
    """Tap k's sampling point of the output positions: ``(ly, lx)``, the four corners' pixel indices (row of the
    batch's map, clamped onto it) and whether each is on the map."""
    dy = tl.load(Off + q64 * 8 + 2 * k, mask=q_ok, other=0.0)
    dx = tl.load(Off + q64 * 8 + 2 * k + 1, mask=q_ok, other=0.0)
    y = (2 * i + k // 2).to(tl.float32) + dy
    x = (2 * j + k % 2).to(tl.float32) + dx
    y0 = tl.floor(y)
    x0 = tl.floor(x)
    ly = y - y0
    lx = x - x0
    oky0 = q_ok & (y0 >= 0) & (y0 <= H - 1)
    oky1 = q_ok & (y0 + 1 >= 0) & (y0 + 1 <= H - 1)
    okx0 = (x0 >= 0) & (x0 <= W - 1)
    okx1 = (x0 + 1 >= 0) & (x0 + 1 <= W - 1)
    r0 = tl.where(oky0, y0, 0.0).to(tl.int64) * W
    r1 = tl.where(oky1, y0 + 1, 0.0).to(tl.int64) * W
    c0 = tl.where(okx0, x0, 0.0).to(tl.int64)
    c1 = tl.where(okx1, x0 + 1, 0.0).to(tl.int64)
    return ly, lx, r0 + c0, r0 + c1, r1 + c0, r1 + c1, oky0 & okx0, oky0 & okx1, oky1 & okx0, oky1 & okx1


@triton.jit
def dtm_gather_fwd(X, Off, Cols, N, H, W, Ho, Wo, C,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Cols[q, k * C + c]``: tap k's bilinear sample of channel c for output position q of ``N = B*Ho*Wo``.
    One program: BLOCK_P positions x BLOCK_C channels, the four taps."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok = q < N
    col_ok = cols < C
    i = (q // Wo) % Ho
    j = q % Wo
    q64 = q.to(tl.int64)
    base = (q // (Ho * Wo)).to(tl.int64) * H * W
    for k in tl.static_range(4):
        ly, lx, p00, p01, p10, p11, m00, m01, m10, m11 = _corners(Off, q64, q_ok, i, j, H, W, k)
        hy = 1.0 - ly
        hx = 1.0 - lx
        v00 = tl.load(X + (base + p00)[:, None] * C + cols[None, :], mask=m00[:, None] & col_ok[None, :], other=0.0)
        v01 = tl.load(X + (base + p01)[:, None] * C + cols[None, :], mask=m01[:, None] & col_ok[None, :], other=0.0)
        v10 = tl.load(X + (base + p10)[:, None] * C + cols[None, :], mask=m10[:, None] & col_ok[None, :], other=0.0)
        v11 = tl.load(X + (base + p11)[:, None] * C + cols[None, :], mask=m11[:, None] & col_ok[None, :], other=0.0)
        val = ((hy * hx)[:, None] * v00.to(tl.float32) + (hy * lx)[:, None] * v01.to(tl.float32)
               + (ly * hx)[:, None] * v10.to(tl.float32) + (ly * lx)[:, None] * v11.to(tl.float32))
        tl.store(Cols + q64[:, None] * (4 * C) + k * C + cols[None, :], val.to(Cols.dtype.element_ty),
                 mask=q_ok[:, None] & col_ok[None, :])


@triton.jit
def dtm_gather_bwd(DCols, X, Off, DX, DOff, N, H, W, Ho, Wo, C,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Given the columns' gradient: adds each tap's bilinear weights times it into the fp32 map DX (atomics) and
    stores the offsets' gradient in DOff ``(N, 8)``, summed over the channels. One program: BLOCK_P positions,
    every channel (BLOCK_C at a time), the four taps."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < N
    i = (q // Wo) % Ho
    j = q % Wo
    q64 = q.to(tl.int64)
    base = (q // (Ho * Wo)).to(tl.int64) * H * W
    for k in tl.static_range(4):
        ly, lx, p00, p01, p10, p11, m00, m01, m10, m11 = _corners(Off, q64, q_ok, i, j, H, W, k)
        hy = 1.0 - ly
        hx = 1.0 - lx
        gy = tl.zeros([BLOCK_P], dtype=tl.float32)
        gx = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            d = tl.load(DCols + q64[:, None] * (4 * C) + k * C + cols[None, :], mask=q_ok[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            a00 = (base + p00)[:, None] * C + cols[None, :]
            a01 = (base + p01)[:, None] * C + cols[None, :]
            a10 = (base + p10)[:, None] * C + cols[None, :]
            a11 = (base + p11)[:, None] * C + cols[None, :]
            k00 = m00[:, None] & col_ok[None, :]
            k01 = m01[:, None] & col_ok[None, :]
            k10 = m10[:, None] & col_ok[None, :]
            k11 = m11[:, None] & col_ok[None, :]
            v00 = tl.load(X + a00, mask=k00, other=0.0).to(tl.float32)
            v01 = tl.load(X + a01, mask=k01, other=0.0).to(tl.float32)
            v10 = tl.load(X + a10, mask=k10, other=0.0).to(tl.float32)
            v11 = tl.load(X + a11, mask=k11, other=0.0).to(tl.float32)
            gy += tl.sum(d * (lx[:, None] * (v11 - v01) + hx[:, None] * (v10 - v00)), axis=1)
            gx += tl.sum(d * (ly[:, None] * (v11 - v10) + hy[:, None] * (v01 - v00)), axis=1)
            tl.atomic_add(DX + a00, d * (hy * hx)[:, None], mask=k00, sem="relaxed")
            tl.atomic_add(DX + a01, d * (hy * lx)[:, None], mask=k01, sem="relaxed")
            tl.atomic_add(DX + a10, d * (ly * hx)[:, None], mask=k10, sem="relaxed")
            tl.atomic_add(DX + a11, d * (ly * lx)[:, None], mask=k11, sem="relaxed")
        tl.store(DOff + q64 * 8 + 2 * k, gy, mask=q_ok)
        tl.store(DOff + q64 * 8 + 2 * k + 1, gx, mask=q_ok)


# ---- launches --------------------------------------------------------------------------------------------------------

def gather_blocks(C: int) -> dict:
    """Block sizes and warps of the gather: 64 channels (fewer if C is smaller) by 64 positions, 16 elements of a
    tile per thread."""
    return dict(BLOCK_P=64, BLOCK_C=min(64, triton.next_power_of_2(C)), num_warps=8)


def gather_bwd_blocks(C: int) -> dict:
    """Block sizes and warps of the gather's backward: 32 positions, 32 channels at a time (fewer if C is smaller),
    four elements of a tile per thread (it holds five tiles: the gradient and the four corners)."""
    return dict(BLOCK_P=32, BLOCK_C=min(32, triton.next_power_of_2(C)), num_warps=8)


def dtm_gather_fwd_launch(x, offset, cols):
    B, H, W, C = x.shape
    Ho, Wo = offset.shape[1:3]
    N = B * Ho * Wo
    blocks = gather_blocks(C)
    grid = (triton.cdiv(N, blocks["BLOCK_P"]), triton.cdiv(C, blocks["BLOCK_C"]))
    return dtm_gather_fwd, grid, (x, offset, cols, N, H, W, Ho, Wo, C), blocks


def dtm_gather_bwd_launch(dcols, x, offset, dx, doffset):
    B, H, W, C = x.shape
    Ho, Wo = offset.shape[1:3]
    N = B * Ho * Wo
    blocks = gather_bwd_blocks(C)
    return (dtm_gather_bwd, (triton.cdiv(N, blocks["BLOCK_P"]),),
            (dcols, x, offset, dx, doffset, N, H, W, Ho, Wo, C), blocks)


# ---- ops -----------------------------------------------------------------------------------------------------------

def _check(x: Tensor, offset: Tensor) -> None:
    torch._check(x.dim() == 4 and offset.dim() == 4 and offset.shape[-1] == 8 and offset.shape[0] == x.shape[0],
                 lambda: f"litv2::dtm_gather: x (B, H, W, C) and offset (B, Ho, Wo, 8), got {tuple(x.shape)} and "
                         f"{tuple(offset.shape)}")


@torch.library.custom_op("litv2::dtm_gather", mutates_args=())
def dtm_gather(x: Tensor, offset: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The bilinear samples of the 2x2/2 deformable conv's taps of the ``(B, H, W, C)`` map ``x`` at ``offset``
    ``(B, Ho, Wo, 8)`` (fp32), as a ``(B, Ho, Wo, 4C)`` map in ``out_dtype``, tap-major."""
    check_device(x.device)
    _check(x, offset)
    x, offset = x.contiguous(), offset.float().contiguous()
    B, _, _, C = x.shape
    cols = torch.empty(B, *offset.shape[1:3], 4 * C, dtype=out_dtype, device=x.device)
    if cols.numel():
        kernel, grid, args, kw = dtm_gather_fwd_launch(x, offset, cols)
        with _on(x):
            kernel[grid](*args, **kw)
        taken("triton_dtm_gather")
    return cols


@dtm_gather.register_fake
def _(x, offset, out_dtype):
    _check(x, offset)
    return x.new_empty(x.shape[0], *offset.shape[1:3], 4 * x.shape[-1], dtype=out_dtype)


@torch.library.custom_op("litv2::dtm_gather_backward", mutates_args=())
def dtm_gather_backward(dcols: Tensor, x: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`dtm_gather` for ``x`` (x's dtype) and ``offset`` (fp32)."""
    check_device(x.device)
    if x.device.type == "cuda":
        alert_not_deterministic("litv2::dtm_gather_backward (fp32 atomics)")
    x, offset = x.contiguous(), offset.float().contiguous()
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    doffset = torch.zeros(offset.shape, dtype=torch.float32, device=x.device)
    if dcols.numel():
        kernel, grid, args, kw = dtm_gather_bwd_launch(dcols.contiguous(), x, offset, dx, doffset)
        with _on(x):
            kernel[grid](*args, **kw)
        taken("triton_dtm_gather_backward")
    return dx.to(x.dtype), doffset


@dtm_gather_backward.register_fake
def _(dcols, x, offset):
    return x.new_empty(x.shape), offset.new_empty(offset.shape, dtype=torch.float32)


def _gather_setup(ctx, inputs, output):
    x, offset, _ = inputs
    ctx.save_for_backward(x, offset)
    ctx.offset_dtype = offset.dtype


def _gather_grad(ctx, dcols):
    x, offset = ctx.saved_tensors
    dx, doffset = torch.ops.litv2.dtm_gather_backward(dcols, x, offset)
    return dx, doffset.to(ctx.offset_dtype), None


dtm_gather.register_autograd(_gather_grad, setup_context=_gather_setup)


# ---- the reference -------------------------------------------------------------------------------------------------

def reference_gather(x: Tensor, offset: Tensor) -> Tensor:
    """What ``litv2::dtm_gather`` computes, in plain torch (fp32; autograd gives the gradients): the resampled
    patches of :mod:`litv2.accel.dtm` (torchvision's bilinear arithmetic) rearranged tap-major."""
    from ..dtm import _bilinear_patches

    B, H, W, C = x.shape
    Ho, Wo = offset.shape[1:3]
    patches = _bilinear_patches(x.float().permute(0, 3, 1, 2), offset.float().permute(0, 3, 1, 2), 2, 2, 2, 0)
    return patches.reshape(B, C, Ho, 2, Wo, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, Ho, Wo, 4 * C)
