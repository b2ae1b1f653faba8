"""LITv2: ConvFFN blocks, deformable token merging (DTM), HiLo transformer blocks, four stages.

Architecture (supplementary Table I; names match the authors' released checkpoints):

    patch_embed  Conv2d 4x4/4 (3 -> C1) + LayerNorm
    layers.0     2 x ConvFFN block                   (H/4)   -> downsample: DTM C1 -> C2
    layers.1     2 x ConvFFN block                   (H/8)   -> downsample: DTM C2 -> C3
    layers.2     L3 x [HiLo(alpha, s=2) + ConvFFN]   (H/16)  -> downsample: DTM C3 -> C4
    layers.3     2 x [HiLo(s=1) = MSA + ConvFFN]     (H/32)
    norm, global average pool, head

ConvFFN = fc1 -> 3x3 depthwise conv (zero padding, bias) -> GELU -> fc2; there is no positional encoding.
DTM = 2x2/2 deformable conv (``torchvision.ops.deform_conv2d``, offsets from a plain 2x2/2 conv initialised to
zero) -> BatchNorm2d -> GELU. Activations are channels-last ``(B, H, W, C)`` inside the stages; the convs run on
the ``permute(0, 3, 1, 2)`` view of such a map.

This file is what LITv2 computes. How it is computed faster on a given machine (CPU kernels, memory recomputes)
is :mod:`litv2.accel`, applied to a built model explicitly.
"""

import math
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, \
    resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from litv2 import hub

from .hilo import HiLo, hilo_head_split

__all__ = ["LITv2", "ConvFFN", "DeformableTokenMerging", "checkpoint_filter_fn", "check_hilo_split", "HiLoSplitError",
           "load_checkpoint", "load_filtered_state_dict", "RELEASES", "ALPHA_VARIANTS"]

torch.fx.wrap("deform_conv2d")  # a leaf for FX tracing (torchvision's op checks its input shapes in Python)


class DWConv(nn.Module):
    """3x3 depthwise conv with zero padding on a channels-last (B, H, W, C) map."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2: the FFN with the implicit zero-padding position of the paper."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.dwconv = DWConv(hidden_features, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x)))
        return self.drop(self.fc2(self.drop(x)))


class DeformConv2d(nn.Module):
    """Deformable conv with its offset conv (mmcv ``DeformConv2dPack`` layout, torchvision kernel).

    Offsets are ``(dy, dx)`` per kernel position, the convention of ``torchvision.ops.deform_conv2d``;
    ``conv_offset`` starts at zero so the layer starts as a plain strided conv. The deformable conv runs in fp32 or
    wider (bilinear sampling positions need it; torchvision's CPU kernel has no fp16/bf16, and its CUDA autocast
    rule casts to fp32 too) and returns the dtype of the layer's weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 padding: int = 0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd))
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size, stride, padding, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.weight.shape[1] * self.kernel_size ** 2)
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        out = deform_conv2d(x.to(dtype), self.conv_offset(x).to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                            stride=(self.stride, self.stride), padding=(self.padding, self.padding))
        return out.to(self.weight.dtype)


class DeformableTokenMerging(nn.Module):
    """DTM: 2x2/2 deformable conv C -> C', BatchNorm2d, GELU. (B, H, W, C) -> (B, H/2, W/2, C')."""

    def __init__(self, dim: int, dim_out: int, device=None, dtype=None):
        super().__init__()
        self.dconv = DeformConv2d(dim, dim_out, kernel_size=2, stride=2, device=device, dtype=dtype)
        self.norm_layer = nn.BatchNorm2d(dim_out, device=device, dtype=dtype)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_layer(self.norm_layer(self.dconv(x.permute(0, 3, 1, 2))))
        return x.permute(0, 2, 3, 1)


