"""LITv2: ConvFFN blocks, deformable token merging (DTM), HiLo transformer blocks, four stages.

Architecture (supplementary Table I; names match the authors' released checkpoints):

    patch_embed  Conv2d 4x4/4 (3 -> C1) + LayerNorm
    layers.0     2 x ConvFFN block                   (H/4)   -> downsample: DTM C1 -> C2
    layers.1     2 x ConvFFN block                   (H/8)   -> downsample: DTM C2 -> C3
    layers.2     L3 x [HiLo(alpha, s=2) + ConvFFN]   (H/16)  -> downsample: DTM C3 -> C4
    layers.3     2 x [HiLo(s=1) = MSA + ConvFFN]     (H/32)
    norm, global average pool, head

ConvFFN = fc1 -> 3x3 depthwise conv (zero padding, bias) -> GELU -> fc2; there is no positional
encoding. DTM = 2x2/2 deformable conv (``torchvision.ops.deform_conv2d``, offsets from a plain
2x2/2 conv initialised to zero) -> BatchNorm2d -> GELU. (On CPU, and under torch.compile on any
device, the deformable conv runs as bilinear resampling + a plain strided conv, see
:func:`litv2.models.layers.deform_conv2d_resampled`.)

Activations are channels-last ``(B, H, W, C)`` inside the stages. A 2-D conv on the
``permute(0, 3, 1, 2)`` view of such a tensor runs in PyTorch's channels-last memory format, so the
depthwise conv and DTM need no layout copies.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from .hilo import HiLo
from .layers import (Linear, deform_conv2d_resampled, dwconv_gelu, inference_chunk, recompute_when_saved,
                     resample_and_conv, resampled_dtm_ok, saved_tensor_hooks_active)

__all__ = ["LITv2", "ConvFFN", "DeformableTokenMerging", "checkpoint_filter_fn", "load_checkpoint",
           "load_filtered_state_dict"]


class DWConv(nn.Module):
    """3x3 depthwise conv with zero padding, then GELU, on a channels-last (B, H, W, C) map.

    The GELU lives here so that CPU inference can run both as one oneDNN kernel (``dwconv_gelu``).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwconv_gelu(x.permute(0, 3, 1, 2), self.dwconv).permute(0, 2, 3, 1)


class ConvFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2 (the paper's FFN with implicit zero-padding position).

    Two options trade a little backward-pass compute for memory in training; the gradients are bitwise
    the same either way (every kernel runs as in the plain model, on the same inputs):

    ``recompute_gelu``: fc2 keeps no copy of its input ``GELU(y)`` for the backward pass; the backward pass
    recomputes it from ``y``. That saves one hidden-width map per block (the widest activation) for one
    extra GELU in backward.

    ``recompute_dwconv``: GELU keeps no copy of its input ``y = dwconv(fc1(x))`` either; the backward pass
    recomputes it from ``fc1(x)``, which the depthwise conv's own backward keeps anyway, under the
    forward's autocast state. That saves a second hidden-width map per block for one depthwise conv in
    backward (computed once when both options are on: GELU's backward takes the ``y`` that fc2's recompute
    made). Gradients stay bitwise the same as long as the conv kernel is deterministic (CPU, cuDNN's
    forward algorithms). A depthwise conv with forward hooks or a parametrized weight keeps its output (the
    rerun would skip the hooks, or run them and their side effects twice).

    Neither applies under ``torch.compile`` (inductor chooses what to recompute itself), tracing, export,
    other saved-tensor hooks (activation checkpointing recomputes the whole block anyway) or hooks switched
    off (``torch.func``), nor for tensor subclasses or with FFN dropout. When a recompute does apply, the
    depthwise ``Conv2d`` is called directly, so forward hooks on the ``DWConv`` wrapper do not run (hooks on
    ``dwconv.dwconv`` do).
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, recompute_gelu: bool = True,
                 recompute_dwconv: bool = False):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)  # conv + GELU
        self.drop = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.recompute_gelu = recompute_gelu
        self.recompute_dwconv = recompute_dwconv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if ((self.recompute_gelu or self.recompute_dwconv) and self.drop.p == 0 and torch.is_grad_enabled()
                and x.requires_grad and type(x) is torch.Tensor
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not torch.compiler.is_exporting() and not saved_tensor_hooks_active()):
            xc = x.permute(0, 3, 1, 2)
            y = self.dwconv.dwconv(xc)
            if self.recompute_dwconv and _DWConvRecompute.applies(self.dwconv.dwconv):
                conv = _DWConvRecompute(self.dwconv.dwconv, xc)
                with recompute_when_saved(y, conv.take):
                    g = F.gelu(y)
                del y  # the recipes below must not hold it

                def remake_g():
                    return F.gelu(conv.keep())
            else:
                g = F.gelu(y)

                def remake_g():
                    return F.gelu(y)
            if not self.recompute_gelu:
                return self.fc2(g.permute(0, 2, 3, 1))
            with recompute_when_saved(g, remake_g):
                return self.fc2(g.permute(0, 2, 3, 1))
        x = self.dwconv(x)
        return self.drop(self.fc2(self.drop(x)))


