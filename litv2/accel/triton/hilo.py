"""HiLo attention as ``torch.library`` ops (kernels in :mod:`.hilo_kernels`), in the style of :mod:`.ops`.

* ``litv2::hilo_attention(p, kv, bias, hifi_heads, lofi_heads, head_dim, window, scale) -> (out, lse)``: Hi-Fi
  window attention and Lo-Fi attention against the pooled keys in one op, reading q/k/v from the projections'
  outputs where they lie: ``p`` is ``[h_qkv; l_q]`` applied to the ``(B, H, W, C)`` input (one GEMM), ``kv``
  ``l_kv`` applied to its ``window x window`` average-pooled map (zero padding counted; the map itself for
  window 1), ``bias`` ``h_qkv``'s bias (the padding's keys and values; None: zeros). ``out`` is the
  ``(B, H, W, Dh + Dl)`` map ``[Hi-Fi, Lo-Fi]`` before the output projections, ``lse`` the fp32 logsumexp per
  position and head. Backward ``litv2::hilo_attention_backward`` recomputes the probabilities from ``lse``.
* ``litv2::add_layer_norm_pool(x, r, weight, bias, eps, out_dtype, window) -> (y, z, pooled, mean, rstd)``:
  ``litv2::add_layer_norm`` that also writes ``z``'s ``window x window`` average pool (bottom/right zero padding
  counted), Lo-Fi's key/value input; backward ``litv2::add_layer_norm_pool_backward``.
"""
from __future__ import annotations

import torch
import triton

from ..flags import taken
from . import hilo_kernels as kernels
from .ops import INTERPRETED, TILE, _on, check_device, ln_blocks, ln_grad_buffers, ln_grad_fake

Tensor = torch.Tensor


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot takes K >= 16