class Block(nn.Module):
    """``x + attn(LN(x))`` (attention stages only), then ``x + ConvFFN(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 window_size: int = 0, alpha: float = 0.9, attention: str = "hilo", block_idx: int = 0,
                 stage_idx: int | None = None, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1, self.attn = None, None  # stages 1-2 have no attention
        if window_size != 0:
            self.norm1 = norm_layer(dim, **dd)
            if attention == "hilo":
                self.attn = HiLo(dim, num_heads, window_size=window_size, alpha=alpha, qkv_bias=qkv_bias,
                                 attn_drop=attn_drop, proj_drop=drop, **dd)
            else:
                from .attentions import create_attention  # ablation alternatives (paper Table 4)
                with torch.device(device) if device is not None else nullcontext():
                    self.attn = create_attention(attention, dim, num_heads, window_size=window_size, alpha=alpha,
                                                 qkv_bias=qkv_bias, block_idx=block_idx, stage_idx=stage_idx,
                                                 attn_drop=attn_drop, proj_drop=drop).to(dtype=dtype)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """``depth`` blocks followed by an optional DTM to the next stage (checkpoint name ``layers.i``)."""

    def __init__(self, dim: int, dim_out: int | None, depth: int, num_heads: int, window_size: int,
                 drop_path: Sequence[float], downsample: bool, device=None, dtype=None, **block_kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, window_size=window_size, drop_path=drop_path[i], block_idx=i, **dd,
                  **block_kwargs) for i in range(depth)])
        self.downsample = DeformableTokenMerging(dim, dim_out, **dd) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks alone: the stage's output map before the DTM."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


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
        global_pool: ``"avg"`` or ``""`` (no pooling: ``forward`` returns the NHWC map).
        device, dtype: where and how the parameters are created (timm's factory arguments).
    """

    output_fmt = "NHWC"  # forward_features' layout

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
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
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
        _check_global_pool(global_pool)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim = embed_dim
        self.depths, self.num_heads_per_stage, self.local_ws, self.alpha = depths, num_heads, local_ws, alphas
        self.patch_size, self.mlp_ratio, self.qkv_bias = patch_size, mlp_ratio, qkv_bias
        self.attention = attention
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm_layer, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]  # also under meta
        self.layers = nn.ModuleList()
        self.feature_info = []
        reduction = patch_size
        for i in range(n):
            self.layers.append(Stage(
                dims[i], dims[i + 1] if i < n - 1 else None, depths[i], num_heads[i], local_ws[i],
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < n - 1,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                alpha=alphas[i], attention=attention, stage_idx=i, norm_layer=norm_layer, **dd))
            # the stage's map before its DTM (hooks on the stage itself would see the downsampled map)
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"layers.{i}.blocks"))
            reduction *= 2
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
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
        """A new classifier for ``num_classes`` (0: none) on the model's device and dtype; ``global_pool``
        ``"avg"`` or ``""`` (None keeps the current pooling)."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype).train(
            self.training) if num_classes > 0 else nn.Identity()

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
        """Multi-scale maps for dense prediction (timm API): each stage's output before its DTM.

        Args:
            indices: stages to return: the last ``n`` (int), a list (negative from the end), or None for all.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last stage asked for.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return the maps alone, without the final features.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.layers)
        take, max_index = feature_take_indices(n, indices)
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        last = max_index if stop_early else n - 1
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

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and DTM) after the last stage in ``indices``; optionally norm and head."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm or max_index < len(self.depths) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")


class PatchEmbed(nn.Module):
    """Conv2d PxP/P then LayerNorm; returns channels-last (B, H/P, W/P, C)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_layer, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, device=device, dtype=dtype)
        self.norm = norm_layer(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


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
    check_hilo_split(out, model)
    return out


def check_hilo_split(state_dict: dict, model: nn.Module) -> None:
    """Raise one :class:`HiLoSplitError` (a ValueError) when ``state_dict`` was trained with another HiLo alpha
    than ``model`` was built with.

    The split is read from the weight shapes: ``l_q`` has one output row per Lo-Fi channel, ``h_qkv`` three per
    Hi-Fi channel (a branch without heads has no weights). The error names both splits and the shortest alpha
    that builds the file's one, instead of a list of shape mismatches from ``load_state_dict``.
    """
    for name, m in model.named_modules():
        if not isinstance(m, HiLo):
            continue
        l_q, h_qkv = state_dict.get(f"{name}.l_q.weight"), state_dict.get(f"{name}.h_qkv.weight")
        if l_q is None and h_qkv is None:
            continue  # not in the file: a missing-keys question for the load
        l_dim = l_q.shape[0] if l_q is not None else 0
        h_dim = h_qkv.shape[0] // 3 if h_qkv is not None else 0
        if (l_dim, h_dim) == (m.l_dim, m.h_dim) or l_dim + h_dim != m.dim or l_dim % m.head_dim:
            continue  # same split, or another width altogether (not a question of alpha)
        l_heads = l_dim // m.head_dim
        alpha = _alpha_for_split(m.num_heads, l_heads, m.ws)
        raise HiLoSplitError(alpha, m.alpha, (
            f"the weights were trained with HiLo alpha={alpha:g} ({l_heads} Lo-Fi / {m.num_heads - l_heads} Hi-Fi "
            f"heads in {name}), the model was built with alpha={m.alpha:g} ({m.l_heads} / {m.h_heads}): "
            f"build the model with alpha={alpha:g} to load them"))


class HiLoSplitError(ValueError):
    """Weights trained with another HiLo alpha than the model's: ``file_alpha`` (as the shortest alpha that gives the
    file's head split) vs ``model_alpha``."""

    def __init__(self, file_alpha: float, model_alpha: float, message: str):
        super().__init__(message)
        self.file_alpha, self.model_alpha = file_alpha, model_alpha