class _DWConvRecompute:
    """The depthwise conv of the forward pass again in the backward pass: the same kernel on the same input and
    weights, without module hooks, under the forward pass's autocast state (autograd runs the backward pass
    outside it, or inside a context of the caller's) and without building a graph (autograd attaches the
    remade tensor to the forward's graph). ``keep()`` holds the result for one ``take()``: fc2's backward (the
    GELU recompute) comes first and GELU's backward then takes the same tensor instead of a second conv."""

    @staticmethod
    def applies(conv: nn.Conv2d) -> bool:
        """Hooks (or a parametrized weight) could make ``conv(x)`` differ from the plain conv, or change state
        when it runs again (spectral norm's power iteration); such a conv keeps its output instead."""
        from torch.nn.modules import module
        from torch.nn.utils import parametrize
        return not (conv._forward_hooks or conv._forward_pre_hooks or parametrize.is_parametrized(conv)
                    or getattr(module, "_global_forward_hooks", None)
                    or getattr(module, "_global_forward_pre_hooks", None))

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor):
        self.conv, self.x, self.y = conv, x, None
        self.weight, self.bias = conv.weight, conv.bias  # what this forward used
        device = x.device.type
        self.autocast = None  # devices without autocast (e.g. meta): none to re-enter
        if torch.amp.is_autocast_available(device):
            self.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device),
                                 enabled=torch.is_autocast_enabled(device))

    def _run(self) -> torch.Tensor:
        autocast = contextlib.nullcontext() if self.autocast is None else torch.autocast(**self.autocast)
        with torch.no_grad(), autocast:
            return self.conv._conv_forward(self.x, self.weight, self.bias)

    def keep(self) -> torch.Tensor:
        if self.y is None:
            self.y = self._run()
        return self.y

    def take(self) -> torch.Tensor:
        y, self.y = self.y, None
        return self._run() if y is None else y


class DeformConv2d(nn.Module):
    """Deformable conv with its offset conv (mmcv ``DeformConv2dPack`` layout, torchvision kernel).

    Offsets are ``(dy, dx)`` per kernel position, the convention of ``torchvision.ops.deform_conv2d``;
    ``conv_offset`` starts at zero so the layer starts as a plain strided conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 padding: int = 0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size, stride, padding)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.weight.shape[1] * self.kernel_size ** 2)
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        if torch.is_autocast_enabled(x.device.type):
            # Bilinear sampling positions need fp32 (torchvision has no bf16/fp16 CPU kernel and casts
            # to fp32 under CUDA autocast too). Compiled, the sampling runs in fp32 and the strided conv
            # after it follows autocast like any conv; eager, the whole deformable conv runs in fp32,
            # as torchvision does.
            if torch.compiler.is_compiling() and resampled_dtm_ok(x):
                return resample_and_conv(x.float(), offset.float(), self.weight, self.bias, self.stride,
                                         self.padding)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return deform_conv2d_resampled(x.float(), offset.float(), self.weight.float(), self.bias.float(),
                                           self.stride, self.padding)
        return deform_conv2d_resampled(x, offset, self.weight, self.bias, self.stride, self.padding, self)


class DeformableTokenMerging(nn.Module):
    """DTM: 2x2/2 deformable conv C -> C', BatchNorm2d, GELU. (B, H, W, C) -> (B, H/2, W/2, C')."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.dconv = DeformConv2d(dim, dim_out, kernel_size=2, stride=2)
        self.norm_layer = nn.BatchNorm2d(dim_out)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_layer(self.norm_layer(self.dconv(x.permute(0, 3, 1, 2))))
        return x.permute(0, 2, 3, 1)


