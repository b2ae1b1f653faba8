"""Layers shared by HiLo and LITv2, and the CPU kernel choice they make.

LITv2 keeps activations channels-last, ``(B, H, W, C)``. On CPU two of its layers then have faster
oneDNN kernels than the default ones, computing the same sums (differences are float rounding):

* a linear layer over ``C`` is exactly a 1x1 convolution of the ``permute(0, 3, 1, 2)`` view, which
  PyTorch recognises as channels-last and runs with oneDNN without copying (output channels-last too,
  so permuting back is free). Where the BLAS behind ``addmm`` is slow (MKL's generic path on AMD EPYC,
  this project's CI machine) this is up to 2x faster for LITv2's shapes; elsewhere it is on par;
* ConvFFN's depthwise 3x3 conv + exact GELU run as one oneDNN convolution with a GELU post-op at
  inference (no autograd graph needed), saving a full pass over the widest activations.

``cpu_onednn(False)`` switches both off (plain ``F.linear`` / conv then ``F.gelu``), e.g. to compare.
GPUs, tracing (fvcore, ONNX) and ``torch.compile`` (which fuses on its own) take the plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "cpu_onednn", "dwconv_gelu"]


class _Flags:
    cpu_onednn = True


def cpu_onednn(enabled: bool | None = None) -> bool:
    """Get (or set) whether LITv2 layers use the oneDNN kernels described above on CPU."""
    if enabled is not None:
        _Flags.cpu_onednn = bool(enabled)
    return _Flags.cpu_onednn


def _onednn_ok(x: torch.Tensor) -> bool:
    return (_Flags.cpu_onednn and x.device.type == "cpu" and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that runs as a oneDNN 1x1 conv on CPU maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and _onednn_ok(x):
            w = self.weight.view(self.out_features, self.in_features, 1, 1)
            return F.conv2d(x.permute(0, 3, 1, 2), w, self.bias).permute(0, 2, 3, 1)
        return F.linear(x, self.weight, self.bias)


_fused_conv = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


def dwconv_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``GELU(conv(x))`` for an NCHW (channels-last) ``x``; fused in oneDNN when no gradient is needed."""
    if _fused_conv is not None and _onednn_ok(x) and not (torch.is_grad_enabled() and
                                                          (x.requires_grad or conv.weight.requires_grad)):
        try:
            return _fused_conv(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                               list(conv.dilation), conv.groups, "gelu", [], "none")
        except RuntimeError:  # dtype/layout the fused kernel does not take: plain path below
            pass
    return F.gelu(conv(x))
