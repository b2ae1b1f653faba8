"""Alternatives to HiLo for the attention ablation (paper Table 4) and the single-layer benchmark
(supplementary Table IV, paper Fig. 3).

Every module takes a channels-last map ``x`` of shape ``(B, H, W, C)`` and returns the same shape,
like :class:`litv2.models.hilo.HiLo`, so a LITv2 block can swap them freely. Their projections are
``nn.Linear`` layers like HiLo's (and :func:`litv2.accel.accelerate` runs them on the same kernels), so speed
comparisons measure the attention design rather than the kernel choice. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (windows and heads are batch dimensions, biases
and masks go in ``attn_mask``); there are no Python loops over windows or heads.

Ablation choices (``create_attention``), each with its own family's settings, not HiLo's:

* ``msa``  - standard multi-head self-attention (ViT).
* ``sra``  - PVT spatial-reduction attention: keys/values from a ``sr x sr`` stride-``sr`` conv
  followed by LayerNorm; PVT's ``sr_ratios = (8, 4, 2, 1)`` per stage, i.e. ``sr = 2`` at 1/16 scale
  (stage 3) and ``sr = 1`` (plain MSA with separate q / kv projections) in the last stage.
* ``wmsa`` - Swin (shifted) window attention, window 7 with a learned relative position bias; blocks
  with an odd ``block_idx`` shift the windows by ``window // 2`` and use Swin's attention mask. As in
  Swin (timm's per-side rule), a side ``<= window`` gets a window clipped to it and no shift, so a map
  no larger than the window is one window (the whole 7x7 map of stage 4 at 224); sides that do not
  divide are zero-padded at the bottom/right (padded tokens take part in attention, as in Swin) and
  cropped afterwards.
* ``tmsa`` - Twins-SVT: even blocks use locally-grouped self-attention (LSA, window 7, no position
  bias), odd blocks global sub-sampled attention (GSA, = SRA with Twins' ``sr_ratios = (8, 4, 2, 1)``).
* ``hilo`` - :class:`litv2.models.hilo.HiLo`.

Extra single-layer baselines for ``scripts/benchmark_attention.py``: :class:`LinformerAttention`
(Wang et al. 2020, shared-across-heads E/F projections to ``k = 256``), :class:`PerformerAttention`
(Choromanski et al. 2021, FAVOR+ positive orthogonal random features, ``m = 256``),
:class:`CrossShapedWindowAttention` (CSWin's stripes with LePE, Dong et al. 2022),
:class:`LargeKernelAttention` (VAN's spatial attention, Guo et al. 2022), :class:`RecursiveGatedConv`
(HorNet's gnConv, Rao et al. 2022, order 4 at 1/16 scale), :class:`FocalAttention` (Yang et al. 2021,
Focal-T's two levels at 1/16 scale), :class:`DeformableAttention` (DAT, Xia et al. 2022, DAT-T's
1/16-scale offset network), :class:`QuadTreeAttention` (Tang et al. 2022, QuadTree-B's two levels, top 8)
and :class:`TokenAttention` that adapts a token-sequence
attention such as timm's XCiT ``XCA``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


__all__ = [
    "ATTENTION_CHOICES", "PVT_SR_RATIOS", "SWIN_WINDOW", "TWINS_WINDOW",
    "MultiHeadSelfAttention", "SpatialReductionAttention", "WindowAttention",
    "LocallyGroupedAttention", "GlobalSubsampledAttention",
    "LinformerAttention", "PerformerAttention", "CrossShapedWindowAttention", "LargeKernelAttention",
    "RecursiveGatedConv", "FocalAttention", "DeformableAttention", "QuadTreeAttention", "TokenAttention",
    "create_attention",
]

ATTENTION_CHOICES = ("hilo", "msa", "sra", "wmsa", "tmsa")
PVT_SR_RATIOS = (8, 4, 2, 1)  # PVT and Twins-SVT spatial-reduction ratio per stage (1/4 ... 1/32 scale)
SWIN_WINDOW = 7
TWINS_WINDOW = 7
NUM_STAGES = 4


def _check_heads(dim: int, num_heads: int) -> int:
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide dim={dim}")
    return dim // num_heads


def _check_input(x: torch.Tensor, dim: int, name: str) -> None:
    if x.ndim != 4 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects a channels-last (B, H, W, {dim}) map, got shape {tuple(x.shape)}")


class MultiHeadSelfAttention(nn.Module):
    """Standard multi-head self-attention (ViT) over all ``H * W`` positions."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = _check_heads(dim, num_heads)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = self.keys_values(k, v)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, N, hd)`` the queries attend to: all positions here."""
        return k, v


