"""Memory recomputes for training: tensors autograd would keep for the backward pass are made again there.

ConvFFN keeps, per block, its hidden-width maps for backward: GELU's output (fc2's input) and the depthwise conv's
output (GELU's input). :class:`recompute_when_saved` lets autograd keep a recipe instead of such a tensor, and
:class:`DWConvRecompute` is the recipe for the depthwise conv's output. Gradients stay bitwise the same.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import _internals

saved_tensor_hooks_active = _internals.saved_tensor_hooks_active


class recompute_when_saved(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, autograd keeps no copy of ``target`` (or a view of it) for the backward pass:
    it keeps ``remake`` and calls it when the backward pass needs the tensor.

    For a cheap element-wise result whose input is kept anyway, e.g. ``GELU(y)`` feeding a linear layer
    (GELU's own backward keeps ``y``): the linear layer's saved input then costs one GELU in backward
    instead of a whole activation map of memory. ``remake()`` must return the tensor exactly as it was
    (same values, dtype and strides), which a deterministic element-wise op on the same input does. Other saved
    tensors (weights, other inputs) are kept as usual.
    """

    def __init__(self, target: torch.Tensor, remake):
        # the hooks must not hold ``target`` itself: autograd keeps them as long as the saved tensors
        storage, dtype = target.untyped_storage().data_ptr(), target.dtype
        layout = (target.shape, target.stride(), target.storage_offset(), dtype)

        def pack(t: torch.Tensor):
            # plain tensors only: subclasses (DTensor, float8 weights, ...) may have no storage to compare,
            # and a storage without data (meta device) is never matched
            if (storage and type(t) is torch.Tensor and t.dtype == dtype
                    and t.untyped_storage().data_ptr() == storage):
                return _Remake(remake, layout, (t.shape, t.stride(), t.storage_offset()))
            return t

        super().__init__(pack, lambda packed: packed() if isinstance(packed, _Remake) else packed)


class _Remake:
    def __init__(self, remake, layout, view):
        self.remake, self.layout, self.view = remake, layout, view

    def __call__(self) -> torch.Tensor:
        full = self.remake()
        if (full.shape, full.stride(), full.storage_offset(), full.dtype) != self.layout:
            raise RuntimeError(f"recompute_when_saved: remade tensor has layout "
                               f"{full.shape, full.stride(), full.dtype}, the saved one had "
                               f"{self.layout[:2] + self.layout[3:]}")
        return full.as_strided(*self.view)


class DWConvRecompute:
    """The depthwise conv of the forward pass again in the backward pass: the same kernel on the same input and
    weights, without module hooks, under the forward pass's autocast state (autograd runs the backward pass
    outside it, or inside a context of the caller's) and without building a graph (autograd attaches the
    remade tensor to the forward's graph). ``keep()`` holds the result for one ``take()``: fc2's backward (the
    GELU recompute) comes first and GELU's backward then takes the same tensor instead of a second conv."""

    @staticmethod
    def applies(conv: nn.Conv2d) -> bool:
        """Hooks (or a parametrized weight) could make ``conv(x)`` differ from the plain conv, or change state
        when it runs again (spectral norm's power iteration); such a conv keeps its output instead."""
        from torch.nn.utils import parametrize
        return not (_internals.module_forward_hooks(conv) or parametrize.is_parametrized(conv))

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
