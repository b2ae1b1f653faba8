"""HiLo attention (Pan et al., "Fast Vision Transformers with HiLo Attention", NeurIPS 2022, Sec. 4.1).

The paper's math in one place:

* ``H`` heads of dimension ``d = C / H`` are split by ``alpha``: ``Hl = floor(alpha * H)`` Lo-Fi heads,
  ``Hh = H - Hl`` Hi-Fi heads.
* **Hi-Fi** (high frequency): self-attention inside each non-overlapping ``s x s`` window
  (``h_qkv``: C -> 3*Hh*d, ``h_proj``: Hh*d -> Hh*d).
* **Lo-Fi** (low frequency): queries from every position (``l_q``: C -> Hl*d), keys/values from the
  ``s x s`` average-pooled map (``l_kv``: C -> 2*Hl*d), ``l_proj``: Hl*d -> Hl*d.
* Output = ``[Hi-Fi, Lo-Fi]`` concatenated along channels (Hi-Fi first).
* ``s = 1`` is standard multi-head self-attention (all heads Lo-Fi, un-pooled keys/values).

Any input size: when a side does not divide by ``s`` the map is zero-padded at the bottom/right for
the window partition and the pooling (padded positions are zero *inputs*, exactly like the authors'
detection code and Swin), and the output is cropped back. When the sides divide, no padding happens.

Tensors are channels-last ``(B, H, W, C)`` throughout, so every linear layer runs on contiguous rows
and no layout copy is needed around the block.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HiLo", "hilo_head_split", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, s: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom/right to multiples of ``s`` (no copy when the sides divide)."""
    pad_h, pad_w = (-x.shape[1]) % s, (-x.shape[2]) % s
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


torch.fx.wrap("pad_to_multiple")  # a leaf for FX tracing: its branch depends on the traced input's size


def hilo_head_split(num_heads: int, alpha: float, window_size: int) -> tuple[int, int]:
    """Return ``(lofi_heads, hifi_heads)`` for a HiLo layer; ``window_size == 1`` gives all Lo-Fi (MSA)."""
    if window_size == 1:
        return num_heads, 0
    lofi = int(math.floor(num_heads * alpha + 1e-9))
    return lofi, num_heads - lofi


class HiLo(nn.Module):
    """HiLo attention on a channels-last ``(B, H, W, C)`` feature map.

    Args:
        dim: channels ``C``.
        num_heads: total heads ``H`` (must divide ``dim``).
        window_size: ``s``; Hi-Fi window side and Lo-Fi pooling size. ``1`` = standard MSA.
        alpha: fraction of heads given to Lo-Fi, in ``[0, 1]``.
        qkv_bias: bias in the q/k/v projections (the released models use ``True``).
        qk_scale: override of the ``d ** -0.5`` scale.
        attn_drop, proj_drop: dropout on attention weights / after the output projections.
        device, dtype: where and how the parameters are created (timm's factory arguments).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int = 2,
        alpha: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"HiLo alpha must be in [0, 1], got alpha={alpha}")
        if int(window_size) != window_size or window_size < 1:
            raise ValueError(f"HiLo window_size must be an integer >= 1, got window_size={window_size}")
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide dim={dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.ws = int(window_size)
        self.alpha = float(alpha)
        self.l_heads, self.h_heads = hilo_head_split(num_heads, self.alpha, self.ws)
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.attn_drop = attn_drop

        self.l_q = self.l_kv = self.l_proj = self.h_qkv = self.h_proj = None  # a branch without heads has none
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias, **dd)
            self.l_kv = nn.Linear(dim, self.l_dim * 2, bias=qkv_bias, **dd)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim, **dd)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, self.h_dim * 3, bias=qkv_bias, **dd)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads} (lofi={self.l_heads}, hifi={self.h_heads}), "
                f"window_size={self.ws}, alpha={self.alpha}")

    def _sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        """Window self-attention over non-overlapping s x s windows. (B, H, W, C) -> (B, H, W, Hh*d)."""
        B, H, W, _ = x.shape
        s, nh, hd = self.ws, self.h_heads, self.head_dim
        x = pad_to_multiple(x, s)
        Hp, Wp = x.shape[1], x.shape[2]
        hg, wg = Hp // s, Wp // s
        qkv = self.h_qkv(x)  # (B, Hp, Wp, 3*Hh*d)
        # (B, hg, s, wg, s, 3, nh, hd) -> (3, B, hg, wg, nh, s, s, hd): one copy, windows become batch
        qkv = qkv.view(B, hg, s, wg, s, 3, nh, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
        qkv = qkv.reshape(3, B * hg * wg, nh, s * s, hd)
        out = self._sdpa(qkv[0], qkv[1], qkv[2])  # (B*G, nh, s*s, hd)
        out = out.view(B, hg, wg, nh, s, s, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, self.h_dim)
        return self.h_proj(out[:, :H, :W])

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        """Every query attends to s x s average-pooled keys/values. (B, H, W, C) -> (B, H, W, Hl*d)."""
        B, H, W, C = x.shape
        nh, hd = self.l_heads, self.head_dim
        q = self.l_q(x).view(B, H * W, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
        if self.ws > 1:
            # channels-last view -> NCHW view; avg_pool2d keeps the channels-last memory format
            pooled = F.avg_pool2d(pad_to_multiple(x, self.ws).permute(0, 3, 1, 2), self.ws, self.ws)
            kv_in = pooled.permute(0, 2, 3, 1)  # (B, H/s, W/s, C)
        else:
            kv_in = x
        kv = self.l_kv(kv_in).view(B, -1, 2, nh, hd).permute(2, 0, 3, 1, 4)  # (2, B, nh, M, hd)
        out = self._sdpa(q, kv[0], kv[1])  # (B, nh, N, hd)
        out = out.transpose(1, 2).reshape(B, H, W, self.l_dim)
        return self.l_proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.h_qkv is None:  # all heads Lo-Fi (alpha = 1, or s = 1: plain MSA)
            out = self.lofi(x)
        elif self.l_q is None:  # all heads Hi-Fi (alpha = 0)
            out = self.hifi(x)
        else:
            out = torch.cat((self.hifi(x), self.lofi(x)), dim=-1)
        return self.proj_drop(out)