class Block(nn.Module):
    """``x + attn(LN(x))`` (attention stages only), then ``x + ConvFFN(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 window_size: int = 0, alpha: float = 0.9, attention: str = "hilo", block_idx: int = 0,
                 stage_idx: int | None = None, norm_layer=nn.LayerNorm, recompute_gelu: bool = True,
                 recompute_dwconv: bool = False):
        super().__init__()
        self.has_attn = window_size != 0
        if self.has_attn:
            self.norm1 = norm_layer(dim)
            if attention == "hilo":
                self.attn = HiLo(dim, num_heads, window_size=window_size, alpha=alpha, qkv_bias=qkv_bias,
                                 attn_drop=attn_drop, proj_drop=drop)
            else:
                from .attentions import create_attention  # ablation alternatives (paper Table 4)
                self.attn = create_attention(attention, dim, num_heads, window_size=window_size, alpha=alpha,
                                             qkv_bias=qkv_bias, block_idx=block_idx, stage_idx=stage_idx,
                                             attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=drop, recompute_gelu=recompute_gelu,
                           recompute_dwconv=recompute_dwconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_attn:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """``depth`` blocks followed by an optional DTM to the next stage (checkpoint name ``layers.i``)."""

    def __init__(self, dim: int, dim_out: int | None, depth: int, num_heads: int, window_size: int,
                 drop_path: Sequence[float], downsample: bool, **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, window_size=window_size, drop_path=drop_path[i], block_idx=i, **block_kwargs)
            for i in range(depth)])
        self.downsample = DeformableTokenMerging(dim, dim_out) if downsample else None
        self.widest = max([dim] + [b.mlp.fc1.out_features for b in self.blocks])

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        # Every block is per-sample (LayerNorm, attention, ConvFFN); at CPU inference the batch runs in
        # chunks whose widest activation (the FFN hidden map) stays small, see ``inference_chunk``.
        chunk = inference_chunk(x, self.widest)
        if chunk < x.shape[0]:  # equal chunks: ceil(B / chunk) of them
            return torch.cat([self._run_blocks(part) for part in x.tensor_split(-(-x.shape[0] // chunk))])
        return self._run_blocks(x)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


def _as_stage_list(value, n: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must have one entry per stage ({n}), got {name}={value}")
    return value


class LITv2(nn.Module):
    """LITv2 image classifier / backbone.

    Args:
        img_size: nominal input size (only used for the default cfg; any input size works).
        in_chans, num_classes: input channels and classes (``num_classes=0`` gives a feature extractor).
        embed_dim: C1; stage widths are ``C1 * 2**i``.
        depths, num_heads: blocks and attention heads per stage.
        mlp_ratio: FFN expansion ``E``.
        qkv_bias: bias on q/k/v projections.
        alpha: HiLo split (fraction of Lo-Fi heads), one value or one per stage.
        local_ws: HiLo window size ``s`` per stage; ``0`` = no attention in that stage (ConvFFN blocks),
            ``1`` = standard MSA (the paper's stage 4).
        attention: ``"hilo"`` or an ablation alternative for the attention stages
            (``"msa"``, ``"sra"``, ``"wmsa"``, ``"tmsa"``; see :mod:`litv2.models.attentions`).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (linear rule).
        recompute_gelu: in training, recompute each ConvFFN's GELU output in the backward pass instead of
            keeping it (one hidden-width map per block less memory, bitwise the same gradients; see
            :class:`ConvFFN`).
        recompute_dwconv: in training, also recompute each ConvFFN's depthwise-conv output (GELU's input) in
            the backward pass (one more hidden-width map per block less memory for one depthwise conv in
            backward; bitwise the same gradients; see :class:`ConvFFN`).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        alpha: float | Sequence[float] = 0.9,
        local_ws: Sequence[int] = (0, 0, 2, 1),
        attention: str = "hilo",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        patch_size: int = 4,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        recompute_gelu: bool = True,
        recompute_dwconv: bool = False,
    ):
        super().__init__()
        depths = list(depths)
        if len(depths) == 0 or any(int(d) < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty list of positive block counts, got depths={depths}")
        n = len(depths)
        num_heads = _as_stage_list(num_heads, n, "num_heads")
        local_ws = _as_stage_list(local_ws, n, "local_ws")
        alphas = _as_stage_list(alpha, n, "alpha")
        dims = [int(embed_dim * 2 ** i) for i in range(n)]
        for i in range(n):
            if not 0.0 <= float(alphas[i]) <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got alpha={alphas[i]}")
            if int(local_ws[i]) != local_ws[i] or local_ws[i] < 0:
                raise ValueError(f"window size must be an integer >= 1 (0 = no attention stage), "
                                 f"got local_ws[{i}]={local_ws[i]}")
            if num_heads[i] < 1 or dims[i] % num_heads[i] != 0:
                raise ValueError(f"num_heads[{i}]={num_heads[i]} must divide the stage width {dims[i]}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim = embed_dim
        self.depths, self.num_heads_per_stage, self.local_ws, self.alpha = depths, num_heads, local_ws, alphas
        self.attention = attention
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]  # also under a meta device
        self.layers = nn.ModuleList()
        self.feature_info = []
        reduction = patch_size
        for i in range(n):
            self.layers.append(Stage(
                dims[i], dims[i + 1] if i < n - 1 else None, depths[i], num_heads[i], local_ws[i],
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < n - 1,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                alpha=alphas[i], attention=attention, stage_idx=i, norm_layer=norm_layer,
                recompute_gelu=recompute_gelu, recompute_dwconv=recompute_dwconv))
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"layers.{i}"))
            reduction *= 2
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:  # depthwise
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm model API -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # No positional embeddings or bias tables; norms, biases and other 1-D params are excluded
        # from weight decay by timm's param_groups_weight_decay (ndim <= 1), as in the paper's recipe.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (0,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised last-stage map, channels-last (B, H/32, W/32, C4)."""
        x = self.pos_drop(self.patch_embed(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Multi-scale maps for dense prediction (timm API): stage outputs before each DTM, NCHW."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.layers)
        take = self._take_indices(indices)
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        last = max(take) if stop_early else n - 1
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage.forward_blocks(x)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
            if stage.downsample is not None and i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if last == n - 1:
            x = self.norm(x)
        return x, intermediates

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = len(self.layers)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            return list(range(n - indices, n))
        return sorted(i % n for i in indices)

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and DTM) after the last stage in ``indices``; optionally norm and head."""
        take = self._take_indices(indices)
        last = max(take)
        self.layers = self.layers[:last + 1]
        self.layers[-1].downsample = None
        if prune_norm or last < len(self.depths) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PatchEmbed(nn.Module):
    """Conv2d PxP/P then LayerNorm; returns channels-last (B, H/P, W/P, C)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_layer):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # From a channels-last input the conv writes a channels-last output, so the (B, H, W, C) view
        # LayerNorm reads is contiguous; from NCHW, LayerNorm first copies the permuted map element by
        # element (on CPU 5x the time of the conv and the norm together at batch 16).
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1))


