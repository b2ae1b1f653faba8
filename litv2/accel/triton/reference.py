"""What each op in :mod:`.ops` computes, in plain torch (autograd gives the gradients): the tests' reference.

Low-precision inputs are computed in fp32 and rounded once, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``litv2::add_layer_norm``'s ``(y, z)``."""
    y = x + r
    z = F.layer_norm(y.float(), y.shape[-1:], weight.float(), bias.float(), eps)
    return y, z.to(out_dtype)


def dwconv3x3_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``litv2::dwconv3x3_gelu`` on a ``(B, H, W, C)`` map."""
    y = F.conv2d(x.permute(0, 3, 1, 2).float(), weight.float(), None if bias is None else bias.float(), padding=1,
                 groups=x.shape[-1])
    return F.gelu(y).permute(0, 2, 3, 1).to(x.dtype)


def hilo_attention(p: torch.Tensor, kv: torch.Tensor | None, bias: torch.Tensor | None, hifi_heads: int,
                   lofi_heads: int, head_dim: int, window: int, scale: float) -> torch.Tensor:
    """``litv2::hilo_attention``'s ``out``: the padding's Hi-Fi q/k/v are ``bias`` (as p's dtype rounds it)."""
    from litv2.models.hilo import pad_to_multiple

    B, H, W, _ = p.shape
    s, d, Dh = window, head_dim, hifi_heads * head_dim
    outs = []
    if hifi_heads:
        qkv = pad_to_multiple(p[..., :3 * Dh].float(), s)
        if bias is not None:
            pad = torch.ones(qkv.shape[:3] + (1,), dtype=qkv.dtype)
            pad[:, :H, :W] = 0
            qkv = qkv + pad * bias.to(p.dtype).float()
        hg, wg = qkv.shape[1] // s, qkv.shape[2] // s
        qkv = qkv.view(B, hg, s, wg, s, 3, hifi_heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        qkv = qkv.reshape(3, B * hg * wg, hifi_heads, s * s, d)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=scale)
        out = out.view(B, hg, wg, hifi_heads, s, s, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, hg * s, wg * s, Dh)
        outs.append(out[:, :H, :W])
    if lofi_heads:
        q = p[..., 3 * Dh:].float().reshape(B, H * W, lofi_heads, d).transpose(1, 2)
        k, v = kv.float().reshape(B, -1, 2, lofi_heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        outs.append(out.transpose(1, 2).reshape(B, H, W, lofi_heads * d))
    return torch.cat(outs, -1).to(p.dtype)


def add_layer_norm_pool(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        out_dtype: torch.dtype, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``litv2::add_layer_norm_pool``'s ``(y, z, pooled)``."""
    from litv2.models.hilo import pad_to_multiple

    y = x + r
    z = F.layer_norm(y.float(), y.shape[-1:], weight.float(), bias.float(), eps)
    pooled = F.avg_pool2d(pad_to_multiple(z, window).permute(0, 3, 1, 2), window, window).permute(0, 2, 3, 1)
    return y, z.to(out_dtype), pooled.to(out_dtype)
