"""The Triton kernels as ``torch.library`` ops (namespace ``litv2``): eager, ``torch.compile`` and CUDA graphs call
the same kernels; ``register_fake`` lets the compiler trace them without running them, ``register_autograd`` gives
them their backward ops.

* ``litv2::add_layer_norm(x, r, weight, bias, eps, out_dtype) -> (y, z, mean, rstd)``: ``y = x + r``,
  ``z = LayerNorm(y)`` written in ``out_dtype``, fp32 statistics; backward ``litv2::add_layer_norm_backward``.
* ``litv2::dwconv3x3_gelu(x, weight, bias) -> GELU(conv3x3(x) + bias)`` on a ``(B, H, W, C)`` map, exact GELU;
  it keeps only its input for the backward pass, ``litv2::dwconv3x3_gelu_backward`` recomputes the conv from it.

Each launch is described by one ``*_launch`` function (kernel, grid, arguments, block sizes and ``num_warps``):
the op runs it, and :mod:`.aot` compiles the same for Hopper in the tests. Each launch counts in
``litv2.accel.stats``.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..flags import taken
from . import NO_INTERPRETER, TritonUnavailable, kernels

Tensor = torch.Tensor
# TRITON_INTERPRET=1 when triton was imported (its own jit functions interpreted too: set later, it breaks them)
INTERPRETED = isinstance(kernels.dwconv3x3, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)
TILE = 4096  # elements of a program's (rows x channels) tile: larger ones spill on sm_90 (the aot check)
LN_MAX_C = 8192  # add_layer_norm keeps a row in registers; wider rows take the plain ops


def check_device(device: torch.device) -> None:
    """Raise :class:`TritonUnavailable` (one line) unless the kernels can run on ``device``."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    raise TritonUnavailable(NO_INTERPRETER if device.type == "cpu" else
                            f"litv2.accel: kernels='triton' runs on CUDA devices (or on CPU under TRITON_INTERPRET=1), "
                            f"not on {device.type}")