# ---- released checkpoints -----------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Convert the authors' release format to this implementation's state dict.

    Accepts ``{"model": sd}`` (release files), ``{"state_dict": sd}``, our own training checkpoints
    (``{"model": sd, "optimizer": ...}``) or a plain state dict, with or without a DDP ``module.``
    prefix. Parameter names are identical to the release (this module was written to match them), so
    the conversion unwraps, strips prefixes and drops a classifier whose shape does not match the
    model (e.g. fine-tuning a 1000-class checkpoint on another label set).
    """
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head.") and k in own and own[k].shape != v.shape:
            continue  # classifier for another number of classes: keep the model's fresh head
        out[k] = v
    return out


def load_checkpoint(model: nn.Module, path: str, strict: bool = True, map_location="cpu"):
    """Load a release-format or our own checkpoint file into ``model`` (``weights_only=True``).

    Returns the ``(missing_keys, unexpected_keys)`` of ``load_state_dict``. With ``strict=True`` any
    mismatch other than a dropped classifier raises.
    """
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated / not a torch file / unsafe pickle
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(raw, dict):
        raise RuntimeError(f"checkpoint {path} does not hold a state dict (got {type(raw).__name__})")
    missing, unexpected, head_dropped = load_filtered_state_dict(model, raw)
    if strict and (missing or unexpected):
        raise RuntimeError(f"checkpoint {path} does not match the model: missing={missing[:8]} "
                           f"unexpected={unexpected[:8]}")
    return missing + head_dropped, unexpected


def load_filtered_state_dict(model: nn.Module, state_dict: dict) -> tuple[list[str], list[str], list[str]]:
    """Load ``state_dict`` through :func:`checkpoint_filter_fn` (non-strict).

    Returns ``(missing, unexpected, head_dropped)``: keys the file lacks (classifier excluded),
    keys the model lacks, and the classifier keys left fresh because their shape did not match.
    """
    sd = checkpoint_filter_fn(state_dict, model)
    head_dropped = [k for k in model.state_dict() if k.startswith("head.") and k not in sd]
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in head_dropped]
    return missing, list(result.unexpected_keys), head_dropped


# ---- registry ----------------------------------------------------------------------------------

def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "litv2_s.in1k": _cfg(),
    "litv2_m.in1k": _cfg(),
    "litv2_b.in1k": _cfg(),
    "litv2_b_384.in1k": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


# Supplementary Table I; every variant uses HiLo alpha 0.9 with s = [-, -, 2, 1].
_HILO = dict(alpha=0.9, local_ws=(0, 0, 2, 1))
_ARCH = {
    "s": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **_HILO),
    "m": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_HILO),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_HILO),
}


def _create_litv2(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> LITv2:
    """Build ``variant`` with its Table I ``defaults``; any keyword the caller passes wins."""
    kwargs = {**defaults, **kwargs}
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        LITv2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


@register_model
def litv2_s(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S: C1 96, depths [2, 2, 6, 2], heads [3, 6, 12, 24], alpha 0.9, s [-, -, 2, 1], drop-path 0.2."""
    return _create_litv2("litv2_s", pretrained, _ARCH["s"], kwargs)


@register_model
def litv2_m(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-M: C1 96, depths [2, 2, 18, 2], heads [3, 6, 12, 24], alpha 0.9, s [-, -, 2, 1], drop-path 0.3."""
    return _create_litv2("litv2_m", pretrained, _ARCH["m"], kwargs)


@register_model
def litv2_b(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-B: C1 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32], alpha 0.9, s [-, -, 2, 1], drop-path 0.5."""
    return _create_litv2("litv2_b", pretrained, _ARCH["b"], kwargs)


@register_model
def litv2_b_384(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-B fine-tuned at 384x384 (same weights layout as LITv2-B)."""
    return _create_litv2("litv2_b_384", pretrained, dict(_ARCH["b"], img_size=384), kwargs)