class SpatialReductionAttention(nn.Module):
    """PVT spatial-reduction attention (SRA); Twins' global sub-sampled attention (GSA) is the same layer.

    Queries from every position; keys/values from the map reduced by a ``sr x sr`` stride-``sr`` conv
    and LayerNorm (remainder rows/columns are dropped by the conv, as in PVT). ``sr_ratio == 1`` has no
    conv/norm and is MSA with separate ``q`` and ``kv`` projections (PVT's last stage).
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 2, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if int(sr_ratio) != sr_ratio or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an integer >= 1, got sr_ratio={sr_ratio}")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, int(sr_ratio)
        self.head_dim = _check_heads(dim, num_heads)
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = nn.LayerNorm(dim)
            # PVT init: normal(0, sqrt(2 / fan_out)), zero bias
            fan_out = self.sr_ratio * self.sr_ratio * dim
            nn.init.normal_(self.sr.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(self.sr.bias)
        else:
            self.sr = None
            self.norm = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, sr_ratio={self.sr_ratio}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        q = self.q(x).view(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr is not None:
            if H < self.sr_ratio or W < self.sr_ratio:
                raise ValueError(f"{type(self).__name__} with sr_ratio={self.sr_ratio} needs a map of at least "
                                 f"{self.sr_ratio}x{self.sr_ratio}, got {H}x{W}")
            kv_in = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        else:
            kv_in = x
        k, v = self.kv(kv_in).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))


GlobalSubsampledAttention = SpatialReductionAttention  # Twins-SVT GSA


def _relative_position_index(wh: int, ww: int, table_window: int, device=None) -> torch.Tensor:
    """Swin's (wh*ww, wh*ww) index into a ((2 * table_window - 1)^2, heads) relative position bias table.

    A window clipped to ``wh x ww <= table_window^2`` reads the centre of the full table, so the bias of a
    relative offset is the same parameter whatever the window size.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # (2, N, N), offsets >= 0
    return rel[0] * (2 * table_window - 1) + rel[1]