def _dims(p: Tensor, hifi_heads: int, lofi_heads: int, head_dim: int, window: int):
    B, H, W, Cp = p.shape
    Hg, Wg = -(-H // window), -(-W // window)
    return B, H, W, Cp, Hg, Wg, hifi_heads * head_dim, lofi_heads * head_dim


# ---- launches ------------------------------------------------------------------------------------------------------

def hifi_blocks(head_dim: int) -> dict:
    """64 (window, token) rows of one head per program."""
    return dict(BLOCK_R=64, BLOCK_D=_head_block(head_dim), num_warps=8)


def lofi_blocks(head_dim: int, keys: int, dtype: torch.dtype, backward: bool = False,
                tf32: bool | None = None) -> dict:
    """64 queries by up to 64 keys per step forward, 32 (fp32: 16) by up to 32 backward (at least 16: tl.dot). DOT_F32
    under the interpreter for bf16 (it multiplies bf16 operands as integers). TF32: fp32 products in TF32, as torch's
    fp32 matmuls where ``torch.backends.cuda.matmul.allow_tf32`` (``tf32``: None reads it) allows them, on a GPU."""
    block = 32 if backward else 64
    if tf32 is None:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    blocks = dict(BLOCK_Q=block, BLOCK_K=min(block, max(16, triton.next_power_of_2(keys))),
                  BLOCK_D=_head_block(head_dim), DOT_F32=INTERPRETED and dtype == torch.bfloat16,
                  TF32=bool(tf32) and dtype == torch.float32 and not INTERPRETED, num_warps=8)
    if backward and dtype == torch.float32:  # fp32 operands: 16 queries a step, 4 warps (no spills on sm_90)
        blocks.update(BLOCK_Q=16, num_warps=4)
    return blocks


def _hifi_args(p, bias, hifi_heads, lofi_heads, head_dim, window):
    B, H, W, Cp, Hg, Wg, Dh, Dl = _dims(p, hifi_heads, lofi_heads, head_dim, window)
    R = B * Hg * Wg * window * window
    blocks = hifi_blocks(head_dim)
    grid = (triton.cdiv(R, blocks["BLOCK_R"]), hifi_heads)
    return grid, (R, H, W, Hg, Wg, Cp, Dh + Dl, Dh, head_dim, hifi_heads + lofi_heads), dict(
        blocks, S=window, HAS_BIAS=bias is not None)


def hifi_fwd_launch(p, bias, out, lse, hifi_heads, lofi_heads, head_dim, window, scale):
    grid, dims, kw = _hifi_args(p, bias, hifi_heads, lofi_heads, head_dim, window)
    return kernels.hifi_fwd, grid, (p, p if bias is None else bias, out, lse, *dims, scale), kw


def hifi_bwd_launch(p, bias, out, dout, lse, dp, part_b, hifi_heads, lofi_heads, head_dim, window, scale):
    grid, dims, kw = _hifi_args(p, bias, hifi_heads, lofi_heads, head_dim, window)
    return (kernels.hifi_bwd, grid, (p, p if bias is None else bias, out, dout, lse, dp, part_b, *dims, scale), kw)


def _lofi_args(p, kv, hifi_heads, lofi_heads, head_dim, window, backward=False, tf32=None):
    B, H, W, Cp, Hg, Wg, Dh, Dl = _dims(p, hifi_heads, lofi_heads, head_dim, window)
    M = kv.numel() // kv.shape[-1] // B
    return B, H * W, M, (H * W, M, Cp, 2 * Dl, Dh + Dl, 3 * Dh, Dh, Dl, head_dim, hifi_heads + lofi_heads,
                         hifi_heads, lofi_heads), lofi_blocks(head_dim, M, p.dtype, backward, tf32)


def lofi_fwd_launch(p, kv, out, lse, hifi_heads, lofi_heads, head_dim, window, scale, tf32=None):
    B, N, M, dims, blocks = _lofi_args(p, kv, hifi_heads, lofi_heads, head_dim, window, tf32=tf32)
    return (kernels.lofi_fwd, (triton.cdiv(N, blocks["BLOCK_Q"]), B * lofi_heads), (p, kv, out, lse, *dims, scale),
            blocks)


def lofi_bwd_dkdv_launch(p, kv, out, dout, lse, dkv, hifi_heads, lofi_heads, head_dim, window, scale, tf32=None):
    B, N, M, dims, blocks = _lofi_args(p, kv, hifi_heads, lofi_heads, head_dim, window, True, tf32)
    return (kernels.lofi_bwd_dkdv, (triton.cdiv(M, blocks["BLOCK_K"]), B * lofi_heads),
            (p, kv, out, dout, lse, dkv, *dims, scale), blocks)


def lofi_bwd_dq_launch(p, kv, out, dout, lse, dp, hifi_heads, lofi_heads, head_dim, window, scale, tf32=None):
    B, N, M, dims, blocks = _lofi_args(p, kv, hifi_heads, lofi_heads, head_dim, window, True, tf32)
    return (kernels.lofi_bwd_dq, (triton.cdiv(N, blocks["BLOCK_Q"]), B * lofi_heads),
            (p, kv, out, dout, lse, dp, *dims, scale), blocks)


# ---- litv2::hilo_attention -------------------------------------------------------------------------------------------

def _check(p, kv, hifi_heads, lofi_heads, head_dim, window):
    Dh, Dl = hifi_heads * head_dim, lofi_heads * head_dim
    if p.dim() != 4 or p.shape[-1] != 3 * Dh + Dl or (window == 1 and hifi_heads):
        raise ValueError(f"litv2::hilo_attention: p of shape {tuple(p.shape)} is not (B, H, W, 3*{Dh} + {Dl})"
                         f"{' (window 1 has no Hi-Fi heads)' if window == 1 and hifi_heads else ''}")
    if lofi_heads:
        B, H, W = p.shape[:3]
        want = (B, -(-H // window), -(-W // window), 2 * Dl)
        if kv is None or tuple(kv.shape) != want:
            raise ValueError(f"litv2::hilo_attention: kv of shape {None if kv is None else tuple(kv.shape)}, "
                             f"not {want}")


@torch.library.custom_op("litv2::hilo_attention", mutates_args=())
def hilo_attention(p: Tensor, kv: Tensor | None, bias: Tensor | None, hifi_heads: int, lofi_heads: int,
                   head_dim: int, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """HiLo's attention (see the module docstring): ``(out, lse)``, ``out`` in p's dtype."""
    check_device(p.device)
    _check(p, kv, hifi_heads, lofi_heads, head_dim, window)
    p = p.contiguous()
    B, H, W, _ = p.shape
    out = torch.empty(B, H, W, (hifi_heads + lofi_heads) * head_dim, dtype=p.dtype, device=p.device)
    lse = torch.empty(B, H, W, hifi_heads + lofi_heads, dtype=torch.float32, device=p.device)
    if p.numel():
        args = (hifi_heads, lofi_heads, head_dim, window, scale)
        with _on(p):
            if hifi_heads:
                kernel, grid, a, kw = hifi_fwd_launch(p, bias, out, lse, *args)
                kernel[grid](*a, **kw)
            if lofi_heads:
                kernel, grid, a, kw = lofi_fwd_launch(p, kv.to(p.dtype).contiguous(), out, lse, *args)
                kernel[grid](*a, **kw)
        taken("triton_hilo_attention")
    return out, lse


@hilo_attention.register_fake
def _(p, kv, bias, hifi_heads, lofi_heads, head_dim, window, scale):
    B, H, W, _ = p.shape
    heads = hifi_heads + lofi_heads
    return p.new_empty(B, H, W, heads * head_dim), p.new_empty(B, H, W, heads, dtype=torch.float32)


@torch.library.custom_op("litv2::hilo_attention_backward", mutates_args=())
def hilo_attention_backward(dout: Tensor, p: Tensor, kv: Tensor | None, bias: Tensor | None, out: Tensor,
                            lse: Tensor, hifi_heads: int, lofi_heads: int, head_dim: int, window: int,
                            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``p`` (p's dtype), ``kv`` (kv's dtype; empty without Lo-Fi heads) and ``bias`` (fp32,
    ``3 * Dh``: the padding's keys and values; zeros without padding) given ``out``'s."""
    check_device(p.device)
    p, dout = p.contiguous(), dout.contiguous().to(p.dtype)
    Dh = hifi_heads * head_dim
    dp = torch.empty_like(p)
    kv_dtype = p.dtype if kv is None else kv.dtype
    dkv = torch.empty(0 if kv is None else kv.shape, dtype=p.dtype, device=p.device)
    dbias = torch.zeros(3 * Dh, dtype=torch.float32, device=p.device)
    if p.numel():
        args = (hifi_heads, lofi_heads, head_dim, window, scale)
        with _on(p):
            if hifi_heads:
                grid = hifi_fwd_launch(p, bias, out, lse, *args)[1]
                part_b = torch.zeros(grid[0], 2 * Dh, dtype=torch.float32, device=p.device)
                kernel, grid, a, kw = hifi_bwd_launch(p, bias, out, dout, lse, dp, part_b, *args)
                kernel[grid](*a, **kw)
                dbias[Dh:] = part_b.sum(0)
            if lofi_heads:
                kv = kv.to(p.dtype).contiguous()
                kernel, grid, a, kw = lofi_bwd_dkdv_launch(p, kv, out, dout, lse, dkv, *args)
                kernel[grid](*a, **kw)
                kernel, grid, a, kw = lofi_bwd_dq_launch(p, kv, out, dout, lse, dp, *args)
                kernel[grid](*a, **kw)
        taken("triton_hilo_attention_backward")
    return dp, dkv.to(kv_dtype), dbias


@hilo_attention_backward.register_fake
def _(dout, p, kv, bias, out, lse, hifi_heads, lofi_heads, head_dim, window, scale):
    dkv = p.new_empty(0) if kv is None else kv.new_empty(kv.shape)
    return p.new_empty(p.shape), dkv, p.new_empty(3 * hifi_heads * head_dim, dtype=torch.float32)


def _hilo_setup(ctx, inputs, output):
    p, kv, bias = inputs[:3]
    ctx.save_for_backward(p, kv, bias, *output)
    ctx.args = inputs[3:]
    ctx.mark_non_differentiable(output[1])


def _hilo_grad(ctx, dout, _dlse):
    p, kv, bias, out, lse = ctx.saved_tensors
    dp, dkv, dbias = torch.ops.litv2.hilo_attention_backward(dout, p, kv, bias, out, lse, *ctx.args)
    return (dp, None if kv is None else dkv, None if bias is None else dbias.to(bias.dtype),
            None, None, None, None, None)


hilo_attention.register_autograd(_hilo_grad, setup_context=_hilo_setup)


# ---- litv2::add_layer_norm_pool --------------------------------------------------------------------------------------

def ln_pool_blocks(C: int, window: int) -> dict:
    """add_layer_norm's tile (TILE elements of whole rows), as whole windows of ``next_power_of_2(window²)`` rows."""
    block_c, s2p = triton.next_power_of_2(C), triton.next_power_of_2(window * window)
    return dict(BLOCK_G=max(1, TILE // block_c // s2p), BLOCK_C=block_c, S=window, S2P=s2p, num_warps=8)


def add_layer_norm_pool_fwd_launch(x, r, weight, bias, y, z, pooled, mean, rstd, eps: float, window: int):
    B, H, W, C = x.shape
    Hg, Wg = pooled.shape[1:3]
    blocks = ln_pool_blocks(C, window)
    G = B * Hg * Wg
    return (kernels.add_layer_norm_pool_fwd, (triton.cdiv(G, blocks["BLOCK_G"]),),
            (x, r, weight, bias, y, z, pooled, mean, rstd, G, H, W, Hg, Wg, C, eps), blocks)


def add_layer_norm_pool_bwd_launch(dy, dz, dpool, y, weight, mean, rstd, dx, part_w, part_b, window: int):
    B, H, W, C = y.shape
    Hg, Wg = dpool.shape[1:3]
    return (kernels.add_layer_norm_pool_bwd, (part_w.shape[0],),
            (dy if dy is not None else dz, dz, dpool, y, weight, mean, rstd, dx, part_w, part_b, B * H * W, C, H, W,
             Hg, Wg), dict(ln_blocks(C), S=window, HAS_DY=dy is not None))


@torch.library.custom_op("litv2::add_layer_norm_pool", mutates_args=())
def add_layer_norm_pool(x: Tensor, r: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype,
                        window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``litv2::add_layer_norm`` on a ``(B, H, W, C)`` map, and ``z``'s ``window x window`` average pool
    ``(B, ceil(H / window), ceil(W / window), C)`` in ``out_dtype`` (the bottom/right zero padding counted)."""
    check_device(x.device)
    x, r = x.contiguous(), r.contiguous()
    B, H, W, C = x.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    z = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    pooled = torch.empty(B, -(-H // window), -(-W // window), C, dtype=out_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel():
        kernel, grid, args, kw = add_layer_norm_pool_fwd_launch(x, r, weight.contiguous(), bias.contiguous(), y, z,
                                                                pooled, mean, rstd, eps, window)
        with _on(x):
            kernel[grid](*args, **kw)
        taken("triton_add_layer_norm_pool")
    return y, z, pooled, mean, rstd


@add_layer_norm_pool.register_fake
def _(x, r, weight, bias, eps, out_dtype, window):
    B, H, W, C = x.shape
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, r.dtype)), x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(B, -(-H // window), -(-W // window), C, dtype=out_dtype), mean, torch.empty_like(mean))


@torch.library.custom_op("litv2::add_layer_norm_pool_backward", mutates_args=())
def add_layer_norm_pool_backward(dy: Tensor | None, dz: Tensor | None, dpool: Tensor, y: Tensor, weight: Tensor,
                                 mean: Tensor, rstd: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """``litv2::add_layer_norm_backward`` with the pool's gradient added to z's (None: only the pool's)."""
    check_device(y.device)
    dx, part_w, part_b, tiles = ln_grad_buffers(y)
    if tiles:
        dz = torch.zeros(y.shape, dtype=dpool.dtype, device=y.device) if dz is None else dz.contiguous()
        kernel, grid, args, kw = add_layer_norm_pool_bwd_launch(
            None if dy is None else dy.contiguous(), dz, dpool.contiguous(), y, weight.contiguous(), mean, rstd, dx,
            part_w, part_b, window)
        with _on(y):
            kernel[grid](*args, **kw)
        taken("triton_add_layer_norm_pool_backward")
    return dx, part_w.sum(0), part_b.sum(0)


@add_layer_norm_pool_backward.register_fake
def _(dy, dz, dpool, y, weight, mean, rstd, window):
    return ln_grad_fake(y)


def _pool_setup(ctx, inputs, output):
    x, r, weight, bias = inputs[:4]
    y, _, _, mean, rstd = output
    ctx.save_for_backward(y, weight, mean, rstd)
    ctx.dtypes = x.dtype, r.dtype, weight.dtype, bias.dtype
    ctx.window = inputs[6]
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _pool_grad(ctx, dy, dz, dpool, _dmean, _drstd):
    y, weight, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    if dpool is None:
        if dz is None:
            return dy.to(x_dtype), dy.to(r_dtype), None, None, None, None, None
        d, dw, db = torch.ops.litv2.add_layer_norm_backward(dy, dz, y, weight, mean, rstd)
    else:
        d, dw, db = torch.ops.litv2.add_layer_norm_pool_backward(dy, dz, dpool, y, weight, mean, rstd, ctx.window)
    return d.to(x_dtype), d.to(r_dtype), dw.to(w_dtype), db.to(b_dtype), None, None, None


add_layer_norm_pool.register_autograd(_pool_grad, setup_context=_pool_setup)
