"""The modules ``accelerate(model, kernels="triton")`` swaps in: subclasses of the plain ones with only ``forward``
replaced, calling the ops of :mod:`.ops`.

* :class:`TritonConvFFN`: the depthwise conv + bias + GELU as ``litv2::dwconv3x3_gelu``.
* :class:`TritonBlock` / :class:`TritonStage`: each residual add and the LayerNorm after it as one
  ``litv2::add_layer_norm``: within a block (attention residual -> ``norm2``) and across blocks (the FFN residual ->
  the next block's first LayerNorm). A stage's last add stays a plain add.
* :class:`TritonDeformConv2d` / :class:`TritonDTM`: the deformable conv as ``litv2::dtm_gather`` + one GEMM
  (:mod:`.dtm`); in eval mode the DTM's BatchNorm is folded into the GEMM.
* :class:`TritonHiLo`: one GEMM for ``h_qkv`` and ``l_q``, then ``litv2::hilo_attention``; before it, when Lo-Fi
  pools, ``litv2::add_layer_norm_pool`` also writes the pooled map.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from litv2.models.hilo import HiLo, pad_to_multiple
from litv2.models.litv2 import Block, ConvFFN, DeformableTokenMerging, DeformConv2d, Stage

from .. import _internals
from ..flags import taken
from ..modules import _PLAIN, FastConvFFN, FastDeformConv2d
from ..recompute import recompute_when_saved
from . import import_ops

ops = import_ops()
from . import dtm  # noqa: E402, F401  (registers litv2::dtm_gather and its backward)
from . import hilo as hilo_ops  # noqa: E402  (registers the HiLo ops)


def check_model(model: nn.Module) -> None:
    """Raise :class:`~litv2.accel.triton.TritonUnavailable` (one line) if a parameter or buffer of ``model`` is on a
    device the kernels cannot run on."""
    for device in {t.device for t in (*model.parameters(), *model.buffers())}:
        ops.check_device(device)


def _fusable_norm(norm: nn.Module, x: torch.Tensor, r: torch.Tensor) -> bool:
    return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1 and norm.weight is not None
            and norm.bias is not None and not _internals.module_forward_hooks(norm) and x.shape == r.shape
            and x.shape[-1] <= ops.LN_MAX_C)


def add_norm(x: torch.Tensor, r: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + r, norm(x + r))`` (``r`` None: ``(x, norm(x))``), as one ``litv2::add_layer_norm`` for a plain
    LayerNorm. Under autocast the normalised map is written in the autocast dtype, which its consumers (linear
    layers) cast it to anyway: the LayerNorm reads and writes the low-precision maps, with fp32 statistics."""
    if r is None:
        return x, norm(x)
    if not _fusable_norm(norm, x, r):
        x = x + r
        return x, norm(x)
    y, z, _, _ = torch.ops.litv2.add_layer_norm(x, r, norm.weight, norm.bias, norm.eps, _out_dtype(x, r))
    return y, z


def _out_dtype(x: torch.Tensor, r: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return (torch.get_autocast_dtype(device) if torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device) else torch.promote_types(x.dtype, r.dtype))