def _window_region_ids(size: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Swin's cyclic-shift regions along one side: [0, size-window) / [size-window, size-shift) / rest."""
    idx = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(idx)
    return (idx >= size - window).long() + (idx >= size - shift).long()


class WindowAttention(nn.Module):
    """Swin W-MSA / SW-MSA and Twins LSA: self-attention inside non-overlapping ``window`` x ``window`` windows.

    Args:
        dim, num_heads: channels and heads.
        window_size: window side (Swin/Twins use 7).
        shift_size: cyclic shift (Swin: ``window_size // 2`` in every other block, 0 otherwise).
        rel_pos_bias: learned relative position bias (Swin ``True``, Twins LSA ``False``).

    A side of the map that is ``<= window_size`` gets a window clipped to that side and no shift along it
    (Swin's rule, per side as in timm), so a map no larger than the window is attended as a whole; other
    sides that do not divide are zero-padded at the bottom/right (padded tokens take part in attention, as
    in Swin and Twins) and the output is cropped.
    """

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 7, shift_size: int = 0,
                 rel_pos_bias: bool = True, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if int(window_size) != window_size or window_size < 1:
            raise ValueError(f"window_size must be an integer >= 1, got window_size={window_size}")
        if int(shift_size) != shift_size or not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be an integer in [0, window_size={window_size}), got {shift_size}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = _check_heads(dim, num_heads)
        self.window_size, self.shift_size = int(window_size), int(shift_size)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.window_size - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer("relative_position_index", _relative_position_index(
                self.window_size, self.window_size, self.window_size), persistent=False)
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, rel_pos_bias={self.relative_position_bias_table is not None}")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"relative_position_bias_table"}

    def _attn_mask(self, Hp: int, Wp: int, wh: int, ww: int, sh: int, sw: int, device) -> torch.Tensor | None:
        """(num_windows * heads, N, N) additive mask: relative position bias + Swin's shift mask."""
        nw, n = (Hp // wh) * (Wp // ww), wh * ww
        mask = None
        if self.relative_position_bias_table is not None:
            index = (self.relative_position_index if wh == ww == self.window_size
                     else _relative_position_index(wh, ww, self.window_size, device))
            bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, self.num_heads)
            mask = bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if sh or sw:
            region = (_window_region_ids(Hp, wh, sh, device)[:, None] * 3
                      + _window_region_ids(Wp, ww, sw, device)[None, :])  # (Hp, Wp)
            region = region.view(Hp // wh, wh, Wp // ww, ww).transpose(1, 2).reshape(nw, n)
            shift_mask = (region[:, None, :] != region[:, :, None]).to(self.qkv.weight.dtype) * -100.0
            shift_mask = shift_mask.unsqueeze(1)  # (nw, 1, N, N)
            mask = shift_mask if mask is None else mask + shift_mask
        if mask is None:
            return None
        return mask.expand(nw, self.num_heads, n, n).reshape(nw * self.num_heads, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        wh, ww = min(H, self.window_size), min(W, self.window_size)
        sh = self.shift_size if H > self.window_size else 0
        sw = self.shift_size if W > self.window_size else 0
        pad_b, pad_r = (-H) % wh, (-W) % ww
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        hg, wg = Hp // wh, Wp // ww
        nh, hd = self.num_heads, self.head_dim
        # (B, hg, wh, wg, ww, 3, nh, hd) -> (3, B, hg, wg, nh, wh, ww, hd): windows x heads become one batch dim
        qkv = self.qkv(x).view(B, hg, wh, wg, ww, 3, nh, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, B, hg * wg * nh, wh * ww, hd).unbind(0)
        mask = self._attn_mask(Hp, Wp, wh, ww, sh, sw, x.device)
        if mask is not None:
            mask = mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.view(B, hg, wg, nh, wh, ww, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))


def _depthwise(dim: int, kernel: int, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=dim)


class CrossShapedWindowAttention(nn.Module):
    """CSWin's cross-shaped window attention with LePE (Dong et al., 2022).

    Half of the heads attend inside vertical stripes (full height, ``split_size`` wide), the other half
    inside horizontal stripes (``split_size`` high, full width); each half adds its locally-enhanced
    positional encoding, a 3x3 depthwise conv of its values inside each stripe (zero padding at stripe
    borders). CSWin uses ``split_size = 7`` at 1/16 scale. A side that ``split_size`` does not divide is
    zero-padded and the padded keys are masked out, so every stripe attends over its real tokens only.
    """

    def __init__(self, dim: int, num_heads: int = 8, split_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        if num_heads % 2:
            raise ValueError(f"cross-shaped window attention splits the heads in two halves, got num_heads={num_heads}")
        if int(split_size) != split_size or split_size < 1:
            raise ValueError(f"split_size must be an integer >= 1, got split_size={split_size}")
        self.dim, self.num_heads, self.split_size = dim, num_heads, int(split_size)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.ModuleList(_depthwise(dim // 2, 3) for _ in range(2))  # vertical, horizontal stripes
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, split_size={self.split_size}"

    def _stripes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sh: int, sw: int,
                 lepe: nn.Conv2d) -> torch.Tensor:
        """Attention of ``(B, H, W, C')`` q/k/v inside ``sh x sw`` stripes, plus LePE; ``(B, H, W, C')``."""
        B, H, W, C = q.shape
        nh, hd = self.num_heads // 2, self.head_dim
        pad_b, pad_r = (-H) % sh, (-W) % sw
        if pad_b or pad_r:
            q, k, v = (F.pad(t, (0, 0, 0, pad_r, 0, pad_b)) for t in (q, k, v))
        hg, wg, n = (H + pad_b) // sh, (W + pad_r) // sw, sh * sw

        def stripes(t: torch.Tensor) -> torch.Tensor:  # (B, Hp, Wp, C) -> (B * hg * wg, n, C)
            return t.reshape(B, hg, sh, wg, sw, C).transpose(2, 3).reshape(B * hg * wg, n, C)

        q, k, v = stripes(q), stripes(k), stripes(v)
        pe = lepe(v.view(-1, sh, sw, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(-1, n, nh, hd)
        mask = None
        if pad_b or pad_r:  # keys on padded positions take no part
            real = torch.zeros(hg * sh, wg * sw, dtype=torch.bool, device=q.device)
            real[:H, :W] = True
            mask = real.view(hg, sh, wg, sw).transpose(1, 2).reshape(1, hg * wg, 1, 1, n)
            mask = mask.expand(B, -1, -1, -1, -1).reshape(B * hg * wg, 1, 1, n)
        heads = [t.view(-1, n, nh, hd).transpose(1, 2) for t in (q, k, v)]
        x = F.scaled_dot_product_attention(*heads, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2) + pe  # (B * hg * wg, n, nh, hd)
        x = x.reshape(B, hg, wg, sh, sw, C).transpose(2, 3).reshape(B, hg * sh, wg * sw, C)
        return x[:, :H, :W] if pad_b or pad_r else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H, W, 3, C).unbind(3)
        h, s = C // 2, self.split_size
        vertical = self._stripes(q[..., :h], k[..., :h], v[..., :h], H, min(s, W), self.lepe[0])
        horizontal = self._stripes(q[..., h:], k[..., h:], v[..., h:], min(s, H), W, self.lepe[1])
        return self.proj_drop(self.proj(torch.cat([vertical, horizontal], -1)))


def LocallyGroupedAttention(dim: int, num_heads: int = 8, window_size: int = TWINS_WINDOW, qkv_bias: bool = True,
                            attn_drop: float = 0.0, proj_drop: float = 0.0) -> WindowAttention:
    """Twins-SVT locally-grouped self-attention (LSA): window attention, no shift, no position bias."""
    return WindowAttention(dim, num_heads, window_size=window_size, shift_size=0, rel_pos_bias=False,
                           qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)


class LinformerAttention(MultiHeadSelfAttention):
    """Linformer (Wang et al., 2020): keys and values projected along the sequence from ``seq_len`` to ``k``.

    One ``E`` and one ``F`` projection (``nn.Linear(seq_len, k, bias=False)``) shared by all heads, so the
    layer only accepts maps with ``H * W == seq_len``. Everything else is :class:`MultiHeadSelfAttention`.
    """

    def __init__(self, dim: int, num_heads: int = 8, seq_len: int = 196, k: int = 256, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.seq_len, self.k = seq_len, k
        self.proj_k = nn.Linear(seq_len, k, bias=False)
        self.proj_v = nn.Linear(seq_len, k, bias=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seq_len={self.seq_len}, k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        if x.shape[1] * x.shape[2] != self.seq_len:
            raise ValueError(f"LinformerAttention was built for seq_len={self.seq_len}, "
                             f"got a {x.shape[1]}x{x.shape[2]} map")
        return super().forward(x)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values projected along the sequence: ``(B, heads, seq_len, hd) -> (B, heads, k, hd)``."""
        return (self.proj_k(k.transpose(-2, -1)).transpose(-2, -1),
                self.proj_v(v.transpose(-2, -1)).transpose(-2, -1))


def _orthogonal_random_features(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """Performer's Gaussian orthogonal random matrix (``num_features, dim``), rows scaled by chi(dim) norms."""
    g = torch.Generator().manual_seed(seed)
    blocks = math.ceil(num_features / dim)
    q, _ = torch.linalg.qr(torch.randn(blocks, dim, dim, generator=g))  # batched QR, orthonormal columns
    rows = q.transpose(-2, -1).reshape(blocks * dim, dim)[:num_features]
    norms = torch.randn(num_features, dim, generator=g).norm(dim=1)
    return rows * norms[:, None]


class PerformerAttention(nn.Module):
    """Performer (Choromanski et al., 2021) FAVOR+ attention: softmax kernel by positive orthogonal random features.

    Linear in the number of tokens: ``out = phi(q) (phi(k)^T v) / (phi(q) sum_n phi(k_n))`` with
    ``num_features`` fixed (non-trainable) random features shared by all heads.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_features: int = 256, qkv_bias: bool = True,
                 proj_drop: float = 0.0, seed: int = 0, eps: float = 1e-4):
        super().__init__()
        self.dim, self.num_heads, self.num_features, self.eps = dim, num_heads, num_features, eps
        self.head_dim = _check_heads(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("projection", _orthogonal_random_features(num_features, self.head_dim, seed))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, num_features={self.num_features}"

    def _features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        dn = self.head_dim ** -0.25
        proj = torch.einsum("bhnd,md->bhnm", x * dn, self.projection.to(x.dtype))
        diag = (x * x).sum(-1, keepdim=True) * (dn * dn / 2)
        stab = proj.amax(-1, keepdim=True) if is_query else proj.amax((-2, -1), keepdim=True)
        return (torch.exp(proj - diag - stab.detach()) + self.eps) * self.num_features ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self._features(q, True), self._features(k, False)  # (B, heads, N, m)
        kv = torch.einsum("bhnm,bhnd->bhmd", k, v)
        denom = torch.einsum("bhnm,bhm->bhn", q, k.sum(-2))
        x = torch.einsum("bhnm,bhmd->bhnd", q, kv) / denom.unsqueeze(-1)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))


class LargeKernelAttention(nn.Module):
    """VAN's spatial attention (Guo et al., 2022): ``x + proj_2(LKA(GELU(proj_1(x))))``.

    LKA (large kernel attention) gates its input ``u`` by a decomposed 21x21 convolution:
    ``u * conv1(dw7x7_dilation3(dw5x5(u)))``. The 1x1 convolutions are ``nn.Linear`` layers over the
    channels of the ``(B, H, W, C)`` map (the same parameters); the depthwise ones take its NCHW view.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.proj_1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.conv0 = _depthwise(dim, 5)
        self.conv_spatial = _depthwise(dim, 7, dilation=3)
        self.conv1 = nn.Linear(dim, dim)
        self.proj_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        u = self.act(self.proj_1(x))
        attn = self.conv_spatial(self.conv0(u.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return x + self.proj_2(u * self.conv1(attn))


class RecursiveGatedConv(nn.Module):
    """HorNet's gnConv (Rao et al., 2022): recursive gated convolution of order ``order``.

    ``proj_in`` doubles the channels into ``p0`` (``dim / 2**(order-1)`` channels) and ``q`` (the sum of
    ``dim / 2**(order-1-k)``, k = 0..order-1), a 7x7 depthwise conv (times ``scale``) splits ``q`` into
    gates ``q_0 .. q_{order-1}``; then ``p_{k+1} = pw_k(p_k) * q_{k+1}`` with ``p_0 = p0 * q_0`` and the
    output is ``proj_out(p_{order-1})``. HorNet uses orders 2, 3, 4, 5 in its four stages (4 at 1/16
    scale) and ``scale = 1/3``.
    """

    def __init__(self, dim: int, order: int = 4, scale: float = 1.0 / 3.0):
        super().__init__()
        if order < 1 or dim % 2 ** (order - 1):
            raise ValueError(f"gnConv order {order} needs dim divisible by {2 ** (order - 1)}, got {dim}")
        self.dim, self.order, self.scale = dim, order, scale
        self.dims = [dim // 2 ** k for k in reversed(range(order))]
        self.proj_in = nn.Linear(dim, 2 * dim)
        self.dwconv = _depthwise(sum(self.dims), 7)
        self.pws = nn.ModuleList(nn.Linear(self.dims[k], self.dims[k + 1]) for k in range(order - 1))
        self.proj_out = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, order={self.order}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        p, q = self.proj_in(x).split((self.dims[0], sum(self.dims)), dim=-1)
        gates = (self.dwconv(q.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) * self.scale).split(self.dims, dim=-1)
        p = p * gates[0]
        for pw, gate in zip(self.pws, gates[1:]):
            p = pw(p) * gate
        return self.proj_out(p)


class FocalAttention(nn.Module):
    """Focal self-attention (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision
    Transformers", NeurIPS 2021) with two focal levels, as Focal-T uses it.

    The map is split into ``window_size`` windows. Each window's queries attend to three sets of keys
    and values, in one softmax:

    * level 0, fine: the window's own tokens plus its surroundings, ``expand_size`` tokens beyond each
      side. As in Focal, the surroundings are taken from the map rolled by ``expand_size`` in the four
      diagonal directions, so a border window wraps around to the opposite side.
    * level 1, coarse: every window pooled to one token by a learned linear map over its tokens (Focal's
      ``fc`` pooling, initialised to the mean), projected by the same ``qkv``; a window attends to the
      ``focal_window x focal_window`` pooled windows around it. Neighbours beyond the map are zeros, with
      -100 added to their logits, as in Focal.
    * relative position biases: Swin's table inside the window, a free bias per (query, surrounding
      token) pair, and a table over the query-to-pooled-window offsets.

    Focal-T's 1/16-scale stage uses window 7, ``expand_size = 3`` and ``focal_window = 3``, the defaults
    here. Keys of all levels come from two gathers of the projected map; attention is one SDPA call with
    the biases as its mask. Sides that ``window_size`` does not divide are zero-padded, as in Focal.
    """

    def __init__(self, dim: int, num_heads: int = 12, window_size: int = 7, expand_size: int = 3,
                 focal_window: int = 3, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        for name, value, low in (("window_size", window_size, 1), ("expand_size", expand_size, 1),
                                 ("focal_window", focal_window, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {name}={value}")
        if expand_size >= window_size or focal_window % 2 == 0:
            raise ValueError(f"need expand_size < window_size and an odd focal_window, got expand_size={expand_size}, "
                             f"window_size={window_size}, focal_window={focal_window}")
        self.dim, self.num_heads = dim, num_heads
        ws, e, fw = int(window_size), int(expand_size), int(focal_window)
        self.window_size, self.expand_size, self.focal_window = ws, e, fw
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pool = nn.Linear(ws * ws, 1)  # Focal's "fc" window pooling, starts as the mean
        nn.init.constant_(self.pool.weight, 1.0 / (ws * ws))
        nn.init.zeros_(self.pool.bias)
        # level 0: the window's tokens in the four rolled copies of the map, minus those inside the window
        keep = torch.ones(4, ws, ws, dtype=torch.bool)
        keep[0, :-e, :-e] = keep[1, :-e, e:] = keep[2, e:, :-e] = keep[3, e:, e:] = False
        self.register_buffer("valid_ind_rolled", keep.flatten().nonzero().flatten(), persistent=False)
        n_rolled = self.valid_ind_rolled.numel()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.relative_position_bias_table_to_neighbors = nn.Parameter(torch.zeros(1, num_heads, ws * ws, n_rolled))
        self.relative_position_bias_table_to_windows = nn.Parameter(torch.zeros(num_heads, (ws + fw - 1) ** 2))
        for table in (self.relative_position_bias_table, self.relative_position_bias_table_to_neighbors,
                      self.relative_position_bias_table_to_windows):
            trunc_normal_(table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(ws, ws, ws), persistent=False)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        pooled = torch.stack(torch.meshgrid(torch.arange(fw), torch.arange(fw), indexing="ij")).flatten(1) - fw // 2
        rel = coords[:, :, None] - pooled[:, None, :] + fw // 2  # (2, ws*ws, fw*fw), in [0, ws + fw - 2]
        self.register_buffer("relative_position_index_windows", rel[0] * (ws + fw - 1) + rel[1], persistent=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, window_size={self.window_size}, "
                f"expand_size={self.expand_size}, focal_window={self.focal_window}")

    def no_weight_decay(self) -> set[str]:
        return {"relative_position_bias_table", "relative_position_bias_table_to_neighbors",
                "relative_position_bias_table_to_windows"}

    def _fine_index(self, hp: int, wp: int, device) -> torch.Tensor:
        """``(nW, ws*ws + n_rolled)`` flat map positions of each window's own and rolled-surrounding tokens."""
        ws, e = self.window_size, self.expand_size
        rows = torch.arange(hp, device=device).view(hp // ws, 1, ws, 1)
        cols = torch.arange(wp, device=device).view(1, wp // ws, 1, ws)
        own = (rows * wp + cols).flatten(2)  # (nWh, nWw, ws*ws), window-major like Focal's partition
        # torch.roll(t, (sy, sx)) puts t[p - s] at p; Focal's four rolls, in its order
        shifts = torch.tensor([(-e, -e), (-e, e), (e, -e), (e, e)], device=device)
        r = (rows.unsqueeze(0) - shifts[:, 0].view(4, 1, 1, 1, 1)) % hp
        c = (cols.unsqueeze(0) - shifts[:, 1].view(4, 1, 1, 1, 1)) % wp
        rolled = (r * wp + c).flatten(3).permute(1, 2, 0, 3).flatten(2)[..., self.valid_ind_rolled]
        return torch.cat((own, rolled), -1).flatten(0, 1)

    def _coarse_index(self, nwh: int, nww: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each window's ``fw x fw`` pooled neighbours as positions in the pooled map, ``(nW, fw*fw)``, and
        whether each lies inside it."""
        r = self.focal_window // 2
        off = torch.arange(-r, r + 1, device=device)
        rows = torch.arange(nwh, device=device).view(nwh, 1, 1, 1) + off.view(1, 1, -1, 1)
        cols = torch.arange(nww, device=device).view(1, nww, 1, 1) + off.view(1, 1, 1, -1)
        inside = ((rows >= 0) & (rows < nwh) & (cols >= 0) & (cols < nww)).flatten(2).flatten(0, 1)
        index = (rows.clamp(0, nwh - 1) * nww + cols.clamp(0, nww - 1)).flatten(2).flatten(0, 1)
        return index, inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        ws, nh, hd = self.window_size, self.num_heads, self.head_dim
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = H + pad_b, W + pad_r
        nwh, nww, area = hp // ws, wp // ws, ws * ws
        nw = nwh * nww
        q, kv = self.qkv(x).view(B, hp * wp, 3, C).split((1, 2), dim=2)
        fine = self._fine_index(hp, wp, x.device)  # (nW, area + n_rolled)
        q = q[:, fine[:, :area]].view(B, nw, area, nh, hd)
        kv_fine = kv[:, fine]  # (B, nW, area + n_rolled, 2, C)
        # level 1: windows pooled by the learned linear map, through the same qkv. Focal projects the
        # pooled queries too and drops them; so does this (4 tokens at 14x14, and Table IV's FLOPs count them)
        windows = x.view(B, nwh, ws, nww, ws, C).permute(0, 1, 3, 5, 2, 4).reshape(B, nwh, nww, C, area)
        kv_pooled = self.qkv(self.pool(windows).view(B, nwh, nww, C)).view(B, nw, 3, C)[:, :, 1:]
        coarse, inside = self._coarse_index(nwh, nww, x.device)
        kv_coarse = kv_pooled[:, coarse] * inside.view(1, nw, -1, 1, 1)  # zeros outside
        k, v = torch.cat((kv_fine, kv_coarse), 2).view(B, nw, -1, 2, nh, hd).permute(3, 0, 1, 4, 2, 5).unbind(0)
        # biases: in-window table, free bias to the surroundings, pooled-window table; -100 beyond the map
        bias_own = self.relative_position_bias_table[self.relative_position_index.flatten()].view(area, area, nh)
        bias_windows = self.relative_position_bias_table_to_windows[:, self.relative_position_index_windows]
        mask = torch.cat((bias_own.permute(2, 0, 1).unsqueeze(0).expand(nw, -1, -1, -1),
                          self.relative_position_bias_table_to_neighbors.expand(nw, -1, -1, -1),
                          (bias_windows.unsqueeze(0) + (~inside).view(nw, 1, 1, -1) * -100.0)), -1)
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k, v, attn_mask=mask.to(q.dtype),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.view(B, nwh, nww, nh, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, hp, wp, C)
        if pad_b or pad_r:
            out = out[:, :H, :W]
        return self.proj_drop(self.proj(out))


class DeformableAttention(nn.Module):
    """DAT's deformable attention (Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022).

    Queries come from every position. Keys and values come from the input sampled at deformed points:
    a reference grid (``H x W`` points, DAT's stride 1 at 1/16 scale) plus offsets that a light network
    predicts from the queries, per group of ``dim / groups`` channels (shared weights across groups):
    ``kernel_size`` depthwise conv, LayerNorm, GELU, 1x1 conv to 2 (no bias). Offsets are bounded by
    ``tanh`` to ``offset_range_factor / (side - 1)`` in normalised coordinates. Each group's channels are
    sampled bilinearly (``align_corners=True``, zeros outside) at its points. Attention adds a relative
    position bias, a learned ``(heads, 2 * map_size - 1, 2 * map_size - 1)`` table sampled bilinearly at
    half the normalised query-to-key displacement. The four projections are ``nn.Linear`` layers.

    DAT-T's 1/16-scale stage uses ``groups = 3``, ``kernel_size = 5`` and ``offset_range_factor = 2``,
    the defaults here. The bias table fits ``map_size``; other map sizes sample it at their own
    displacements, because it is indexed in normalised coordinates.
    """

    def __init__(self, dim: int, num_heads: int = 12, map_size: int = 14, groups: int = 3, kernel_size: int = 5,
                 offset_range_factor: float = 2.0, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        if groups < 1 or num_heads % groups:
            raise ValueError(f"groups={groups} must be >= 1 and divide num_heads={num_heads}")
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got kernel_size={kernel_size}")
        if int(map_size) != map_size or map_size < 1:
            raise ValueError(f"map_size must be an integer >= 1, got map_size={map_size}")
        self.dim, self.num_heads, self.groups = dim, num_heads, groups
        self.group_dim = dim // groups
        self.map_size, self.kernel_size = int(map_size), int(kernel_size)
        self.offset_range_factor = offset_range_factor
        self.attn_drop = attn_drop
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_out = nn.Linear(dim, dim)
        self.offset_dwconv = _depthwise(self.group_dim, self.kernel_size)
        self.offset_norm = nn.LayerNorm(self.group_dim)
        self.offset_act = nn.GELU()
        self.offset_proj = nn.Linear(self.group_dim, 2, bias=False)  # (dy, dx) per point
        side = 2 * self.map_size - 1
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, side, side))
        trunc_normal_(self.rpe_table, std=0.01)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, groups={self.groups}, kernel_size={self.kernel_size}, "
                f"map_size={self.map_size}")

    def no_weight_decay(self) -> set[str]:
        return {"rpe_table"}

    @staticmethod
    def _reference(h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        """Pixel centres of an ``h x w`` grid in normalised ``(y, x)`` coordinates, ``(h, w, 2)``."""
        ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) * (2.0 / h) - 1
        xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) * (2.0 / w) - 1
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B * groups, H, W, C / groups)``."""
        B, H, W, _ = t.shape
        return t.view(B, H, W, self.groups, self.group_dim).permute(0, 3, 1, 2, 4).reshape(-1, H, W, self.group_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        g, nh, hd = self.groups, self.num_heads, self.head_dim
        q = self.proj_q(x)
        off = self.offset_dwconv(self._grouped(q).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        off = self.offset_proj(self.offset_act(self.offset_norm(off)))  # (B*g, H, W, 2)
        scale = off.new_tensor([1.0 / max(H - 1, 1), 1.0 / max(W - 1, 1)]) * self.offset_range_factor
        reference = self._reference(H, W, x)  # the reference points, also the query positions
        pos = off.tanh() * scale + reference  # (B*g, H, W, 2), (y, x)
        sampled = F.grid_sample(self._grouped(x).permute(0, 3, 1, 2), pos.flip(-1), mode="bilinear",
                                padding_mode="zeros", align_corners=True)  # (B*g, C/g, H, W)
        sampled = sampled.view(B, g, self.group_dim, H * W).permute(0, 3, 1, 2).reshape(B, H * W, C)
        k = self.proj_k(sampled).view(B, -1, nh, hd).transpose(1, 2)
        v = self.proj_v(sampled).view(B, -1, nh, hd).transpose(1, 2)
        q = q.view(B, H * W, nh, hd).transpose(1, 2)
        # relative position bias at half the query -> key displacement, per group of heads
        displacement = (reference.view(1, H * W, 1, 2) - pos.view(B * g, 1, H * W, 2)) * 0.5  # (B*g, HW, HW, 2)
        table = self.rpe_table.to(x.dtype).view(1, g, nh // g, *self.rpe_table.shape[1:])
        table = table.expand(B, -1, -1, -1, -1).reshape(B * g, nh // g, *self.rpe_table.shape[1:])
        bias = F.grid_sample(table, displacement.flip(-1), mode="bilinear", align_corners=True)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(B, nh, H * W, H * W),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj_out(x))


class QuadTreeAttention(nn.Module):
    """QuadTree attention, variant B (Tang et al., "QuadTree Attention for Vision Transformers", ICLR 2022),
    as QuadTree-B uses it in its classification backbone.

    Queries and keys form ``levels``-level pyramids by 2x2 average pooling; values by a learned branch
    per level (GroupNorm(1), GELU, 2x2 stride-2 conv, GroupNorm(1), GELU, 1x1 conv). The coarsest level
    is full attention. Each finer level attends only inside the quadtree: a query's four children at the
    next finer level score the children of the ``topk`` keys its parent weighted most (``4 * topk``
    candidates, one softmax over them), and keep their own ``topk`` for the level below. Every level's
    message gets a locally-enhanced position term (3x3 depthwise conv of that level's values); the
    messages are upsampled (nearest) to the input map and summed with learned softmax weights.

    QuadTree-B's 1/16-scale stage uses two levels and ``topk = 8``, the defaults here. QuadTree runs the
    fine levels in two CUDA kernels that gather the candidate keys and values; here each parent's
    ``topk`` 2x2 key and value blocks are gathered as contiguous rows (``index_select``) and attended
    by batched matmuls (SDPA at the finest level), with heads and parents as batch dimensions. Sides not
    divisible by ``2 ** (levels - 1)`` are zero-padded at the bottom/right (padded tokens take part as
    keys) and cropped afterwards. ``topk`` is clipped to the candidates a level has.

    Under autocast, the levels that pick top keys score in fp32, as QuadTree computes all its levels:
    bf16 probabilities of about 1/49 cannot rank keys. ``attn_drop`` (QuadTree applies none) acts on
    the weights after the top keys are picked. ``level_weight`` and ``lepe`` are indexed finest level
    first (QuadTree's own modules go coarsest first).
    """

    def __init__(self, dim: int, num_heads: int = 12, levels: int = 2, topk: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        for name, value in (("levels", levels), ("topk", topk)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {name}={value}")
        self.dim, self.num_heads, self.levels, self.topk = dim, num_heads, int(levels), int(topk)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.value_branches = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(1, dim), nn.GELU(), nn.Conv2d(dim, dim, 2, stride=2),
                          nn.GroupNorm(1, dim), nn.GELU(), nn.Conv2d(dim, dim, 1))
            for _ in range(self.levels - 1))
        self.lepe = nn.ModuleList(_depthwise(dim, 3) for _ in range(self.levels))  # finest level first
        self.level_weight = nn.Parameter(torch.randn(self.levels))  # finest level first
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, levels={self.levels}, topk={self.topk}"

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, heads, h * w, head_dim)``."""
        B, _, h, w = t.shape
        return t.permute(0, 2, 3, 1).reshape(B, h * w, self.num_heads, self.head_dim).transpose(1, 2)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B * heads, h/2 * w/2, 4, head_dim)``: each 2x2 block's four tokens together,
        blocks in row-major order of the coarser level, tokens row-major inside a block."""
        B, _, h, w = t.shape
        t = t.reshape(B, self.num_heads, self.head_dim, h // 2, 2, w // 2, 2)
        return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(B * self.num_heads, (h // 2) * (w // 2), 4, self.head_dim)

    def _picking_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           drop: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(softmax(q k^T / sqrt(d)), message)`` for a level whose weights also pick the top keys: in fp32
        outside autocast (bf16 weights of ~1/49 cannot rank keys); the message comes back in ``v``'s dtype."""
        with torch.autocast(q.device.type, enabled=False):
            attn = ((q.float() * self.head_dim ** -0.5) @ k.float().transpose(-2, -1)).softmax(-1)
            return attn, (F.dropout(attn, drop, self.training) @ v.float()).to(v.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        B, H, W, C = x.shape
        nh, hd, n_lv = self.num_heads, self.head_dim, self.levels
        step = 2 ** (n_lv - 1)
        pad_b, pad_r = (-H) % step, (-W) % step
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        q, k, v = self.qkv(x).permute(0, 3, 1, 2).chunk(3, dim=1)  # NCHW views of the channels-last map
        qs, ks, vs = [q], [k], [v]  # pyramids, finest first
        for branch in self.value_branches:
            qs.append(F.avg_pool2d(qs[-1], 2))
            ks.append(F.avg_pool2d(ks[-1], 2))
            vs.append(branch(vs[-1]))
        drop = self.attn_drop if self.training else 0.0
        weight = self.level_weight.softmax(0)
        out = None
        for lv in range(n_lv - 1, -1, -1):  # coarsest first
            h, w = qs[lv].shape[-2:]
            if lv == n_lv - 1:  # full attention; each query's top keys are its children's candidates below
                ql, kl, vl = self._heads(qs[lv]), self._heads(ks[lv]), self._heads(vs[lv])
                if lv:
                    attn, msg = self._picking_attention(ql, kl, vl, drop)  # (B, nh, h*w, h*w), (B, nh, h*w, hd)
                    idx = attn.topk(min(self.topk, h * w), dim=-1).indices.view(B * nh, h * w, -1)
                else:  # one level: plain full attention
                    msg = F.scaled_dot_product_attention(ql, kl, vl, dropout_p=drop)
                msg = msg.permute(0, 2, 1, 3).reshape(B, h, w, C)
            else:  # a parent's four children attend to the 2x2 blocks under the parent's top keys
                hp, wp = h // 2, w // 2
                n_par, n_top = hp * wp, idx.shape[-1]
                rows = (idx + torch.arange(B * nh, device=x.device).view(-1, 1, 1) * n_par).view(-1)
                kc, vc = (self._blocks(t).reshape(-1, 4 * hd).index_select(0, rows).view(B * nh, n_par, 4 * n_top, hd)
                          for t in (ks[lv], vs[lv]))
                children = self._blocks(qs[lv])  # (B*nh, parents, 4, hd)
                if lv:
                    attn, msg = self._picking_attention(children, kc, vc, drop)  # (B*nh, parents, 4, 4K / hd)
                    top = attn.topk(min(self.topk, 4 * n_top), dim=-1).indices  # candidate = 4 * key + child
                    block = idx.unsqueeze(2).expand(-1, -1, 4, -1).gather(-1, top // 4)
                    child = top % 4
                    pos = ((block // wp) * 2 + child // 2) * w + (block % wp) * 2 + child % 2
                    idx = pos.view(B * nh, hp, wp, 2, 2, -1).transpose(2, 3).reshape(B * nh, h * w, -1)
                else:
                    msg = F.scaled_dot_product_attention(children, kc, vc, dropout_p=drop)
                msg = msg.view(B, nh, hp, wp, 2, 2, hd).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, h, w, C)
            msg = (msg + self.lepe[lv](vs[lv]).permute(0, 2, 3, 1)) * weight[lv]
            if out is not None:  # nearest-upsample the coarser levels' sum (a broadcast add)
                hc, wc = out.shape[1:3]
                msg = (msg.view(B, hc, 2, wc, 2, C) + out.view(B, hc, 1, wc, 1, C)).view(B, h, w, C)
            out = msg
        if pad_b or pad_r:
            out = out[:, :H, :W]
        return self.proj_drop(self.proj(out))


class TokenAttention(nn.Module):
    """Adapt a token-sequence attention ``(B, N, C) -> (B, N, C)`` (e.g. timm's XCiT ``XCA``) to ``(B, H, W, C)``."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"TokenAttention expects a channels-last (B, H, W, C) map, got shape {tuple(x.shape)}")
        B, H, W, C = x.shape
        return self.attn(x.reshape(B, H * W, C)).view(B, H, W, C)


def create_attention(name: str, dim: int, num_heads: int, *, window_size: int, alpha: float,
                     qkv_bias: bool = True, block_idx: int = 0, attn_drop: float = 0.0, proj_drop: float = 0.0,
                     stage_idx: int | None = None) -> nn.Module:
    """Build the attention of a LITv2 block: HiLo or an ablation alternative (paper Table 4).

    Args:
        name: one of :data:`ATTENTION_CHOICES`.
        dim, num_heads: channels and heads of the block.
        window_size, alpha: HiLo's ``s`` and ``alpha`` (used by ``"hilo"`` only; the alternatives use their
            own family's settings, see the module docstring).
        block_idx: index of the block in its stage (Swin shifts odd blocks; Twins alternates LSA/GSA).
        stage_idx: 0-based stage index (0..3) selecting PVT/Twins' per-stage ``sr_ratio`` (8, 4, 2, 1).
            ``None``: inferred from the LITv2 config, ``window_size == 1`` (HiLo as plain MSA) marks the
            last stage (sr 1), anything else the 1/16-scale stage 3 (sr 2).
    """
    key = str(name).lower()
    if key not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if key == "hilo":
        from .hilo import HiLo
        return HiLo(dim, num_heads, window_size=window_size, alpha=alpha, qkv_bias=qkv_bias,
                    attn_drop=attn_drop, proj_drop=proj_drop)
    if stage_idx is None:
        stage_idx = NUM_STAGES - 1 if window_size == 1 else NUM_STAGES - 2
    if not 0 <= stage_idx < NUM_STAGES:
        raise ValueError(f"stage_idx must be in [0, {NUM_STAGES - 1}], got stage_idx={stage_idx}")
    sr_ratio = PVT_SR_RATIOS[stage_idx]
    common = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
    if key == "msa":
        return MultiHeadSelfAttention(dim, num_heads, **common)
    if key == "sra":
        return SpatialReductionAttention(dim, num_heads, sr_ratio=sr_ratio, **common)
    if key == "wmsa":
        shift = SWIN_WINDOW // 2 if block_idx % 2 == 1 else 0
        return WindowAttention(dim, num_heads, window_size=SWIN_WINDOW, shift_size=shift, rel_pos_bias=True, **common)
    # tmsa: Twins-SVT alternates LSA (even blocks) and GSA (odd blocks)
    if block_idx % 2 == 0:
        return LocallyGroupedAttention(dim, num_heads, window_size=TWINS_WINDOW, **common)
    return GlobalSubsampledAttention(dim, num_heads, sr_ratio=sr_ratio, **common)
