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