class TritonConvFFN(FastConvFFN):
    """fc1 -> ``litv2::dwconv3x3_gelu`` -> fc2. The op keeps only its input (fc1's output, which the plain conv keeps
    too) for the backward pass, which recomputes the conv: the conv output is never kept. With ``recompute_gelu``
    fc2's input (the GELU output) is not kept either; the backward pass runs the op again to remake it. Under the
    conditions where :class:`~litv2.accel.modules.FastConvFFN` stands its recomputes aside, the GELU output is kept.
    A non-exact GELU or a hooked or non-3x3 conv takes FastConvFFN's path. ``recompute_dwconv`` has no further
    effect here."""

    def _fusable(self) -> bool:
        conv = self.dwconv.dwconv
        return (self._exact_gelu() and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
                and conv.groups == conv.in_channels == conv.out_channels
                and not _internals.module_forward_hooks(conv) and not _internals.module_forward_hooks(self.act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable():
            return super().forward(x)
        h = self.fc1(x)
        weight, bias = self.dwconv.dwconv.weight, self.dwconv.dwconv.bias
        g = torch.ops.litv2.dwconv3x3_gelu(h, weight, bias)
        if not (self.recompute_gelu and self._recomputes(h)):
            return self.drop(self.fc2(self.drop(g)))
        taken("recompute_gelu")

        def remake_g():
            with torch.no_grad():
                return torch.ops.litv2.dwconv3x3_gelu(h, weight, bias)

        with recompute_when_saved(g, remake_g):
            return self.drop(self.fc2(self.drop(g)))


class TritonBlock(Block):
    """The block with its attention residual add and ``norm2`` as one ``litv2::add_layer_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, r = self.forward_residual(x, None)
        return x + r

    def forward_residual(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x + r`` (``r``: the previous block's FFN branch, not yet added; None: none), returning
        ``(stream, branch)``, whose sum is the block's output: the caller fuses that add with the next LayerNorm."""
        if self.attn is not None:
            x, z, pooled = add_norm_pool(x, r, self.norm1, self.attn)
            r = self.drop_path(self.attn(z) if pooled is None else self.attn(z, pooled))
        x, z = add_norm(x, r, self.norm2)
        return x, self.drop_path(self.mlp(z))


class TritonStage(Stage):
    """The blocks with each FFN residual add fused with the next block's first LayerNorm. Blocks with hooks,
    activation checkpointing or other block classes run block by block."""

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if ((self.grad_checkpointing and not torch.jit.is_scripting())
                or _internals.module_forward_hooks(self.blocks)
                or not all(type(b) is TritonBlock and not _internals.module_forward_hooks(b) for b in self.blocks)):
            return super().forward_blocks(x)
        r = None
        for block in self.blocks:
            x, r = block.forward_residual(x, r)
        return x + r


def _gathers(conv: nn.Module) -> bool:
    """Whether the deformable conv runs as ``litv2::dtm_gather`` + GEMM: a plain 2x2/2 one without hooks, and not
    a gradient under deterministic algorithms (the gather's backward adds with atomics)."""
    return (conv.kernel_size == 2 and conv.stride == 2 and conv.padding == 0
            and conv.conv_offset.out_channels == 8 and not _internals.module_forward_hooks(conv)
            and not (torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()))


def deform_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The 2x2/2 deformable conv of ``conv`` (its offset conv, ``weight`` and ``bias`` in the plain layout) on the
    ``(B, H, W, C)`` map ``x``: ``(B, H/2, W/2, C')`` in ``conv.weight``'s dtype. As the plain layer, it runs in fp32
    (or wider) whatever autocast says: the offset conv follows autocast, the sampling and the GEMM do not."""
    offset = conv.conv_offset(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)
    device = x.device.type
    no_autocast = (torch.autocast(device_type=device, enabled=False) if torch.amp.is_autocast_available(device)
                   and torch.is_autocast_enabled(device) else contextlib.nullcontext())
    with no_autocast:
        cols = torch.ops.litv2.dtm_gather(x, offset.to(torch.float32), dtype)
        out = F.linear(cols, weight.to(dtype).permute(0, 2, 3, 1).reshape(weight.shape[0], -1), bias.to(dtype))
    return out.to(conv.weight.dtype)


class TritonDeformConv2d(FastDeformConv2d):
    """The deformable conv as ``litv2::dtm_gather`` (the taps' bilinear samples, fp32 coordinates) + one GEMM with
    the weight permuted tap-major (the parameters keep their layout). Other shapes, hooks, or a gradient under
    deterministic algorithms take FastDeformConv2d's path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _gathers(self):
            return super().forward(x)
        return deform_conv(self, x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


class TritonDTM(DeformableTokenMerging):
    """DTM on the gather + GEMM (:func:`deform_conv`). In eval mode (the BatchNorm on its running statistics) the
    BatchNorm is folded into the GEMM's weight and bias, GELU after (in fp32: a low-precision layer rounds once, after
    the folded GEMM, where the plain one rounds the conv's output and the BatchNorm's); in training it stays a
    BatchNorm (its running statistics updated as the plain model's)."""

    def _folds(self) -> bool:
        norm = self.norm_layer
        return (type(norm) is nn.BatchNorm2d and not norm.training and norm.running_mean is not None
                and norm.running_var is not None and not _internals.module_forward_hooks(norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self.dconv, self.norm_layer
        if not isinstance(conv, DeformConv2d) or not _gathers(conv):
            return super().forward(x)
        if not self._folds():
            y = deform_conv(conv, x, conv.weight, conv.bias)
            return self.act_layer(norm(y.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        if not torch.compiler.is_compiling():
            taken("triton_dtm_bn_fold")
        dtype = torch.promote_types(conv.weight.dtype, torch.float32)
        scale = torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.to(dtype)
        bias = (conv.bias.to(dtype) - norm.running_mean.to(dtype)) * scale
        if norm.bias is not None:
            bias = bias + norm.bias.to(dtype)
        return self.act_layer(deform_conv(conv, x, conv.weight.to(dtype) * scale.view(-1, 1, 1, 1), bias))


class TritonHiLo(HiLo):
    """HiLo as one F.linear of ``[h_qkv; l_q]`` (weights concatenated at each call: the state dict is HiLo's),
    ``l_kv`` on the pooled map (``pooled``, from ``litv2::add_layer_norm_pool``, or pooled here), one
    ``litv2::hilo_attention`` and ``h_proj`` / ``l_proj`` on its two halves. Attention dropout in training, hooks
    on ``h_qkv``, ``l_q`` or ``l_kv``, or an unsupported input take HiLo's path."""

    def fusable(self, x: torch.Tensor) -> bool:
        return (x.dim() == 4 and x.shape[-1] == self.dim and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and not (self.training and self.attn_drop > 0)
                and not any(_internals.module_forward_hooks(m) for m in (self.h_qkv, self.l_q, self.l_kv)
                            if m is not None))

    def pools(self) -> bool:
        """Whether Lo-Fi's keys come from a pooled map."""
        return self.l_heads > 0 and self.ws > 1

    def forward(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fusable(x):
            return super().forward(x)
        inputs = [m for m in (self.h_qkv, self.l_q) if m is not None]
        weight = torch.cat([m.weight for m in inputs]) if len(inputs) > 1 else inputs[0].weight
        bias = None
        if all(m.bias is not None for m in inputs):
            bias = torch.cat([m.bias for m in inputs]) if len(inputs) > 1 else inputs[0].bias
        p = F.linear(x, weight, bias)
        kv = None
        if self.l_heads:
            if self.pools() and pooled is None:
                pooled = F.avg_pool2d(pad_to_multiple(x, self.ws).permute(0, 3, 1, 2), self.ws,
                                      self.ws).permute(0, 2, 3, 1)
            kv = F.linear(x if self.ws == 1 else pooled, self.l_kv.weight, self.l_kv.bias)
        h_bias = None if self.h_qkv is None else self.h_qkv.bias
        out, _ = torch.ops.litv2.hilo_attention(p, kv, h_bias, self.h_heads, self.l_heads, self.head_dim, self.ws,
                                                self.scale)
        if self.h_qkv is None:
            out = self.l_proj(out)
        elif self.l_q is None:
            out = self.h_proj(out)
        else:
            out = torch.cat((self.h_proj(out[..., :self.h_dim]), self.l_proj(out[..., self.h_dim:])), dim=-1)
        return self.proj_drop(out)


def add_norm_pool(x: torch.Tensor, r: torch.Tensor | None, norm: nn.Module,
                  attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`add_norm` and, before a :class:`TritonHiLo` that pools (and has no hooks), the normalised map's
    pool from the same kernel (``litv2::add_layer_norm_pool``); else None."""
    if (r is None or type(attn) is not TritonHiLo or not attn.pools() or _internals.module_forward_hooks(attn)
            or not _fusable_norm(norm, x, r) or x.dim() != 4 or not attn.fusable(x)):
        return (*add_norm(x, r, norm), None)
    y, z, pooled, _, _ = torch.ops.litv2.add_layer_norm_pool(x, r, norm.weight, norm.bias, norm.eps,
                                                             _out_dtype(x, r), attn.ws)
    return y, z, pooled


FAST = {ConvFFN: TritonConvFFN, Block: TritonBlock, Stage: TritonStage, HiLo: TritonHiLo,
        DeformConv2d: TritonDeformConv2d, DeformableTokenMerging: TritonDTM}
_PLAIN.update({fast: plain for plain, fast in FAST.items()})
