"""oneDNN convolutions for fp32 CPU inference, with weights kept in oneDNN's blocked layout.

A linear layer over ``C`` of a channels-last ``(B, H, W, C)`` map is exactly a 1x1 convolution of its
``permute(0, 3, 1, 2)`` view, which PyTorch recognises as channels-last and runs with oneDNN without copying.
ConvFFN's depthwise 3x3 conv + exact GELU run as one oneDNN convolution with a GELU post-op. At fp32 inference
both take their weights in oneDNN's blocked layout, reordered once and cached per module (a plain oneDNN conv
reorders them on every call, which costs most at batch 1).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import _internals
from .flags import Flags, taken

_fused_conv = _internals.onednn_conv_pointwise()
_reorder_weight = _internals.onednn_reorder_conv2d_weight()
_StorageWeakRef = _internals.storage_weak_ref()
# module -> (weight key, weak reference to the weight's storage, packed copy)
_packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_packed(module: nn.Module) -> None:
    _packed_weights.pop(module, None)


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` runs eagerly on the CPU with the fast paths on (not traced, exported or compiled)."""
    return (Flags.cpu_fast_paths and x.device.type == "cpu" and not torch.jit.is_tracing()
            and not torch.compiler.is_exporting() and not torch.compiler.is_compiling())


def no_grad_needed(*tensors: torch.Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def inference_conv(x: torch.Tensor, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                   padding: list[int], groups: int, attr: str = "none", stride: list[int] = (1, 1)):
    """``attr(conv(x))`` on oneDNN with a cached blocked copy of ``weight``, or None (the caller's plain path).

    Only for eager fp32 CPU inference: no autograd, no autocast. The blocked copy is made once per module and made
    again when the weight changes: an in-place update or ``load_state_dict`` bumps the tensor's version (a fused
    optimizer does not: the accelerated modules drop their copies whenever their mode is set); a weight
    computed on every call (a parametrization such as weight norm or a LoRA delta) or swapped in with
    ``param.data = ...`` lives in another storage. The key names the storage object; the entry holds a weak
    reference to it, which keeps that address from being given to a new storage after the old one is freed (a data
    pointer alone can be reused). Writes through ``.data`` (``param.data.copy_(...)``) bump no version and go unseen.
    """
    if (_fused_conv is None or not Flags.onednn or not eager_cpu(x) or x.dtype != torch.float32
            or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or not no_grad_needed(x, weight, bias)):
        return None
    try:
        if not Flags.packed_weights or _reorder_weight is None or _StorageWeakRef is None:
            return _fused_conv(x, weight, bias, padding, stride, [1, 1], groups, attr, [], "none")
        storage = weight.untyped_storage()
        key = (storage._cdata, weight.data_ptr(), weight._version)
        entry = _packed_weights.get(module)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                packed = _reorder_weight(weight.detach().to_mkldnn(), padding, stride, [1, 1], groups,
                                         list(x.shape))
            entry = _packed_weights[module] = (key, _StorageWeakRef(storage), packed)
        taken("packed_weights")
        return _fused_conv(x, entry[2], bias, padding, stride, [1, 1], groups, attr, [], "none")
    except RuntimeError as e:  # a layout or build the oneDNN op does not take: the plain path, said once
        _internals.warn_once(f"the oneDNN kernel for {type(module).__name__} {tuple(weight.shape)}",
                             f"{type(e).__name__}: {str(e).splitlines()[0]}")
        return None


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a ``(..., C)`` input; a 4-D map runs as a 1x1 conv of its channels-last view."""
    if x.dim() != 4 or not Flags.onednn or not Flags.cpu_fast_paths or x.device.type != "cpu" \
            or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return F.linear(x, module.weight, module.bias)
    xc = x.permute(0, 3, 1, 2)
    w = module.weight.view(module.out_features, module.in_features, 1, 1)
    out = inference_conv(xc, module, w, module.bias, [0, 0], 1)
    if out is None:  # training, autocast, or compiled (inductor sends the traced conv to oneDNN itself)
        out = F.conv2d(xc, w, module.bias)
    if not torch.compiler.is_compiling():
        taken("onednn_linear")
    return out.permute(0, 2, 3, 1)


def dwconv_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor | None:
    """``GELU(conv(x))`` for an NCHW (channels-last) ``x`` as one oneDNN kernel at inference, or None."""
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or _internals.module_forward_hooks(conv):
        return None
    out = inference_conv(x, conv, conv.weight, conv.bias, list(conv.padding), conv.groups, "gelu")
    if out is not None:
        taken("fused_dwconv_gelu")
    return out