def _alpha_for_split(num_heads: int, lofi_heads: int, window_size: int) -> float:
    """The alpha with the fewest decimals that gives ``lofi_heads`` of ``num_heads`` (0.9 for 10 of 12)."""
    for digits in range(4):
        for i in range(10 ** digits + 1):
            alpha = i / 10 ** digits
            if hilo_head_split(num_heads, alpha, window_size)[0] == lofi_heads:
                return alpha
    return round(lofi_heads / num_heads, 4)


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

# The authors' released weights (GitHub releases of ziplab/LITv2) and the ImageNet-1K top-1 (%) published with
# them: v1.0 holds the paper's Table 1 models, v1.1 LITv2-S trained at seven HiLo alphas (paper Fig. 4).
RELEASE_URL = "https://github.com/ziplab/LITv2/releases/download/"
RELEASES = {  # timm "name.tag": (release/file, top-1 %)
    "litv2_s.in1k": ("v1.0/litv2_s.pth", 82.0),
    "litv2_m.in1k": ("v1.0/litv2_m.pth", 83.3),
    "litv2_b.in1k": ("v1.0/litv2_b.pth", 83.6),
    "litv2_b_384.in1k": ("v1.0/litv2_b_384.pth", 84.7),
    # the 224x224 LITv2-B weights on the 384 model: where the paper's 384 fine-tuning starts (litv2_b_384_ft)
    "litv2_b_384.in1k_224": ("v1.0/litv2_b.pth", 83.6),
    "litv2_s_alpha0.in1k": ("v1.1/alpha_0.pth", 81.16),
    "litv2_s_alpha0_2.in1k": ("v1.1/alpha_0.2.pth", 81.89),
    "litv2_s_alpha0_4.in1k": ("v1.1/alpha_0.4.pth", 81.81),
    "litv2_s_alpha0_5.in1k": ("v1.1/alpha_0.5.pth", 81.88),
    "litv2_s_alpha0_7.in1k": ("v1.1/alpha_0.7.pth", 81.94),
    "litv2_s_alpha0_9.in1k": ("v1.1/alpha_0.9.pth", 82.03),
    "litv2_s_alpha1.in1k": ("v1.1/alpha_1.pth", 81.89),
}
# LITv2-S at one HiLo alpha per registered name (the v1.1 release): the name fixes the architecture's alpha.
ALPHA_VARIANTS = {"litv2_s_alpha0": 0.0, "litv2_s_alpha0_2": 0.2, "litv2_s_alpha0_4": 0.4, "litv2_s_alpha0_5": 0.5,
                  "litv2_s_alpha0_7": 0.7, "litv2_s_alpha0_9": 0.9, "litv2_s_alpha1": 1.0}


def _cfg(name_tag: str, **kwargs):
    file, top1 = RELEASES[name_tag]
    return {
        "url": RELEASE_URL + file, "hf_hub_id": "", "num_classes": 1000, "input_size": (3, 224, 224),
        "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "description": f"ImageNet-1K top-1 {top1} % (the authors' release {file})",
        "origin_url": "https://github.com/ziplab/LITv2", "paper_name": "Fast Vision Transformers with HiLo Attention",
        "paper_ids": "arXiv:2205.13213", **kwargs,
    }


_AT_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
default_cfgs = generate_default_cfgs({
    name_tag: _cfg(name_tag, **(_AT_384 if name_tag == "litv2_b_384.in1k" else {})) for name_tag in RELEASES})


# Supplementary Table I; every variant uses HiLo alpha 0.9 with s = [-, -, 2, 1].
_HILO = dict(alpha=0.9, local_ws=(0, 0, 2, 1))
_ARCH = {
    "s": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **_HILO),
    "m": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_HILO),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_HILO),
}