def _on(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _programs(device: torch.device, tiles: int, per_program_blocks: int = 1) -> int:
    """Programs for a kernel that loops over ``tiles`` and writes per-program partial sums: four per SM on a GPU
    (shared among ``per_program_blocks`` channel blocks), two under the interpreter (it runs them one by one)."""
    if device.type == "cuda":
        cap = max(1, 4 * torch.cuda.get_device_properties(device).multi_processor_count // per_program_blocks)
    else:
        cap = 2
    return max(1, min(tiles, cap))


# ---- residual add + LayerNorm -----------------------------------------------------------------------------------

def ln_blocks(C: int) -> dict:
    """Block sizes and warps of both add_layer_norm kernels for ``C`` channels: whole rows, TILE elements."""
    block_c = triton.next_power_of_2(C)
    return dict(BLOCK_M=max(1, TILE // block_c), BLOCK_C=block_c, num_warps=8)


def add_layer_norm_fwd_launch(x, r, weight, bias, y, z, mean, rstd, eps: float):
    C = x.shape[-1]
    M = x.numel() // C
    blocks = ln_blocks(C)
    return (kernels.add_layer_norm_fwd, (triton.cdiv(M, blocks["BLOCK_M"]),),
            (x, r, weight, bias, y, z, mean, rstd, M, C, eps), blocks)


def add_layer_norm_bwd_launch(dy, dz, y, weight, mean, rstd, dx, part_w, part_b):
    C = y.shape[-1]
    M = y.numel() // C
    blocks = ln_blocks(C)
    return (kernels.add_layer_norm_bwd, (part_w.shape[0],),
            (dy if dy is not None else dz, dz, y, weight, mean, rstd, dx, part_w, part_b, M, C),
            dict(blocks, HAS_DY=dy is not None))


@torch.library.custom_op("litv2::add_layer_norm", mutates_args=())
def add_layer_norm(x: Tensor, r: Tensor, weight: Tensor, bias: Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``y = x + r`` (in their promoted dtype), ``z = LayerNorm(y) * weight + bias`` in ``out_dtype``, and the
    fp32 mean and 1/std of each row of ``y``; the last dimension is normalised."""
    check_device(x.device)
    x, r = x.contiguous(), r.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    z = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel():
        kernel, grid, args, kw = add_layer_norm_fwd_launch(x, r, weight.contiguous(), bias.contiguous(), y, z, mean,
                                                           rstd, eps)
        with _on(x):
            kernel[grid](*args, **kw)
        taken("triton_add_layer_norm")
    return y, z, mean, rstd


@add_layer_norm.register_fake
def _(x, r, weight, bias, eps, out_dtype):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, r.dtype))
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return y, x.new_empty(x.shape, dtype=out_dtype), mean, torch.empty_like(mean)


@torch.library.custom_op("litv2::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward(dy: Tensor | None, dz: Tensor, y: Tensor, weight: Tensor, mean: Tensor,
                            rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient of ``y = x + r`` (in y's dtype) given those of ``y`` (None: none) and ``z``; the fp32
    gradients of the LayerNorm's weight and bias."""
    check_device(y.device)
    dx, part_w, part_b, tiles = ln_grad_buffers(y)
    if tiles:
        kernel, grid, args, kw = add_layer_norm_bwd_launch(None if dy is None else dy.contiguous(), dz.contiguous(),
                                                           y, weight.contiguous(), mean, rstd, dx, part_w, part_b)
        with _on(y):
            kernel[grid](*args, **kw)
        taken("triton_add_layer_norm_backward")
    return dx, part_w.sum(0), part_b.sum(0)


@add_layer_norm_backward.register_fake
def _(dy, dz, y, weight, mean, rstd):
    return ln_grad_fake(y)


def ln_grad_buffers(y: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """A LayerNorm backward over the rows of ``y``: ``dx`` (y's dtype), the per-program fp32 partial sums of the
    weight and bias gradients, and the number of row tiles (0: nothing to launch)."""
    C = y.shape[-1]
    tiles = triton.cdiv(y.numel() // C, ln_blocks(C)["BLOCK_M"]) if y.numel() else 0
    part_w = torch.zeros(_programs(y.device, tiles), C, dtype=torch.float32, device=y.device)
    return torch.empty(y.shape, dtype=y.dtype, device=y.device), part_w, torch.zeros_like(part_w), tiles


def ln_grad_fake(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fake outputs of a LayerNorm backward op: dx and the fp32 weight and bias gradients."""
    C = y.shape[-1]
    return y.new_empty(y.shape), y.new_empty(C, dtype=torch.float32), y.new_empty(C, dtype=torch.float32)


def _add_layer_norm_setup(ctx, inputs, output):
    x, r, weight, bias = inputs[:4]
    y, _, mean, rstd = output
    ctx.save_for_backward(y, weight, mean, rstd)
    ctx.dtypes = x.dtype, r.dtype, weight.dtype, bias.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused y or z: no gradient to read


def _add_layer_norm_grad(ctx, dy, dz, _dmean, _drstd):
    y, weight, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    if dz is None:  # z unused: y's gradient passes through (backward runs only if one of them has a gradient)
        return dy.to(x_dtype), dy.to(r_dtype), None, None, None, None
    d, dw, db = torch.ops.litv2.add_layer_norm_backward(dy, dz, y, weight, mean, rstd)
    return d.to(x_dtype), d.to(r_dtype), dw.to(w_dtype), db.to(b_dtype), None, None


add_layer_norm.register_autograd(_add_layer_norm_grad, setup_context=_add_layer_norm_setup)


# ---- 3x3 depthwise conv + bias + GELU -------------------------------------------------------------------------------

def dwconv_blocks(C: int) -> dict:
    """Block sizes and warps of the depthwise-conv kernels for ``C`` channels: 64 channels (fewer if C is
    smaller) by TILE / 2 / that many positions, eight per thread (the nine taps of a tile are loaded together)."""
    block_c = min(64, triton.next_power_of_2(C))
    return dict(BLOCK_P=TILE // 2 // block_c, BLOCK_C=block_c, num_warps=8)


def dwconv3x3_launch(x, weight9, bias, out, gelu: bool, flip: bool):
    B, H, W, C = x.shape
    blocks = dwconv_blocks(C)
    grid = (triton.cdiv(B * H * W, blocks["BLOCK_P"]), triton.cdiv(C, blocks["BLOCK_C"]))
    return (kernels.dwconv3x3, grid, (x, weight9, weight9 if bias is None else bias, out, B * H * W, H, W, C),
            dict(blocks, HAS_BIAS=bias is not None, GELU=gelu, FLIP=flip))


def dwconv3x3_gelu_bwd_launch(dg, x, weight9, bias, dy, part_w, part_b):
    B, H, W, C = x.shape
    blocks = dwconv_blocks(C)
    return (kernels.dwconv3x3_gelu_bwd, (part_w.shape[0], triton.cdiv(C, blocks["BLOCK_C"])),
            (dg, x, weight9, weight9 if bias is None else bias, dy, part_w, part_b, B * H * W, H, W, C),
            dict(blocks, HAS_BIAS=bias is not None))


def _weight9(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], 9).contiguous()


@torch.library.custom_op("litv2::dwconv3x3_gelu", mutates_args=())
def dwconv3x3_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``GELU(conv3x3(x) + bias)`` (exact GELU, zero padding, one 3x3 filter per channel) on a channels-last
    ``(B, H, W, C)`` map ``x``; ``weight`` is the depthwise conv's ``(C, 1, 3, 3)``. Returns x's dtype."""
    check_device(x.device)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        kernel, grid, args, kw = dwconv3x3_launch(x, _weight9(weight), bias, out, gelu=True, flip=False)
        with _on(x):
            kernel[grid](*args, **kw)
        taken("triton_dwconv_gelu")
    return out


@dwconv3x3_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("litv2::dwconv3x3_gelu_backward", mutates_args=())
def dwconv3x3_gelu_backward(dg: Tensor, x: Tensor, weight: Tensor,
                            bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`dwconv3x3_gelu` for its input (x's dtype), its ``(C, 9)`` weight and its bias (fp32)
    from the input alone: one kernel recomputes the conv and writes its output's gradient, a second runs the
    transposed conv on that."""
    check_device(x.device)
    B, H, W, C = x.shape
    x, w9 = x.contiguous(), _weight9(weight)
    blocks = dwconv_blocks(C)
    tiles = triton.cdiv(B * H * W, blocks["BLOCK_P"]) if x.numel() else 0
    programs = _programs(x.device, tiles, triton.cdiv(C, blocks["BLOCK_C"]))
    part_w = torch.zeros(programs, 9, C, dtype=torch.float32, device=x.device)
    part_b = torch.zeros(programs, C, dtype=torch.float32, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tiles:
        dy = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # the conv output's gradient, freed on return
        with _on(x):
            kernel, grid, args, kw = dwconv3x3_gelu_bwd_launch(dg.contiguous(), x, w9, bias, dy, part_w, part_b)
            kernel[grid](*args, **kw)
            kernel, grid, args, kw = dwconv3x3_launch(dy, w9, None, dx, gelu=False, flip=True)
            kernel[grid](*args, **kw)
        taken("triton_dwconv_gelu_backward")
    return dx, part_w.sum(0).t().contiguous(), part_b.sum(0)


@dwconv3x3_gelu_backward.register_fake
def _(dg, x, weight, bias):
    C = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(C, 9, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


def _dwconv_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)  # not the output, not the conv's: the backward recomputes them


def _dwconv_grad(ctx, dg):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.litv2.dwconv3x3_gelu_backward(dg, x, weight, bias)
    return dx, dw.reshape(weight.shape).to(weight.dtype), None if bias is None else db.to(bias.dtype)


dwconv3x3_gelu.register_autograd(_dwconv_grad, setup_context=_dwconv_setup)