def _create_litv2(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> LITv2:
    """Build ``variant`` with its Table I ``defaults``; any keyword the caller passes wins.

    ``pretrained=True`` loads through timm's ``load_pretrained``; a weights URL is first fetched into torch.hub's
    cache by :func:`litv2.hub.loading` (progress bar, one-line errors, a corrupt download removed again).
    """
    kwargs = {**defaults, **kwargs}
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))

    def build():
        return build_model_with_cfg(
            LITv2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)

    if not pretrained:
        return build()
    url = hub.weights_url(resolve_pretrained_cfg(
        variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).to_dict())
    if url is None:  # a file, a local dir, the HF hub or a state dict: timm's loader as it is
        return build()
    hint = (f"download it yourself and pass the file: timm.create_model({variant!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='/path/{url.rsplit('/', 1)[-1]}'))")
    with hub.loading(url, kwargs.get("cache_dir"), hint=hint):
        return build()


def _create_litv2_s_alpha(variant: str, pretrained: bool, kwargs: dict) -> LITv2:
    """LITv2-S at the alpha ``variant`` names; another alpha is refused (the name and its weights would lie)."""
    alpha = ALPHA_VARIANTS[variant]
    given = kwargs.get("alpha", alpha)
    if any(not math.isclose(float(a), alpha) for a in (given if isinstance(given, Sequence) else [given])):
        raise ValueError(f"{variant} is LITv2-S at HiLo alpha={alpha:g} (its weights need it), got alpha={given}; "
                         f"use litv2_s(alpha=...) for another alpha")
    return _create_litv2(variant, pretrained, dict(_ARCH["s"], alpha=alpha), kwargs)


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
    """LITv2-B fine-tuned at 384x384 (same weights layout as LITv2-B); tag ``in1k_224``: the 224 weights."""
    return _create_litv2("litv2_b_384", pretrained, dict(_ARCH["b"], img_size=384), kwargs)


# LITv2-S at the seven alphas of the v1.1 release (paper Fig. 4); stage 3 has 12 heads, floor(12 alpha) Lo-Fi.

@register_model
def litv2_s_alpha0(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 0: stage 3 all Hi-Fi (0 Lo-Fi / 12 Hi-Fi heads), 3.97 GFLOPs (v1.1 alpha_0.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha0", pretrained, kwargs)


@register_model
def litv2_s_alpha0_2(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 0.2: 2 Lo-Fi / 10 Hi-Fi heads in stage 3, 3.88 GFLOPs (v1.1 alpha_0.2.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha0_2", pretrained, kwargs)


@register_model
def litv2_s_alpha0_4(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 0.4: 4 Lo-Fi / 8 Hi-Fi heads in stage 3, 3.82 GFLOPs (v1.1 alpha_0.4.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha0_4", pretrained, kwargs)


@register_model
def litv2_s_alpha0_5(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 0.5: 6 Lo-Fi / 6 Hi-Fi heads in stage 3, 3.77 GFLOPs (v1.1 alpha_0.5.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha0_5", pretrained, kwargs)


@register_model
def litv2_s_alpha0_7(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 0.7: 8 Lo-Fi / 4 Hi-Fi heads in stage 3, 3.74 GFLOPs (v1.1 alpha_0.7.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha0_7", pretrained, kwargs)


@register_model
def litv2_s_alpha0_9(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 0.9 (LITv2-S's own): 10 Lo-Fi / 2 Hi-Fi heads, 3.73 GFLOPs (v1.1 alpha_0.9.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha0_9", pretrained, kwargs)


@register_model
def litv2_s_alpha1(pretrained: bool = False, **kwargs) -> LITv2:
    """LITv2-S at alpha 1: stage 3 all Lo-Fi (12 / 0 heads), 3.70 GFLOPs published, 3.75 counted (v1.1 alpha_1.pth)."""
    return _create_litv2_s_alpha("litv2_s_alpha1", pretrained, kwargs)
